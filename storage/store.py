"""`Store`: the one entry point to persistence, one repository per aggregate.

    store.conversations   conversations and their messages (storage.conversations)
    store.recent          the newest turns of the conversations served here (storage.history)
    store.turns           each user message's turn: lock, end, take over (storage.turns)
    store.people          users: stats, export, forget (storage.people)
    store.sessions        web-widget sessions (storage.sessions)
    store.draws           /draw records (storage.draws)
    store.instances       running processes and their heartbeats (storage.instances)
    store.unanswered      questions the FAQ could not answer (storage.knowledge)

Repositories share one `Transactions` runner (storage.base): on SQLite the
store's own writer and reader threads, on PostgreSQL asyncpg on the loop.
"""

from __future__ import annotations

from sqlalchemy import select, text

from storage.base import DATABASE_ERRORS, StorageUnavailable, Transactions, guarded
from storage.conversations import Conversations
from storage.database import create_engine, create_sqlite_sync_engine, migrate
from storage.draws import Draws
from storage.governance import GovernanceRecords
from storage.handoff import Handoffs
from storage.history import DEFAULT_CONVERSATIONS, RecentTurns
from storage.instances import Instances
from storage.knowledge import UnansweredQuestions
from storage.people import People
from storage.sessions import WebSessions
from storage.turns import Turns

#: A write that changes nothing, but needs SQLite's write lock to run.
_WRITE_PROBE = text("UPDATE alembic_version SET version_num = version_num WHERE 0")


class Store:
    """Async persistence for users, conversations, messages, draws and web sessions."""

    def __init__(self, db: Transactions, *, history_cache: int = DEFAULT_CONVERSATIONS) -> None:
        self.db = db
        self.engine = db.engine
        #: The newest turns of the conversations this process serves (storage.history).
        self.recent = RecentTurns(history_cache)
        self.conversations = Conversations(db, self.recent)
        self.turns = Turns(db)
        self.people = People(db, self.recent)
        self.sessions = WebSessions(db)
        self.draws = Draws(db)
        self.instances = Instances(db)
        self.unanswered = UnansweredQuestions(db)
        self.governance = GovernanceRecords(db)
        self.handoff = Handoffs(db)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        busy_timeout_ms: int = 5000,
        echo: bool = False,
        pool_timeout_s: float = 30,
        history_cache: int = DEFAULT_CONVERSATIONS,
    ) -> Store:
        """Connect and apply migrations; raises `StorageUnavailable` if it can't."""
        engine = create_engine(
            url, busy_timeout_ms=busy_timeout_ms, echo=echo, pool_timeout_s=pool_timeout_s
        )
        try:
            await migrate(engine)
        except DATABASE_ERRORS as exc:
            await engine.dispose()
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        sync_engine = None
        if engine.dialect.name == "sqlite":
            sync_engine = create_sqlite_sync_engine(url, busy_timeout_ms=busy_timeout_ms, echo=echo)
        return cls(Transactions(engine, sync_engine), history_cache=history_cache)

    async def close(self) -> None:
        await self.db.close()

    @property
    def dialect(self) -> str:
        return self.db.dialect

    @guarded
    async def ping(self) -> None:
        """Raise `StorageUnavailable` unless the database takes writes now.
        On SQLite that means taking the write lock (another process may hold
        it past the busy timeout); on PostgreSQL, reaching the server."""
        if self.dialect == "sqlite":
            await self.db.write(lambda session: session.execute(_WRITE_PROBE))
        else:
            await self.db.read(lambda session: session.execute(select(1)))
