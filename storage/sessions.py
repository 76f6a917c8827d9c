"""Web-widget sessions: only the SHA-256 of each bearer token is stored."""

from __future__ import annotations

from sqlalchemy import delete, select

from storage.base import Repository, guarded, rows_affected
from storage.models import WebSession


class WebSessions(Repository):
    @guarded
    async def create(self, token_hash: str, user_id: str) -> None:
        await self.db.write(
            lambda session: session.add(WebSession(token_hash=token_hash, user_id=user_id))
        )

    @guarded
    async def user_for(self, token_hash: str) -> str | None:
        """The user id of the session whose token hashes to `token_hash`."""
        query = select(WebSession.user_id).where(WebSession.token_hash == token_hash)
        return await self.db.read(lambda session: session.scalar(query))

    @guarded
    async def delete_for_user(self, user_id: str) -> int:
        statement = delete(WebSession).where(WebSession.user_id == user_id)
        return await self.db.write(lambda session: rows_affected(session.execute(statement)))
