"""The store API: everything the bot persists goes through `Store`.

Every method is one short transaction, written as a plain function over a
SQLAlchemy `Session` and run where the backend wants it: on SQLite in one
writer thread (reads on two reader threads), so a transaction costs one
thread hand-off instead of one per statement; on PostgreSQL on the event loop
through asyncpg. Database failures (down, locked past the busy timeout)
surface as `StorageUnavailable`, so the caller can tell a user "try again"
instead of crashing.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Select, Table, bindparam, delete, func, insert, select, update
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from storage.database import create_engine, create_sqlite_sync_engine, migrate
from storage.models import Conversation, Draw, Message, User, WebSession, utcnow

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


#: A turn waits at most this long for an earlier message's turn (whose process
#: may have died) before it goes ahead anyway.
TURN_WAIT_S = 30.0
#: Unfinished turns older than this are abandoned and never waited for.
TURN_ABANDONED_AFTER = timedelta(minutes=10)

#: Draw statuses that count against `[limits] draws_per_hour`.
LIMITED_DRAW_STATUSES = ("queued", "running", "done", "blocked")


class StorageUnavailable(Exception):
    """The database cannot be reached or stayed locked; nothing was written."""


def _guarded(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (OperationalError, DBAPIError, PoolTimeout, OSError) as exc:
            raise StorageUnavailable(type(exc).__name__) from exc

    return wrapper


def iso(moment: datetime) -> str:
    """UTC ISO-8601; SQLite hands back naive datetimes, which are UTC here."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    text: str
    created_at: datetime

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "text": self.text, "at": iso(self.created_at)}


@dataclass(slots=True)
class ExportedConversation:
    chat_id: str
    started_at: datetime
    messages: list[StoredMessage] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "chat_id": self.chat_id,
            "started_at": iso(self.started_at),
            "messages": [message.as_dict() for message in self.messages],
        }


@dataclass(frozen=True, slots=True)
class ForgetResult:
    messages: int
    conversations: int
    draws: int
    image_paths: list[str]


@dataclass(frozen=True, slots=True)
class UserStats:
    messages: int
    replies: int
    conversations: int
    draws: int
    first_seen: datetime | None


