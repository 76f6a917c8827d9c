"""Conversations, their messages and turns: the aggregate every message touches.

A conversation is one thread of history for `(platform, chat_id, owner)`
(`owner` = "" when a whole chat shares it); `/reset` closes it. A user
message is committed with `turn_done = False` and its turn ends when a reply
is stored or `finish_turn` is called. The message path runs for every message,
so its statements are built once, on the Core tables, with bound parameters:
SQLAlchemy then reuses their compiled form instead of rebuilding them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.base import (
    DATABASE_ERRORS,
    Repository,
    StorageUnavailable,
    guarded,
    inserted_id,
    iso,
    rows_affected,
)
from storage.models import Conversation, Message, User, utcnow

_messages: Table = Message.__table__  # type: ignore[assignment]
_conversations: Table = Conversation.__table__  # type: ignore[assignment]
_users: Table = User.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    text: str
    created_at: datetime
    author: str | None = None
    source: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, str]:
        """The export form: `{"role", "text", "at"}`."""
        return {"role": self.role, "text": self.text, "at": iso(self.created_at)}


@dataclass(frozen=True, slots=True)
class Intake:
    """What storing a user message found."""

    message: StoredMessage
    #: The platform message was stored before (a redelivery or a retry).
    duplicate: bool
    #: Whether that earlier copy's turn is over (answered, failed or cancelled).
    answered: bool
    #: The conversation's handoff state as of this message: "bot", "waiting", "claimed".
    handoff_state: str


@dataclass(frozen=True, slots=True)
class PendingTurn:
    """A user message whose turn never ended (its process died, say)."""

    message: StoredMessage
    platform: str
    chat_id: str
    owner: str
    user_id: str
    handled_by: str | None


@dataclass(frozen=True, slots=True)
class ConversationPlace:
    """Which conversation, and where its replies go on its platform."""

    id: int
    platform: str
    chat_id: str
    owner: str
    #: {"chat_id", "user_id", "thread_id"} as of the user's latest message ({} if none).
    address: dict[str, str]


def lock_key(platform: str, chat_id: str, owner: str) -> int:
    """A stable signed 64-bit key for PostgreSQL advisory locks."""
    digest = hashlib.blake2b(f"{platform}\x1f{chat_id}\x1f{owner}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_XACT_LOCK = sql("SELECT pg_advisory_xact_lock(:key)")
_LOCK = sql("SELECT pg_advisory_lock(:key)")
_UNLOCK = sql("SELECT pg_advisory_unlock(:key)")
_FINISH_TURN = (
    update(_messages)
    .where(_messages.c.id == bindparam("message_id"), _messages.c.turn_done.is_(False))
    .values(turn_done=True)
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
    select(_conversations.c.id, _conversations.c.handoff_state, _conversations.c.address)
    .where(
        _conversations.c.platform == bindparam("platform"),
        _conversations.c.chat_id == bindparam("chat_id"),
        _conversations.c.owner == bindparam("owner"),
        _conversations.c.active.is_(True),
    )
    .order_by(_conversations.c.id.desc())
    .limit(1)
)
_SET_ADDRESS = (
    update(_conversations)
    .where(_conversations.c.id == bindparam("conversation_id"))
    .values(address=bindparam("address"))
)
_BY_DEDUP_KEY = select(
    _messages.c.id,
    _messages.c.conversation_id,
    _messages.c.role,
    _messages.c.text,
    _messages.c.created_at,
    _messages.c.turn_done,
).where(_messages.c.dedup_key == bindparam("dedup_key"))
#: A reply sorts right after the message it answers.
turn_order = func.coalesce(_messages.c.reply_to_id, _messages.c.id)
_HISTORY_COLUMNS = select(
    _messages.c.id,
    _messages.c.conversation_id,
    _messages.c.role,
    _messages.c.text,
    _messages.c.created_at,
    _messages.c.author,
    _messages.c.source,
).where(_messages.c.conversation_id == bindparam("conversation_id"))
_HISTORY_ORDER = (turn_order.desc(), _messages.c.id.desc())
_HISTORY = _HISTORY_COLUMNS.order_by(*_HISTORY_ORDER).limit(bindparam("limit"))
_HISTORY_BEFORE = (
    _HISTORY_COLUMNS.where(turn_order < bindparam("before_id"))
    .order_by(*_HISTORY_ORDER)
    .limit(bindparam("limit"))
)
_REPLIES_TO = (
    select(_messages.c.text, _messages.c.source)
    .where(_messages.c.reply_to_id == bindparam("message_id"))
    .order_by(_messages.c.id)
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
_INSERT_DEDUPED = {
    "sqlite": sqlite_insert(_messages).on_conflict_do_nothing(index_elements=["dedup_key"]),
    "postgresql": postgresql_insert(_messages).on_conflict_do_nothing(index_elements=["dedup_key"]),
}


def _insert_message(connection: Connection, statement: Any, **values: Any) -> StoredMessage | None:
    now = utcnow()
    result = connection.execute(statement, {"created_at": now, **values})
    if not rows_affected(result):
        return None
    return StoredMessage(
        inserted_id(result),
        values["conversation_id"],
        values["role"],
        values["text"],
        now,
        values.get("author"),
        values.get("source"),
    )


def _history_rows(
    connection: Connection, conversation_id: int, before_id: int | None, limit: int
) -> list[Any]:
    params = {"conversation_id": conversation_id, "limit": limit}
    if before_id is None:
        return list(connection.execute(_HISTORY, params))
    return list(connection.execute(_HISTORY_BEFORE, {**params, "before_id": before_id}))


class TurnLock:
    """A conversation's turn held across processes. On PostgreSQL an advisory
    lock on a dedicated connection; on SQLite (one process, whose in-memory
    locks order the turns) it holds nothing."""

    def __init__(self, connection: AsyncConnection | None, key: dict[str, int]) -> None:
        self._connection = connection
        self._key = key

    async def earlier_turn_pending(self, message: StoredMessage, since: datetime) -> int | None:
        """The id of an earlier user message of the conversation, newer than
        `since`, whose turn is not over (another process may have committed it
        yet asked for the lock later); None when there is none."""
        if self._connection is None:
            return None
        try:
            found = await self._connection.scalar(
                _EARLIER_TURN_PENDING,
                {
                    "conversation_id": message.conversation_id,
                    "message_id": message.id,
                    "since": since,
                },
            )
        except DATABASE_ERRORS as exc:
            raise StorageUnavailable(type(exc).__name__) from exc
        return int(found) if found is not None else None

    async def make_way(self, seconds: float) -> None:
        """Let another process take the turn for `seconds`, then take it back."""
        if self._connection is None:
            await asyncio.sleep(seconds)
            return
        try:
            await self._connection.execute(_UNLOCK, self._key)
            await self._connection.commit()
            await asyncio.sleep(seconds)
            await self._connection.execute(_LOCK, self._key)
        except DATABASE_ERRORS as exc:
            raise StorageUnavailable(type(exc).__name__) from exc


class Conversations(Repository):
    """Threads of history, their messages and the turn of each user message."""

    @guarded
    async def add_user_message(
        self,
        *,
        platform: str,
        chat_id: str,
        owner: str,
        user_id: str,
        user_name: str,
        text: str,
        address: dict[str, str] | None = None,
        dedup_key: str | None = None,
        handled_by: str | None = None,
    ) -> Intake:
        """Commit a user's message to the conversation's active thread and
        remember where replies go. A message whose `dedup_key` was stored
        before is not stored again: the earlier copy is returned."""
        upsert = _UPSERT_USER[self.dialect]
        insert_message = _INSERT_DEDUPED[self.dialect] if dedup_key else _INSERT_MESSAGE
        user = {
            "platform": platform,
            "user_id": user_id,
            "user_name": user_name,
            "created_at": utcnow(),
        }
        key = {"platform": platform, "chat_id": chat_id, "owner": owner}

        def work(connection: Connection) -> Intake:
            if self.dialect == "postgresql":
                # Serialise get-or-create of the active conversation across processes.
                connection.execute(_XACT_LOCK, {"key": lock_key(platform, chat_id, owner)})
            connection.execute(upsert, user)
            found = connection.execute(_ACTIVE_CONVERSATION, key).first()
            if found is None:
                result = connection.execute(
                    _INSERT_CONVERSATION,
                    {**key, "active": True, "started_at": utcnow(), "address": address},
                )
                conversation_id, state = inserted_id(result), "bot"
            else:
                conversation_id, state = int(found.id), str(found.handoff_state)
                if address is not None and found.address != address:
                    connection.execute(
                        _SET_ADDRESS, {"conversation_id": conversation_id, "address": address}
                    )
            stored = _insert_message(
                connection,
                insert_message,
                conversation_id=conversation_id,
                platform=platform,
                chat_id=chat_id,
                user_id=user_id,
                role="user",
                text=text,
                dedup_key=dedup_key,
                reply_to_id=None,
                turn_done=False,
                handled_by=handled_by,
            )
            if stored is not None:
                return Intake(stored, duplicate=False, answered=False, handoff_state=state)
            row = connection.execute(_BY_DEDUP_KEY, {"dedup_key": dedup_key}).one()
            earlier = StoredMessage(row.id, row.conversation_id, row.role, row.text, row.created_at)
            return Intake(
                earlier, duplicate=True, answered=bool(row.turn_done), handoff_state=state
            )

        return await self.db.write_rows(work)

    @asynccontextmanager
    async def turn_lock(self, platform: str, chat_id: str, owner: str) -> AsyncIterator[TurnLock]:
        """Hold a conversation's turn across processes (see `TurnLock`)."""
        key = {"key": lock_key(platform, chat_id, owner)}
        if self.dialect != "postgresql":
            yield TurnLock(None, key)
            return
        try:
            connection = await self.db.engine.connect()
        except DATABASE_ERRORS as exc:
            raise StorageUnavailable(type(exc).__name__) from exc
        try:
            try:
                await connection.execute(_LOCK, key)
            except DATABASE_ERRORS as exc:
                raise StorageUnavailable(type(exc).__name__) from exc
            try:
                yield TurnLock(connection, key)
            finally:
                try:
                    await connection.execute(_UNLOCK, key)
                    await connection.commit()
                except DATABASE_ERRORS:
                    pass  # the connection is gone, and with it the lock
        finally:
            try:
                await connection.close()
            except DATABASE_ERRORS:
                pass

    @guarded
    async def finish_turn(self, message: StoredMessage) -> None:
        """Mark a user message's turn over without a stored reply (it failed, was
        cancelled, or a person answers it), so later messages stop waiting."""
        await self.db.write_rows(
            lambda connection: connection.execute(_FINISH_TURN, {"message_id": message.id})
        )

    @guarded
    async def add_bot_message(
        self,
        *,
        reply_to: StoredMessage,
        platform: str,
        user_id: str,
        text: str,
        source: dict[str, Any] | None = None,
        tokens: int | None = None,
    ) -> StoredMessage | None:
        """Store the reply to a user message, which ends its turn. None when the
        turn was over already (another process answered it): nothing is stored."""

        def work(connection: Connection) -> StoredMessage | None:
            if not rows_affected(connection.execute(_FINISH_TURN, {"message_id": reply_to.id})):
                return None
            return _insert_message(
                connection,
                _INSERT_MESSAGE,
                conversation_id=reply_to.conversation_id,
                platform=platform,
                user_id=user_id,
                role="bot",
                text=text,
                reply_to_id=reply_to.id,
                source=source,
                tokens=tokens,
            )

        return await self.db.write_rows(work)

    @guarded
    async def add_operator_message(
        self, *, conversation_id: int, platform: str, user_id: str, operator: str, text: str
    ) -> StoredMessage:
        """Store what a person wrote into a conversation."""

        def work(connection: Connection) -> StoredMessage:
            stored = _insert_message(
                connection,
                _INSERT_MESSAGE,
                conversation_id=conversation_id,
                platform=platform,
                user_id=user_id,
                role="operator",
                text=text,
                author=operator,
                reply_to_id=None,
                source={"kind": "operator"},
            )
            assert stored is not None
            return stored

        return await self.db.write_rows(work)

    @guarded
    async def replies_to(self, message: StoredMessage) -> list[tuple[str, dict[str, Any] | None]]:
        """The stored replies (text, source) to one user message."""
        query = _REPLIES_TO

        def work(connection: Connection) -> list[tuple[str, dict[str, Any] | None]]:
            rows = connection.execute(query, {"message_id": message.id})
            return [(row.text, row.source) for row in rows]

        return await self.db.read_rows(work)

    @guarded
    async def history(
        self, conversation_id: int, *, before_id: int | None = None, limit: int = 200
    ) -> list[StoredMessage]:
        """The newest `limit` messages of a thread in turn order (each reply
        right after the message it answers), oldest first, all anchored before
        `before_id` when given."""
        rows = await self.db.read_rows(
            lambda connection: _history_rows(connection, conversation_id, before_id, limit)
        )
        return [StoredMessage(*row) for row in reversed(rows)]

    @guarded
    async def active_history(
        self, platform: str, chat_id: str, owner: str, *, limit: int = 200
    ) -> list[StoredMessage]:
        key = {"platform": platform, "chat_id": chat_id, "owner": owner}

        def work(connection: Connection) -> list[Any]:
            found = connection.execute(_ACTIVE_CONVERSATION, key).first()
            if found is None:
                return []
            return _history_rows(connection, found.id, None, limit)

        rows = await self.db.read_rows(work)
        return [StoredMessage(*row) for row in reversed(rows)]

    @guarded
    async def locate(self, conversation_id: int) -> ConversationPlace | None:
        """A conversation's key and the address stored with it, or None if it is gone."""
        query = select(
            _conversations.c.platform,
            _conversations.c.chat_id,
            _conversations.c.owner,
            _conversations.c.address,
        ).where(_conversations.c.id == conversation_id)

        def work(connection: Connection) -> ConversationPlace | None:
            row = connection.execute(query).first()
            if row is None:
                return None
            return ConversationPlace(
                conversation_id, row.platform, row.chat_id, row.owner, dict(row.address or {})
            )

        return await self.db.read_rows(work)

    @guarded
    async def ensure_active(
        self, platform: str, chat_id: str, owner: str, address: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """The active conversation's id and handoff state, created if there is none."""
        key = {"platform": platform, "chat_id": chat_id, "owner": owner}

        def work(connection: Connection) -> tuple[int, str]:
            if self.dialect == "postgresql":
                connection.execute(_XACT_LOCK, {"key": lock_key(platform, chat_id, owner)})
            found = connection.execute(_ACTIVE_CONVERSATION, key).first()
            if found is not None:
                return int(found.id), str(found.handoff_state)
            result = connection.execute(
                _INSERT_CONVERSATION,
                {**key, "active": True, "started_at": utcnow(), "address": address},
            )
            return inserted_id(result), "bot"

        return await self.db.write_rows(work)

    @guarded
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
        return await self.db.write_rows(
            lambda connection: bool(rows_affected(connection.execute(statement)))
        )

    @guarded
    async def pending_turns(self, *, since: datetime, limit: int = 500) -> list[PendingTurn]:
        """User messages newer than `since` whose turn never ended, oldest first."""
        query = (
            select(
                _messages.c.id,
                _messages.c.conversation_id,
                _messages.c.role,
                _messages.c.text,
                _messages.c.created_at,
                _messages.c.user_id,
                _messages.c.handled_by,
                _conversations.c.platform,
                _conversations.c.chat_id,
                _conversations.c.owner,
            )
            .join(_conversations, _messages.c.conversation_id == _conversations.c.id)
            .where(
                _messages.c.turn_done.is_(False),
                _messages.c.role == "user",
                _messages.c.created_at > since,
            )
            .order_by(_messages.c.id)
            .limit(limit)
        )

        def work(connection: Connection) -> list[PendingTurn]:
            return [
                PendingTurn(
                    StoredMessage(row.id, row.conversation_id, row.role, row.text, row.created_at),
                    platform=row.platform,
                    chat_id=row.chat_id,
                    owner=row.owner,
                    user_id=row.user_id,
                    handled_by=row.handled_by,
                )
                for row in connection.execute(query)
            ]

        return await self.db.read_rows(work)

    @guarded
    async def take_over_turn(self, message_id: int, previous: str | None, instance: str) -> bool:
        """Claim a pending turn from the process that owned it (compare and
        set, so of several processes exactly one wins)."""
        owner = _messages.c.handled_by
        statement = (
            update(_messages)
            .where(
                _messages.c.id == message_id,
                _messages.c.turn_done.is_(False),
                owner.is_(None) if previous is None else owner == previous,
            )
            .values(handled_by=instance)
        )
        return await self.db.write_rows(
            lambda connection: bool(rows_affected(connection.execute(statement)))
        )

    @guarded
    async def expire_turns(self, *, before: datetime) -> int:
        """End the turns of user messages older than `before` that never got one."""
        statement = (
            update(_messages)
            .where(
                _messages.c.turn_done.is_(False),
                _messages.c.role == "user",
                _messages.c.created_at <= before,
            )
            .values(turn_done=True)
        )
        return await self.db.write_rows(
            lambda connection: rows_affected(connection.execute(statement))
        )
