"""What the web channel needs from the bot besides the message callback:
sessions, a visitor's history, pictures, health. Typed, and failing with
`bot.errors.Unavailable`, so the adapter never touches storage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bot.errors import Unavailable
from storage import StorageUnavailable, Store, StoredMessage, iso

T = TypeVar("T")
PLATFORM = "web"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    role: str
    text: str
    at: str
    source: dict[str, Any] | None = None
    author: str | None = None

    @classmethod
    def of(cls, message: StoredMessage) -> HistoryEntry:
        return cls(
            message.role, message.text, iso(message.created_at), message.source, message.author
        )

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"role": self.role, "text": self.text, "at": self.at}
        if self.source is not None and self.role == "bot":
            entry["source"] = self.source
        if self.author:
            entry["author"] = self.author
        return entry


async def _guard(call: Awaitable[T]) -> T:
    try:
        return await call
    except StorageUnavailable as exc:
        raise Unavailable(f"the database is unavailable ({exc})") from exc


class WebServices:
    def __init__(
        self,
        store: Store,
        health_checks: Callable[[], Awaitable[list[str]]],
        banned: Callable[[str], bool] = lambda user_id: False,
    ) -> None:
        self._store = store
        self._health_checks = health_checks
        self._banned = banned

    def banned(self, user_id: str) -> bool:
        """Whether this visitor is banned (from memory)."""
        return self._banned(user_id)

    async def create_session(self, token_hash: str, user_id: str) -> None:
        await _guard(self._store.sessions.create(token_hash, user_id))

    async def session_user(self, token_hash: str) -> str | None:
        """The visitor a session token hash belongs to, or None."""
        return await _guard(self._store.sessions.user_for(token_hash))

    async def history(self, user_id: str, *, limit: int = 500) -> list[HistoryEntry]:
        """The visitor's current conversation, oldest first."""
        messages = await _guard(
            self._store.conversations.active_history(PLATFORM, user_id, user_id, limit=limit)
        )
        return [HistoryEntry.of(message) for message in messages]

    async def picture(self, draw_id: str) -> Path | None:
        path = await _guard(self._store.draws.image_path(draw_id))
        return Path(path) if path else None

    async def problems(self) -> list[str]:
        """Why the bot is not healthy, if it is not: [] when all is well."""
        return await self._health_checks()