def lock_key(platform: str, chat_id: str, owner: str) -> int:
    """A stable signed 64-bit key for PostgreSQL advisory locks."""
    digest = hashlib.blake2b(f"{platform}\x1f{chat_id}\x1f{owner}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _stored(row: Message) -> StoredMessage:
    return StoredMessage(row.id, row.conversation_id, row.role, row.text, row.created_at)


# The message path runs for every message, so its statements are built once,
# on the Core tables, with bound parameters: SQLAlchemy then reuses their
# compiled form and cache keys instead of rebuilding them per message, and no
# ORM machinery runs.
_messages: Table = Message.__table__  # type: ignore[assignment]
_conversations: Table = Conversation.__table__  # type: ignore[assignment]
_users: Table = User.__table__  # type: ignore[assignment]

_XACT_LOCK = sql("SELECT pg_advisory_xact_lock(:key)")
_LOCK = sql("SELECT pg_advisory_lock(:key)")
_UNLOCK = sql("SELECT pg_advisory_unlock(:key)")
_FINISH_TURN = (
    update(_messages).where(_messages.c.id == bindparam("message_id")).values(turn_done=True)
)
_EARLIER_TURN_PENDING = (
    select(_messages.c.id)
    .where(
        _messages.c.conversation_id == bindparam("conversation_id"),
        _messages.c.id < bindparam("message_id"),
        _messages.c.role == "user",
        _messages.c.turn_done.is_(False),
        _messages.c.created_at > bindparam("since"),
    )
    .limit(1)
)
_INSERT_MESSAGE = insert(_messages)
_INSERT_CONVERSATION = insert(_conversations)
_ACTIVE_CONVERSATION = (
    select(_conversations.c.id)
    .where(
        _conversations.c.platform == bindparam("platform"),
        _conversations.c.chat_id == bindparam("chat_id"),
        _conversations.c.owner == bindparam("owner"),
        _conversations.c.active.is_(True),
    )
    .order_by(_conversations.c.id.desc())
    .limit(1)
)
#: A reply sorts right after the message it answers.
_turn_order = func.coalesce(_messages.c.reply_to_id, _messages.c.id)
_HISTORY_COLUMNS = select(
    _messages.c.id,
    _messages.c.conversation_id,
    _messages.c.role,
    _messages.c.text,
    _messages.c.created_at,
).where(_messages.c.conversation_id == bindparam("conversation_id"))
_HISTORY_ORDER = (_turn_order.desc(), _messages.c.id.desc())
_HISTORY = _HISTORY_COLUMNS.order_by(*_HISTORY_ORDER).limit(bindparam("limit"))
_HISTORY_BEFORE = (
    _HISTORY_COLUMNS.where(_turn_order < bindparam("before_id"))
    .order_by(*_HISTORY_ORDER)
    .limit(bindparam("limit"))
)


def _upsert_user_statement(dialect_insert: Any) -> Any:
    """Create the user, or update their display name if it changed."""
    statement = dialect_insert(_users)
    return statement.on_conflict_do_update(
        index_elements=[_users.c.platform, _users.c.user_id],
        set_={"user_name": statement.excluded.user_name},
        where=(_users.c.user_name != statement.excluded.user_name)
        & (statement.excluded.user_name != ""),
    )


_UPSERT_USER = {
    "sqlite": _upsert_user_statement(sqlite_insert),
    "postgresql": _upsert_user_statement(postgresql_insert),
}


class Store:
    """Async persistence for users, conversations, messages, draws and web sessions."""

    def __init__(self, engine: AsyncEngine, sync_engine: Engine | None = None) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite: one thread owns the writes (SQLite has one writer at a time
        # anyway, and queueing them in arrival order beats racing for the file
        # lock), two threads read (WAL readers never wait for the writer).
        self._sync_engine = sync_engine
        self._sync_sessions = (
            sessionmaker(sync_engine, expire_on_commit=False) if sync_engine is not None else None
        )
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        if sync_engine is not None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
            in_memory = sync_engine.url.database in (None, "", ":memory:")
            self._readers = (
                self._writer
                if in_memory
                else ThreadPoolExecutor(2, thread_name_prefix="sqlite-reader")
            )

    async def _write(self, work: Callable[[Session], T]) -> T:
        """Run `work` in a write transaction, committed when it returns."""
        if self._writer is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._writer, self._in_transaction, work)
        async with self._sessions.begin() as session:
            return await session.run_sync(work)

    async def _read(self, work: Callable[[Session], T]) -> T:
        """Run `work` with a session that only reads."""
        if self._readers is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._readers, self._in_session, work)
        async with self._sessions() as session:
            return await session.run_sync(work)

    def _in_transaction(self, work: Callable[[Session], T]) -> T:
        assert self._sync_sessions is not None
        with self._sync_sessions.begin() as session:
            return work(session)

    def _in_session(self, work: Callable[[Session], T]) -> T:
        assert self._sync_sessions is not None
        with self._sync_sessions() as session:
            return work(session)

    @classmethod
    async def open(cls, url: str, *, busy_timeout_ms: int = 5000, echo: bool = False) -> Store:
        """Connect and apply migrations; raises `StorageUnavailable` if it can't."""
        engine = create_engine(url, busy_timeout_ms=busy_timeout_ms, echo=echo)
        try:
            await migrate(engine)
        except (OperationalError, DBAPIError, OSError) as exc:
            await engine.dispose()
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        sync_engine = None
        if engine.dialect.name == "sqlite":
            sync_engine = create_sqlite_sync_engine(url, busy_timeout_ms=busy_timeout_ms, echo=echo)
        return cls(engine, sync_engine)

    async def close(self) -> None:
        for executor in {self._writer, self._readers} - {None}:
            assert executor is not None
            await asyncio.to_thread(executor.shutdown)
        if self._sync_engine is not None:
            await asyncio.to_thread(self._sync_engine.dispose)
        await self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @_guarded
    async def ping(self) -> None:
        await self._read(lambda session: session.execute(select(1)))

    # -- messages ---------------------------------------------------------------

    @staticmethod
    def _active_conversation(
        connection: Connection, platform: str, chat_id: str, owner: str
    ) -> int:
        key = {"platform": platform, "chat_id": chat_id, "owner": owner}
        found = connection.execute(_ACTIVE_CONVERSATION, key).scalar()
        if found is not None:
            return int(found)
        result = connection.execute(
            _INSERT_CONVERSATION, {**key, "active": True, "started_at": utcnow()}
        )
        return int(result.inserted_primary_key[0])

    @staticmethod
    def _insert_message(connection: Connection, **values: Any) -> StoredMessage:
        now = utcnow()
        result = connection.execute(_INSERT_MESSAGE, {"created_at": now, **values})
        return StoredMessage(
            int(result.inserted_primary_key[0]),
            values["conversation_id"],
            values["role"],
            values["text"],
            now,
        )

    @_guarded
    async def add_user_message(
        self,
        *,
        platform: str,
        chat_id: str,
        owner: str,
        user_id: str,
        user_name: str,
        text: str,
        platform_message_id: str | None = None,
    ) -> StoredMessage:
        """Commit a user's message to the conversation's active thread."""
        upsert = _UPSERT_USER[self.dialect]
        user = {
            "platform": platform,
            "user_id": user_id,
            "user_name": user_name,
            "created_at": utcnow(),
        }

        def work(session: Session) -> StoredMessage:
            connection = session.connection()
            if self.dialect == "postgresql":
                # Serialise get-or-create of the active conversation across processes.
                connection.execute(_XACT_LOCK, {"key": lock_key(platform, chat_id, owner)})
            connection.execute(upsert, user)
            conversation_id = self._active_conversation(connection, platform, chat_id, owner)
            return self._insert_message(
                connection,
                conversation_id=conversation_id,
                platform=platform,
                user_id=user_id,
                role="user",
                text=text,
                platform_message_id=platform_message_id,
                reply_to_id=None,
                turn_done=False,
            )

        return await self._write(work)

    @asynccontextmanager
    async def conversation_lock(
        self, platform: str, chat_id: str, owner: str, *, after: StoredMessage | None = None
    ) -> AsyncIterator[None]:
        """Hold a conversation's turn across processes (PostgreSQL advisory
        lock on a dedicated connection). With `after`, the turn of that user
        message also waits until every earlier message of its conversation has
        had its turn (`finish_turn`): another process may have committed an
        earlier message yet asked for the lock later. SQLite serves a single
        process, whose in-memory locks already order the turns: a no-op there."""
        if self.dialect != "postgresql":
            yield
            return
        key = {"key": lock_key(platform, chat_id, owner)}
        try:
            connection = await self.engine.connect()
        except (OperationalError, DBAPIError, OSError) as exc:
            raise StorageUnavailable(type(exc).__name__) from exc
        try:
            try:
                await connection.execute(_LOCK, key)
                if after is not None:
                    await self._wait_for_earlier_turns(connection, key, after)
            except (OperationalError, DBAPIError, OSError) as exc:
                raise StorageUnavailable(type(exc).__name__) from exc
            try:
                yield
            finally:
                await connection.execute(_UNLOCK, key)
                await connection.commit()
        finally:
            await connection.close()

    async def _wait_for_earlier_turns(
        self, connection: Any, key: dict[str, int], message: StoredMessage
    ) -> None:
        """With the lock held, make way while an earlier message's turn is
        not over: unlock, wait a little, lock again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TURN_WAIT_S
        pause = 0.01
        while True:
            pending = await connection.scalar(
                _EARLIER_TURN_PENDING,
                {
                    "conversation_id": message.conversation_id,
                    "message_id": message.id,
                    "since": utcnow() - TURN_ABANDONED_AFTER,
                },
            )
            if pending is None:
                return
            if loop.time() >= deadline:
                log.warning(
                    "message %s goes ahead of unfinished earlier message %s after %.0f s",
                    message.id,
                    pending,
                    TURN_WAIT_S,
                )
                return
            await connection.execute(_UNLOCK, key)
            await connection.commit()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
            await connection.execute(_LOCK, key)

    @_guarded
    async def finish_turn(self, message: StoredMessage) -> None:
        """Mark a user message's turn over without a stored reply (it failed or
        was cancelled), so later messages of its conversation stop waiting."""
        await self._write(
            lambda session: session.connection().execute(_FINISH_TURN, {"message_id": message.id})
        )

    @_guarded
    async def add_bot_message(
        self, *, reply_to: StoredMessage, platform: str, user_id: str, text: str
    ) -> StoredMessage:

        def work(session: Session) -> StoredMessage:
            connection = session.connection()
            connection.execute(_FINISH_TURN, {"message_id": reply_to.id})
            return self._insert_message(
                connection,
                conversation_id=reply_to.conversation_id,
                platform=platform,
                user_id=user_id,
                role="bot",
                text=text,
                reply_to_id=reply_to.id,
                platform_message_id=None,
            )

        return await self._write(work)

    @staticmethod
    def _history_rows(
        connection: Connection, conversation_id: int, before_id: int | None, limit: int
    ) -> list[Any]:
        params = {"conversation_id": conversation_id, "limit": limit}
        if before_id is None:
            return list(connection.execute(_HISTORY, params))
        return list(connection.execute(_HISTORY_BEFORE, {**params, "before_id": before_id}))

    @_guarded
    async def history(
        self, conversation_id: int, *, before_id: int | None = None, limit: int = 200
    ) -> list[StoredMessage]:
        """The newest `limit` messages of a thread in turn order (each reply
        right after the message it answers), oldest first, all anchored before
        `before_id` when given."""
        rows = await self._read(
            lambda session: self._history_rows(
                session.connection(), conversation_id, before_id, limit
            )
        )
        return [StoredMessage(*row) for row in reversed(rows)]

    @_guarded
    async def active_history(
        self, platform: str, chat_id: str, owner: str, *, limit: int = 200
    ) -> list[StoredMessage]:
        key = {"platform": platform, "chat_id": chat_id, "owner": owner}

        def work(session: Session) -> list[Any]:
            connection = session.connection()
            conversation_id = connection.execute(_ACTIVE_CONVERSATION, key).scalar()
            if conversation_id is None:
                return []
            return self._history_rows(connection, conversation_id, None, limit)

        rows = await self._read(work)
        return [StoredMessage(*row) for row in reversed(rows)]

    @_guarded
    async def reset(self, platform: str, chat_id: str, owner: str) -> bool:
        """Close the active thread; the next message starts a new one."""
        statement = (
            update(Conversation)
            .where(
                Conversation.platform == platform,
                Conversation.chat_id == chat_id,
                Conversation.owner == owner,
                Conversation.active.is_(True),
            )
            .values(active=False)
        )
        return await self._write(lambda session: bool(session.execute(statement).rowcount))

    # -- a person's data ------------------------------------------------------

    @_guarded
    async def export_user(self, platform: str, user_id: str) -> list[ExportedConversation]:
        """Every message from or to one person, grouped by conversation."""
        query = (
            select(Message, Conversation.chat_id, Conversation.started_at)
            .join(Conversation, Message.conversation_id == Conversation.id)
            .where(Message.platform == platform, Message.user_id == user_id)
            .order_by(Message.conversation_id, _turn_order, Message.id)
        )

        def work(session: Session) -> list[ExportedConversation]:
            conversations: dict[int, ExportedConversation] = {}
            for message, chat_id, started_at in session.execute(query):
                exported = conversations.setdefault(
                    message.conversation_id, ExportedConversation(chat_id, started_at)
                )
                exported.messages.append(_stored(message))
            return list(conversations.values())

        return await self._read(work)

    @_guarded
    async def forget_user(self, platform: str, user_id: str) -> ForgetResult:
        """Delete everything stored about one person; returns image files to remove."""

        def work(session: Session) -> ForgetResult:
            conversation_ids = set(
                session.scalars(
                    select(Message.conversation_id).where(
                        Message.platform == platform, Message.user_id == user_id
                    )
                ).all()
            )
            mine = (Message.platform == platform, Message.user_id == user_id)
            message_count = session.scalar(select(func.count()).select_from(Message).where(*mine))
            session.execute(delete(Message).where(*mine))
            emptied = 0
            for conversation_id in conversation_ids:
                remaining = session.scalar(
                    select(func.count())
                    .select_from(Message)
                    .where(Message.conversation_id == conversation_id)
                )
                if not remaining:
                    session.execute(delete(Conversation).where(Conversation.id == conversation_id))
                    emptied += 1
            session.execute(
                delete(Conversation).where(
                    Conversation.platform == platform, Conversation.owner == user_id
                )
            )
            image_paths = [
                path
                for path in session.scalars(
                    select(Draw.image_path).where(
                        Draw.platform == platform, Draw.user_id == user_id
                    )
                ).all()
                if path
            ]
            deleted_draws = session.execute(
                delete(Draw).where(Draw.platform == platform, Draw.user_id == user_id)
            )
            session.execute(delete(User).where(User.platform == platform, User.user_id == user_id))
            if platform == "web":
                session.execute(delete(WebSession).where(WebSession.user_id == user_id))
            return ForgetResult(
                messages=message_count or 0,
                conversations=emptied,
                draws=deleted_draws.rowcount or 0,
                image_paths=image_paths,
            )

        return await self._write(work)

    @_guarded
    async def user_stats(self, platform: str, user_id: str) -> UserStats:
        def work(session: Session) -> UserStats:
            counts = dict(
                session.execute(
                    select(Message.role, func.count())
                    .where(Message.platform == platform, Message.user_id == user_id)
                    .group_by(Message.role)
                ).all()
            )
            conversations = session.scalar(
                select(func.count(func.distinct(Message.conversation_id))).where(
                    Message.platform == platform, Message.user_id == user_id
                )
            )
            draws = session.scalar(
                select(func.count())
                .select_from(Draw)
                .where(Draw.platform == platform, Draw.user_id == user_id, Draw.status == "done")
            )
            first_seen = session.scalar(
                select(User.created_at).where(User.platform == platform, User.user_id == user_id)
            )
            return UserStats(
                messages=counts.get("user", 0),
                replies=counts.get("bot", 0),
                conversations=conversations or 0,
                draws=draws or 0,
                first_seen=first_seen,
            )

        return await self._read(work)

    # -- web sessions -----------------------------------------------------------

    @_guarded
    async def create_web_session(self, token_hash: str, user_id: str) -> None:
        await self._write(
            lambda session: session.add(WebSession(token_hash=token_hash, user_id=user_id))
        )

    @_guarded
    async def web_session_user(self, token_hash: str) -> str | None:
        query = select(WebSession.user_id).where(WebSession.token_hash == token_hash)
        return await self._read(lambda session: session.scalar(query))

    # -- draws ----------------------------------------------------------------

    @_guarded
    async def add_draw(
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
        await self._write(lambda session: session.add(draw))

    @_guarded
    async def finish_draw(
        self,
        public_id: str,
        *,
        status: str,
        image_path: str | None = None,
        error: str | None = None,
        seed: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> bool:
        """Record a draw's outcome; False when its row is gone (the user ran /forget)."""
        values: dict[str, Any] = {"status": status, "finished_at": utcnow()}
        if image_path is not None:
            values["image_path"] = image_path
        if error is not None:
            values["error"] = error
        if seed is not None:
            values["seed"] = seed
        if options is not None:
            values["options"] = options
        statement = update(Draw).where(Draw.public_id == public_id).values(**values)
        return await self._write(lambda session: bool(session.execute(statement).rowcount))

    @staticmethod
    def _limited_draws(query: Select[Any], platform: str, user_id: str, since: datetime) -> Any:
        return query.where(
            Draw.platform == platform,
            Draw.user_id == user_id,
            Draw.created_at >= since,
            Draw.status.in_(LIMITED_DRAW_STATUSES),
        )

    @_guarded
    async def count_draws_since(self, platform: str, user_id: str, since: datetime) -> int:
        """Draws that count against the hourly limit: queued, running, done or
        blocked by the safety checker (not cancelled, failed or refused as busy)."""
        query = self._limited_draws(
            select(func.count()).select_from(Draw), platform, user_id, since
        )
        return await self._read(lambda session: session.scalar(query) or 0)

    @_guarded
    async def draw_times_since(
        self, platform: str, user_id: str, since: datetime
    ) -> list[datetime]:
        """When each draw that counts against the limit (see `count_draws_since`) was made."""
        query = self._limited_draws(select(Draw.created_at), platform, user_id, since).order_by(
            Draw.created_at
        )
        return await self._read(lambda session: list(session.scalars(query).all()))

    @_guarded
    async def draw_image_path(self, public_id: str) -> str | None:
        query = select(Draw.image_path).where(Draw.public_id == public_id, Draw.status == "done")
        return await self._read(lambda session: session.scalar(query))

    @_guarded
    async def export_draws(self, platform: str, user_id: str) -> list[dict[str, Any]]:
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

        return await self._read(work)
