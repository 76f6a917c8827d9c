"""Engine creation and migrations.

SQLite gets WAL (readers don't block the writer), a busy timeout (a locked
database waits instead of failing) and foreign keys (ON DELETE CASCADE works).
Alembic migrations run at start, under an advisory lock on PostgreSQL so that
several processes starting together migrate once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine as sqlalchemy_create_engine
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: The store's own connections leave checkpoints to its checkpoint thread
#: (storage.writer) and checkpoint in a commit only past this many WAL pages
#: (SQLite's default: 1,000), should that thread fall behind.
WRITER_AUTOCHECKPOINT_PAGES = 4_000
_MIGRATION_LOCK_ID = 0x41494743  # "AIGC"
CONNECT_TIMEOUT_S = 5.0


def create_engine(
    url: str, *, busy_timeout_ms: int = 5000, echo: bool = False, pool_timeout_s: float = 30
) -> AsyncEngine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        kwargs.update(_sqlite_options(parsed, busy_timeout_ms))
    else:
        # Each conversation that is generating holds one connection for its
        # advisory lock (see Store.conversation_lock), so allow plenty.
        # pre-ping: a connection that died with a database restart is replaced
        # instead of failing the next request.
        kwargs.update(
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=90,
            pool_timeout=pool_timeout_s,
            # a server that is down answers at once; one that is unreachable
            # must not hold a request for asyncpg's default minute
            connect_args={"timeout": CONNECT_TIMEOUT_S},
        )
    engine = create_async_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        _add_sqlite_pragmas(engine.sync_engine, busy_timeout_ms)
    return engine


def create_sqlite_sync_engine(
    url: str, *, busy_timeout_ms: int = 5000, echo: bool = False
) -> Engine:
    """The same SQLite database through the standard `sqlite3` driver, for the
    store's own threads (one thread hand-off per transaction, not per statement)."""
    parsed = make_url(url).set(drivername="sqlite+pysqlite")
    options = _sqlite_options(parsed, busy_timeout_ms)
    options["connect_args"]["check_same_thread"] = False  # pooled across the store's threads
    if parsed.database in (None, "", ":memory:"):
        options["poolclass"] = StaticPool  # one in-memory database, not one per thread
    engine = sqlalchemy_create_engine(parsed, echo=echo, **options)
    _add_sqlite_pragmas(engine, busy_timeout_ms, autocheckpoint=WRITER_AUTOCHECKPOINT_PAGES)
    return engine


def _sqlite_options(parsed: URL, busy_timeout_ms: int) -> dict[str, Any]:
    database = parsed.database or ""
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # Transactions always end in commit or rollback here, so the extra
    # rollback on returning a connection to the pool is a wasted round trip.
    return {"connect_args": {"timeout": busy_timeout_ms / 1000}, "pool_reset_on_return": None}


def _add_sqlite_pragmas(
    engine: Engine, busy_timeout_ms: int, *, autocheckpoint: int | None = None
) -> None:
    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if autocheckpoint is not None:
            cursor.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
        cursor.close()


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _upgrade(connection: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
