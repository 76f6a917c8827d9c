"""The store API: everything the bot persists goes through `Store`.

Every method is one short transaction. Database failures (down, locked past
the busy timeout) surface as `StorageUnavailable`, so the caller can tell a
user "try again" instead of crashing.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Select, delete, func, insert, select, update
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from storage.database import create_engine, migrate
from storage.models import Conversation, Draw, Message, User, WebSession, utcnow

P = ParamSpec("P")
T = TypeVar("T")


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


def _active(query: Select[Any], platform: str, chat_id: str, owner: str) -> Select[Any]:
    """Narrow a query to a conversation key's active (newest open) thread."""
    return (
        query.where(
            Conversation.platform == platform,
            Conversation.chat_id == chat_id,
            Conversation.owner == owner,
            Conversation.active.is_(True),
        )
        .order_by(Conversation.id.desc())
        .limit(1)
    )


_turn_order = func.coalesce(Message.reply_to_id, Message.id)


class Store:
    """Async persistence for users, conversations, messages, draws and web sessions."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite has one writer at a time. Queueing writes here, in arrival
        # order, beats letting them race for the file lock: under load the
        # losers would wait out the busy timeout and fail.
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction (serialised on SQLite)."""
        if self._write_lock is None:
            async with self._sessions.begin() as session:
                yield session
            return
        async with self._write_lock, self._sessions.begin() as session:
            yield session

    @classmethod
    async def open(cls, url: str, *, busy_timeout_ms: int = 5000, echo: bool = False) -> Store:
        """Connect and apply migrations; raises `StorageUnavailable` if it can't."""
        engine = create_engine(url, busy_timeout_ms=busy_timeout_ms, echo=echo)
        try:
            await migrate(engine)
        except (OperationalError, DBAPIError, OSError) as exc:
            await engine.dispose()
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @_guarded
    async def ping(self) -> None:
        async with self._sessions() as session:
            await session.execute(select(1))

    # -- messages ---------------------------------------------------------------

    # The message path runs for every message, so it uses Core statements
    # (no ORM objects) and as few round trips as it can.

    async def _active_conversation(
        self, session: AsyncSession, platform: str, chat_id: str, owner: str
    ) -> int:
        found = await session.scalar(_active(select(Conversation.id), platform, chat_id, owner))
        if found is not None:
            return found
        result = await session.execute(
            insert(Conversation).values(
                platform=platform, chat_id=chat_id, owner=owner, active=True, started_at=utcnow()
            )
        )
        return int(result.inserted_primary_key[0])

    def _upsert_user(self, platform: str, user_id: str, user_name: str) -> Any:
        """Create the user, or update their display name if it changed."""
        dialect_insert = postgresql_insert if self.dialect == "postgresql" else sqlite_insert
        statement = dialect_insert(User).values(
            platform=platform, user_id=user_id, user_name=user_name, created_at=utcnow()
        )
        return statement.on_conflict_do_update(
            index_elements=[User.platform, User.user_id],
            set_={"user_name": statement.excluded.user_name},
            where=(User.user_name != statement.excluded.user_name)
            & (statement.excluded.user_name != ""),
        )

    async def _insert_message(self, session: AsyncSession, **values: Any) -> StoredMessage:
        now = utcnow()
        result = await session.execute(insert(Message).values(created_at=now, **values))
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
        async with self._write() as session:
            if self.dialect == "postgresql":
                # Serialise get-or-create of the active conversation across processes.
                await session.execute(
                    sql("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": lock_key(platform, chat_id, owner)},
                )
            await session.execute(self._upsert_user(platform, user_id, user_name))
            conversation_id = await self._active_conversation(session, platform, chat_id, owner)
            return await self._insert_message(
                session,
                conversation_id=conversation_id,
                platform=platform,
                user_id=user_id,
                role="user",
                text=text,
                platform_message_id=platform_message_id,
                reply_to_id=None,
            )

    @asynccontextmanager
    async def conversation_lock(
        self, platform: str, chat_id: str, owner: str
    ) -> AsyncIterator[None]:
        """Hold a conversation's turn across processes (PostgreSQL advisory
        lock on a dedicated connection). SQLite serves a single process, whose
        in-memory locks already order the turns, so there it is a no-op."""
        if self.dialect != "postgresql":
            yield
            return
        key = lock_key(platform, chat_id, owner)
        try:
            connection = await self.engine.connect()
            await connection.execute(sql("SELECT pg_advisory_lock(:key)"), {"key": key})
        except (OperationalError, DBAPIError, OSError) as exc:
            raise StorageUnavailable(type(exc).__name__) from exc
        try:
            yield
        finally:
            try:
                await connection.execute(sql("SELECT pg_advisory_unlock(:key)"), {"key": key})
                await connection.commit()
            finally:
                await connection.close()

    @_guarded
    async def add_bot_message(
        self, *, reply_to: StoredMessage, platform: str, user_id: str, text: str
    ) -> StoredMessage:
        async with self._write() as session:
            return await self._insert_message(
                session,
                conversation_id=reply_to.conversation_id,
                platform=platform,
                user_id=user_id,
                role="bot",
                text=text,
                reply_to_id=reply_to.id,
                platform_message_id=None,
            )

    @_guarded
    async def history(
        self, conversation_id: int, *, before_id: int | None = None, limit: int = 200
    ) -> list[StoredMessage]:
        """The newest `limit` messages of a thread in turn order (each reply
        right after the message it answers), oldest first, all anchored before
        `before_id` when given."""
        query = select(
            Message.id, Message.conversation_id, Message.role, Message.text, Message.created_at
        ).where(Message.conversation_id == conversation_id)
        if before_id is not None:
            query = query.where(_turn_order < before_id)
        query = query.order_by(_turn_order.desc(), Message.id.desc()).limit(limit)
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [StoredMessage(*row) for row in reversed(rows)]

    @_guarded
    async def active_history(
        self, platform: str, chat_id: str, owner: str, *, limit: int = 200
    ) -> list[StoredMessage]:
        async with self._sessions() as session:
            conversation_id = await session.scalar(
                _active(select(Conversation.id), platform, chat_id, owner)
            )
        if conversation_id is None:
            return []
        return await self.history(conversation_id, limit=limit)

    @_guarded
    async def reset(self, platform: str, chat_id: str, owner: str) -> bool:
        """Close the active thread; the next message starts a new one."""
        async with self._write() as session:
            result = await session.execute(
                update(Conversation)
                .where(
                    Conversation.platform == platform,
                    Conversation.chat_id == chat_id,
                    Conversation.owner == owner,
                    Conversation.active.is_(True),
                )
                .values(active=False)
            )
            return bool(result.rowcount)

    # -- a person's data ------------------------------------------------------

    @_guarded
    async def export_user(self, platform: str, user_id: str) -> list[ExportedConversation]:
        """Every message from or to one person, grouped by conversation."""
        async with self._sessions() as session:
            rows = (
                await session.execute(
                    select(Message, Conversation.chat_id, Conversation.started_at)
                    .join(Conversation, Message.conversation_id == Conversation.id)
                    .where(Message.platform == platform, Message.user_id == user_id)
                    .order_by(Message.conversation_id, _turn_order, Message.id)
                )
            ).all()
        conversations: dict[int, ExportedConversation] = {}
        for message, chat_id, started_at in rows:
            exported = conversations.setdefault(
                message.conversation_id, ExportedConversation(chat_id, started_at)
            )
            exported.messages.append(_stored(message))
        return list(conversations.values())

    @_guarded
    async def forget_user(self, platform: str, user_id: str) -> ForgetResult:
        """Delete everything stored about one person; returns image files to remove."""
        async with self._write() as session:
            conversation_ids = set(
                (
                    await session.scalars(
                        select(Message.conversation_id).where(
                            Message.platform == platform, Message.user_id == user_id
                        )
                    )
                ).all()
            )
            mine = (Message.platform == platform, Message.user_id == user_id)
            message_count = await session.scalar(
                select(func.count()).select_from(Message).where(*mine)
            )
            await session.execute(delete(Message).where(*mine))
            emptied = 0
            for conversation_id in conversation_ids:
                remaining = await session.scalar(
                    select(func.count())
                    .select_from(Message)
                    .where(Message.conversation_id == conversation_id)
                )
                if not remaining:
                    await session.execute(
                        delete(Conversation).where(Conversation.id == conversation_id)
                    )
                    emptied += 1
            await session.execute(
                delete(Conversation).where(
                    Conversation.platform == platform, Conversation.owner == user_id
                )
            )
            image_paths = [
                path
                for path in (
                    await session.scalars(
                        select(Draw.image_path).where(
                            Draw.platform == platform, Draw.user_id == user_id
                        )
                    )
                ).all()
                if path
            ]
            deleted_draws = await session.execute(
                delete(Draw).where(Draw.platform == platform, Draw.user_id == user_id)
            )
            await session.execute(
                delete(User).where(User.platform == platform, User.user_id == user_id)
            )
            if platform == "web":
                await session.execute(delete(WebSession).where(WebSession.user_id == user_id))
        return ForgetResult(
            messages=message_count or 0,
            conversations=emptied,
            draws=deleted_draws.rowcount or 0,
            image_paths=image_paths,
        )

    @_guarded
    async def user_stats(self, platform: str, user_id: str) -> UserStats:
        async with self._sessions() as session:
            counts = dict(
                (
                    await session.execute(
                        select(Message.role, func.count())
                        .where(Message.platform == platform, Message.user_id == user_id)
                        .group_by(Message.role)
                    )
                ).all()
            )
            conversations = await session.scalar(
                select(func.count(func.distinct(Message.conversation_id))).where(
                    Message.platform == platform, Message.user_id == user_id
                )
            )
            draws = await session.scalar(
                select(func.count())
                .select_from(Draw)
                .where(Draw.platform == platform, Draw.user_id == user_id, Draw.status == "done")
            )
            first_seen = await session.scalar(
                select(User.created_at).where(User.platform == platform, User.user_id == user_id)
            )
        return UserStats(
            messages=counts.get("user", 0),
            replies=counts.get("bot", 0),
            conversations=conversations or 0,
            draws=draws or 0,
            first_seen=first_seen,
        )

    # -- web sessions -----------------------------------------------------------

    @_guarded
    async def create_web_session(self, token_hash: str, user_id: str) -> None:
        async with self._write() as session:
            session.add(WebSession(token_hash=token_hash, user_id=user_id))

    @_guarded
    async def web_session_user(self, token_hash: str) -> str | None:
        async with self._sessions() as session:
            return await session.scalar(
                select(WebSession.user_id).where(WebSession.token_hash == token_hash)
            )

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
        async with self._write() as session:
            session.add(
                Draw(
                    public_id=public_id,
                    platform=platform,
                    chat_id=chat_id,
                    user_id=user_id,
                    prompt=prompt,
                    options=options,
                    seed=seed,
                )
            )

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
        async with self._write() as session:
            result = await session.execute(
                update(Draw).where(Draw.public_id == public_id).values(**values)
            )
            return bool(result.rowcount)

    @_guarded
    async def count_draws_since(self, platform: str, user_id: str, since: datetime) -> int:
        """Draws that count against the hourly limit: queued, running, done or
        blocked by the safety checker (not cancelled, failed or refused as busy)."""
        async with self._sessions() as session:
            return (
                await session.scalar(
                    select(func.count())
                    .select_from(Draw)
                    .where(
                        Draw.platform == platform,
                        Draw.user_id == user_id,
                        Draw.created_at >= since,
                        Draw.status.in_(LIMITED_DRAW_STATUSES),
                    )
                )
                or 0
            )

    @_guarded
    async def draw_times_since(
        self, platform: str, user_id: str, since: datetime
    ) -> list[datetime]:
        """When each draw that counts against the limit (see `count_draws_since`) was made."""
        async with self._sessions() as session:
            return list(
                (
                    await session.scalars(
                        select(Draw.created_at)
                        .where(
                            Draw.platform == platform,
                            Draw.user_id == user_id,
                            Draw.created_at >= since,
                            Draw.status.in_(LIMITED_DRAW_STATUSES),
                        )
                        .order_by(Draw.created_at)
                    )
                ).all()
            )

    @_guarded
    async def draw_image_path(self, public_id: str) -> str | None:
        async with self._sessions() as session:
            return await session.scalar(
                select(Draw.image_path).where(Draw.public_id == public_id, Draw.status == "done")
            )

    @_guarded
    async def export_draws(self, platform: str, user_id: str) -> list[dict[str, Any]]:
        async with self._sessions() as session:
            rows: Sequence[Draw] = (
                await session.scalars(
                    select(Draw)
                    .where(Draw.platform == platform, Draw.user_id == user_id)
                    .order_by(Draw.id)
                )
            ).all()
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
