"""What every aggregate of the store shares: how a transaction runs, and how
database failures surface.

Every store method is one short transaction, written as a plain function over
a SQLAlchemy `Session` and run where the backend wants it: on SQLite in one
writer thread (reads on two reader threads), so a transaction costs one
thread hand-off instead of one per statement, and message writes that queue
up together share one commit (storage.writer); on PostgreSQL on the event
loop through asyncpg. Database failures (down, locked past the busy timeout)
surface as `StorageUnavailable`, so the caller can tell a user "try again"
instead of crashing.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from storage.writer import Writer

P = ParamSpec("P")
T = TypeVar("T")

#: What a database that is down, locked or out of connections raises.
DATABASE_ERRORS = (OperationalError, DBAPIError, PoolTimeout, OSError)


class StorageUnavailable(Exception):
    """The database cannot be reached or stayed locked; nothing was written."""


def guarded(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Turn database failures into `StorageUnavailable`."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except DATABASE_ERRORS as exc:
            raise StorageUnavailable(type(exc).__name__) from exc

    return wrapper


def rows_affected(result: Any) -> int:
    """How many rows an UPDATE or DELETE touched."""
    return int(getattr(result, "rowcount", 0) or 0)


def inserted_id(result: Any) -> int:
    """The primary key of the row an INSERT made."""
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def iso(moment: datetime) -> str:
    """UTC ISO-8601; SQLite hands back naive datetimes, which are UTC here."""
    return aware(moment).isoformat().replace("+00:00", "Z")


def aware(moment: datetime) -> datetime:
    """The moment in UTC, with its time zone (SQLite's are naive UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class Transactions:
    """Runs one transaction function on the right thread or connection."""

    def __init__(self, engine: AsyncEngine, sync_engine: Engine | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite: one thread owns the writes (storage.writer: in arrival order,
        # several at once in one transaction), two threads read (WAL readers
        # never wait for the writer).
        self.sync_engine = sync_engine
        self._sync_sessions = (
            sessionmaker(sync_engine, expire_on_commit=False) if sync_engine is not None else None
        )
        self.writer: Writer | None = None
        self._readers: ThreadPoolExecutor | None = None
        if sync_engine is not None:
            self.writer = Writer(sync_engine)
            in_memory = sync_engine.url.database in (None, "", ":memory:")
            if not in_memory:  # one shared connection: its reads queue with the writes
                self._readers = ThreadPoolExecutor(2, thread_name_prefix="sqlite-reader")

    async def write_rows(self, work: Callable[[Connection], T]) -> T:
        """`write` for Core statements on a plain connection: the message path,
        which runs for every message, skips the ORM session's bookkeeping (and,
        on SQLite, may share its transaction with other writes queued with it)."""
        if self.writer is not None:
            return await self.writer.run("rows", work)
        async with self.engine.begin() as connection:
            return await connection.run_sync(work)

    async def read_rows(self, work: Callable[[Connection], T]) -> T:
        """`read` for Core statements on a plain connection."""
        if self._readers is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._readers, self._rows_in_connection, work)
        if self.writer is not None:
            return await self.writer.run("read_rows", work)
        async with self.engine.connect() as connection:
            return await connection.run_sync(work)

    def _rows_in_connection(self, work: Callable[[Connection], T]) -> T:
        assert self.sync_engine is not None
        with self.sync_engine.connect() as connection:
            return work(connection)

    async def write(self, work: Callable[[Session], T]) -> T:
        """Run `work` in a write transaction, committed when it returns."""
        if self.writer is not None:
            return await self.writer.run("session", work)
        async with self._sessions.begin() as session:
            return await session.run_sync(work)

    async def read(self, work: Callable[[Session], T]) -> T:
        """Run `work` with a session that only reads."""
        if self._readers is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._readers, self._in_session, work)
        if self.writer is not None:
            return await self.writer.run("read_session", work)
        async with self._sessions() as session:
            return await session.run_sync(work)

    def _in_session(self, work: Callable[[Session], T]) -> T:
        assert self._sync_sessions is not None
        with self._sync_sessions() as session:
            return work(session)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown)
        if self.sync_engine is not None:
            await asyncio.to_thread(self.sync_engine.dispose)
        await self.engine.dispose()


class Repository:
    """One aggregate's queries over the shared `Transactions`."""

    def __init__(self, db: Transactions) -> None:
        self.db = db

    @property
    def dialect(self) -> str:
        return self.db.dialect
