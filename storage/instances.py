"""Running processes and their heartbeats, so that one process can tell
whether the process that owned a turn is still alive."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from storage.base import Repository, guarded, rows_affected
from storage.models import Instance, utcnow


class Instances(Repository):
    @guarded
    async def register(self, instance_id: str, host: str, pid: int) -> None:
        now = utcnow()
        await self.db.write(
            lambda session: session.add(
                Instance(id=instance_id, host=host, pid=pid, started_at=now, heartbeat_at=now)
            )
        )

    @guarded
    async def heartbeat(self, instance_id: str) -> None:
        statement = update(Instance).where(Instance.id == instance_id).values(heartbeat_at=utcnow())
        await self.db.write(lambda session: session.execute(statement))

    @guarded
    async def alive(self, since: datetime) -> dict[str, tuple[str, int]]:
        """Processes that sent a heartbeat after `since`: id -> (host, pid)."""
        query = select(Instance.id, Instance.host, Instance.pid).where(
            Instance.heartbeat_at > since
        )
        return await self.db.read(
            lambda session: {row.id: (row.host, row.pid) for row in session.execute(query)}
        )

    @guarded
    async def remove(self, instance_id: str) -> None:
        await self.db.write(
            lambda session: session.execute(delete(Instance).where(Instance.id == instance_id))
        )

    @guarded
    async def prune(self, before: datetime) -> int:
        """Forget processes silent since `before`."""

        def work(session: Session) -> int:
            result = session.execute(delete(Instance).where(Instance.heartbeat_at < before))
            return rows_affected(result)

        return await self.db.write(work)
