"""`/draw` records: each request, its options and seed, its outcome and file."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.base import Repository, guarded, iso, rows_affected
from storage.models import Draw, utcnow


class Draws(Repository):
    @guarded
    async def add(
        self,
        *,
        public_id: str,
        platform: str,
        chat_id: str,
        user_id: str,
        prompt: str,
        options: dict[str, Any],
        seed: int | None,
    ) -> None:
        draw = Draw(
            public_id=public_id,
            platform=platform,
            chat_id=chat_id,
            user_id=user_id,
            prompt=prompt,
            options=options,
            seed=seed,
        )
        await self.db.write(lambda session: session.add(draw))

    @guarded
    async def finish(
        self,
        public_id: str,
        *,
        status: str,
        image_path: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Record a draw's outcome; False when its row is gone (the user ran /forget)."""
        values: dict[str, Any] = {"status": status, "finished_at": utcnow()}
        if image_path is not None:
            values["image_path"] = image_path
        if error is not None:
            values["error"] = error
        statement = update(Draw).where(Draw.public_id == public_id).values(**values)
        return await self.db.write(lambda session: bool(rows_affected(session.execute(statement))))

    @guarded
    async def times_since(
        self, platform: str, user_id: str, since: datetime, statuses: Sequence[str]
    ) -> list[datetime]:
        """When each of the user's draws since `since` with one of `statuses` was made."""
        query = (
            select(Draw.created_at)
            .where(
                Draw.platform == platform,
                Draw.user_id == user_id,
                Draw.created_at >= since,
                Draw.status.in_(list(statuses)),
            )
            .order_by(Draw.created_at)
        )
        return await self.db.read(lambda session: list(session.scalars(query).all()))

    @guarded
    async def image_path(self, public_id: str) -> str | None:
        query = select(Draw.image_path).where(Draw.public_id == public_id, Draw.status == "done")
        return await self.db.read(lambda session: session.scalar(query))

    @guarded
    async def export(self, platform: str, user_id: str) -> list[dict[str, Any]]:
        query = (
            select(Draw).where(Draw.platform == platform, Draw.user_id == user_id).order_by(Draw.id)
        )

        def work(session: Session) -> list[dict[str, Any]]:
            rows: Sequence[Draw] = session.scalars(query).all()
            return [
                {
                    "id": row.public_id,
                    "chat_id": row.chat_id,
                    "prompt": row.prompt,
                    "options": row.options,
                    "seed": row.seed,
                    "status": row.status,
                    "error": row.error,
                    "image": row.image_path,
                    "at": iso(row.created_at),
                    "finished_at": iso(row.finished_at) if row.finished_at else None,
                }
                for row in rows
            ]

        return await self.db.read(work)
