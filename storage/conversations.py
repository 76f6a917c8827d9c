"""Conversations and their messages: the aggregate every message touches.

A conversation is one thread of history for `(platform, chat_id, owner)`
(`owner` = "" when a whole chat shares it); `/reset` closes it. A user
message is committed with `turn_done = False`; storing its reply ends its
turn (storage.turns has the rest of the turn's primitives). The message
path runs for every message, so its statements are built once, on the Core
tables, with bound parameters: SQLAlchemy then reuses their compiled form
instead of rebuilding them.

Every write that adds a message also moves its conversation's `version` (in
the statement that looks the conversation up, or checks its handoff state),
which keeps `recent` (storage.history) honest: the prompt's turns come from
memory instead of being read back for every reply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from storage.base import (
    Repository,
    Transactions,
    aware,
    guarded,
    inserted_id,
    iso,
    rows_affected,
)
from storage.history import FILL_SLACK, RecentTurns, turn_key
from storage.models import Conversation, utcnow
from storage.statements import (
    ACTIVE_CONVERSATION,
    BY_DEDUP_KEY,
    FINISH_TURN,
    HISTORY,
    HISTORY_BEFORE,
    INSERT_CONVERSATION,
    INSERT_DEDUPED,
    INSERT_MESSAGE,
    RECENT,
    REPLIES_TO,
    TOUCH,
    TOUCH_ACTIVE,
    TOUCH_ACTIVE_AT,
    TOUCH_FOR_REPLY,
    UPSERT_USER,
    VERSION,
    XACT_LOCK,
    conversations_table,
    lock_key,
)


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
class ConversationPlace:
    """Which conversation, and where its replies go on its platform."""

    id: int
    platform: str
    chat_id: str
    owner: str
    #: {"chat_id", "user_id", "thread_id"} as of the user's latest message ({} if none).
    address: dict[str, str]


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


def _stored(*columns: Any) -> StoredMessage:
    """A history row as a message, its time in UTC with its zone (as written)."""
    message = StoredMessage(*columns)
    if message.created_at.tzinfo is None:  # SQLite's are naive UTC
        return dataclasses.replace(message, created_at=aware(message.created_at))
    return message


def _history_rows(
    connection: Connection, conversation_id: int, before_id: int | None, limit: int
) -> list[Any]:
    params = {"conversation_id": conversation_id, "limit": limit}
    if before_id is None:
        return list(connection.execute(HISTORY, params))
    return list(connection.execute(HISTORY_BEFORE, {**params, "before_id": before_id}))


class Conversations(Repository):
    """Threads of history, their messages and the turn of each user message.

    `recent` keeps the newest turns of the conversations this process serves
    (storage.history): every write here tells it what changed, and
    `recent_history` reads from it when it is known to be current.
    """

    def __init__(self, db: Transactions, recent: RecentTurns | None = None) -> None:
        super().__init__(db)
        self.recent = recent if recent is not None else RecentTurns(0)

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
        upsert = UPSERT_USER[self.dialect]
        insert_message = INSERT_DEDUPED[self.dialect] if dedup_key else INSERT_MESSAGE
        user = {
            "platform": platform,
            "user_id": user_id,
            "user_name": user_name,
            "created_at": utcnow(),
        }
        key = {"platform": platform, "chat_id": chat_id, "owner": owner}
        touch = TOUCH_ACTIVE if address is None else TOUCH_ACTIVE_AT
        touch_params: dict[str, Any] = {
            "key_platform": platform,
            "key_chat_id": chat_id,
            "key_owner": owner,
        }
        if address is not None:
            touch_params["address"] = address

        thread = (platform, chat_id, owner)
        # Their users row is there, as written, if nobody else wrote here since.
        known = self.recent.known_user(thread, (user_id, user_name))

        def work(connection: Connection) -> tuple[Intake, _Touched]:
            if self.dialect == "postgresql":
                # Serialise get-or-create of the active conversation across processes.
                connection.execute(XACT_LOCK, {"key": lock_key(platform, chat_id, owner)})
            found = connection.execute(touch, touch_params).first()
            if found is None:
                values = {**key, "active": True, "started_at": utcnow(), "address": address}
                result = connection.execute(INSERT_CONVERSATION, {**values, "version": 1})
                touched = _Touched(inserted_id(result), 1, created=True)
                state = "bot"
            else:
                touched = _Touched(int(found.id), int(found.version))
                state = str(found.handoff_state)
            if known != (touched.conversation_id, touched.version - 1):
                connection.execute(upsert, user)
            stored = _insert_message(
                connection,
                insert_message,
                conversation_id=touched.conversation_id,
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
                return Intake(stored, False, False, state), touched
            row = connection.execute(BY_DEDUP_KEY, {"dedup_key": dedup_key}).one()
            earlier = StoredMessage(row.id, row.conversation_id, row.role, row.text, row.created_at)
            return Intake(earlier, True, bool(row.turn_done), state), touched

        try:
            intake, touched = await self.db.write_rows(work)
        except BaseException:
            self.recent.drop_key(thread)  # committed or not: not known
            raise
        if touched.created:
            self.recent.started(thread, touched.conversation_id, touched.version - 1)
        added = None if intake.duplicate else intake.message
        touched.tell(self.recent, added, key=thread, user=(user_id, user_name))
        return intake

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
        """Store the reply to a user message, which ends its turn. None, and
        nothing stored, when the turn was over already (another process
        answered it) or people hold the conversation now (an operator claimed
        it while the reply was being written): the bot never answers over them."""
        conversation_id = reply_to.conversation_id

        def work(connection: Connection) -> tuple[StoredMessage, _Touched] | None:
            if not rows_affected(connection.execute(FINISH_TURN, {"message_id": reply_to.id})):
                return None
            version = connection.execute(
                TOUCH_FOR_REPLY, {"conversation_id": conversation_id}
            ).scalar()
            if version is None:  # people hold it (or it is gone)
                return None
            stored = _insert_message(
                connection,
                INSERT_MESSAGE,
                conversation_id=conversation_id,
                platform=platform,
                user_id=user_id,
                role="bot",
                text=text,
                reply_to_id=reply_to.id,
                source=source,
                tokens=tokens,
            )
            assert stored is not None
            return stored, _Touched(conversation_id, int(version))

        try:
            done = await self.db.write_rows(work)
        except BaseException:
            self.recent.drop(conversation_id)
            raise
        if done is None:
            return None
        stored, touched = done
        touched.tell(self.recent, stored, reply_to_id=reply_to.id)
        return stored

    @guarded
    async def add_operator_message(
        self, *, conversation_id: int, platform: str, user_id: str, operator: str, text: str
    ) -> StoredMessage:
        """Store what a person wrote into a conversation."""

        def work(connection: Connection) -> tuple[StoredMessage, int | None]:
            version = connection.execute(TOUCH, {"conversation_id": conversation_id}).scalar()
            stored = _insert_message(
                connection,
                INSERT_MESSAGE,
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
            return stored, version

        try:
            stored, version = await self.db.write_rows(work)
        except BaseException:
            self.recent.drop(conversation_id)
            raise
        if version is not None:
            _Touched(conversation_id, int(version)).tell(self.recent, stored)
        return stored

    @guarded
    async def replies_to(self, message: StoredMessage) -> list[tuple[str, dict[str, Any] | None]]:
        """The stored replies (text, source) to one user message."""
        query = REPLIES_TO

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
        `before_id` when given. Always read from the database."""
        rows = await self.db.read_rows(
            lambda connection: _history_rows(connection, conversation_id, before_id, limit)
        )
        return [_stored(*row) for row in reversed(rows)]

    @guarded
    async def recent_history(
        self, conversation_id: int, *, before_id: int | None = None, limit: int = 200
    ) -> list[StoredMessage]:
        """What `history` reads, from the newest turns kept in memory when they
        are known to be current (on PostgreSQL, where other processes write
        too, after reading the conversation's version); else read, and kept."""
        recent = self.recent
        if not recent.capacity:
            return await self.history(conversation_id, before_id=before_id, limit=limit)
        recent.wants(conversation_id, limit)
        held = recent.version(conversation_id)
        if held is not None and self.dialect != "sqlite":
            current = await self.db.read_rows(
                lambda connection: connection.execute(
                    VERSION, {"conversation_id": conversation_id}
                ).scalar()
            )
            if current != held:
                recent.drop(conversation_id)
        found = recent.read(conversation_id, before_id, limit)
        if found is not None:
            return found
        asked = limit + FILL_SLACK
        version, rows = await self.db.read_rows(
            lambda connection: _recent_rows(connection, conversation_id, asked)
        )
        if version is None:  # the conversation is gone
            return []
        recent.fill(conversation_id, version, rows, asked=asked)
        found = recent.peek(conversation_id, before_id, limit)
        if found is None:  # more than FILL_SLACK messages sort after `before_id`
            return await self.history(conversation_id, before_id=before_id, limit=limit)
        return found

    @guarded
    async def active_history(
        self, platform: str, chat_id: str, owner: str, *, limit: int = 200
    ) -> list[StoredMessage]:
        key = {"platform": platform, "chat_id": chat_id, "owner": owner}

        def work(connection: Connection) -> list[Any]:
            found = connection.execute(ACTIVE_CONVERSATION, key).first()
            if found is None:
                return []
            return _history_rows(connection, found.id, None, limit)

        rows = await self.db.read_rows(work)
        return [_stored(*row) for row in reversed(rows)]

    @guarded
    async def locate(self, conversation_id: int) -> ConversationPlace | None:
        """A conversation's key and the address stored with it, or None if it is gone."""
        query = select(
            conversations_table.c.platform,
            conversations_table.c.chat_id,
            conversations_table.c.owner,
            conversations_table.c.address,
        ).where(conversations_table.c.id == conversation_id)

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

        def work(connection: Connection) -> tuple[int, str, bool]:
            if self.dialect == "postgresql":
                connection.execute(XACT_LOCK, {"key": lock_key(platform, chat_id, owner)})
            found = connection.execute(ACTIVE_CONVERSATION, key).first()
            if found is not None:
                return int(found.id), str(found.handoff_state), False
            result = connection.execute(
                INSERT_CONVERSATION,
                {**key, "active": True, "started_at": utcnow(), "address": address},
            )
            return inserted_id(result), "bot", True

        conversation_id, state, created = await self.db.write_rows(work)
        if created:
            self.recent.started((platform, chat_id, owner), conversation_id, 0)
        return conversation_id, state

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
        self.recent.drop_key((platform, chat_id, owner))
        return await self.db.write_rows(
            lambda connection: bool(rows_affected(connection.execute(statement)))
        )


@dataclass(frozen=True, slots=True)
class _Touched:
    """A write moved this conversation to `version` (from `version - 1`)."""

    conversation_id: int
    version: int
    created: bool = False

    def tell(
        self,
        recent: RecentTurns,
        added: StoredMessage | None,
        *,
        reply_to_id: int | None = None,
        key: tuple[str, str, str] | None = None,
        user: tuple[str, str] | None = None,
    ) -> None:
        recent.wrote(
            self.conversation_id,
            self.version - 1,
            self.version,
            added,
            reply_to_id,
            key=key,
            user=user,
        )


def _recent_rows(
    connection: Connection, conversation_id: int, limit: int
) -> tuple[int | None, list[tuple[tuple[int, int], StoredMessage]]]:
    """The conversation's version, then (so that they are at least as new) its
    newest `limit` messages with their sort keys."""
    version = connection.execute(VERSION, {"conversation_id": conversation_id}).scalar()
    if version is None:
        return None, []
    rows = connection.execute(RECENT, {"conversation_id": conversation_id, "limit": limit})
    out = []
    for *columns, reply_to_id in rows:
        message = _stored(*columns)
        out.append((turn_key(message, reply_to_id), message))
    return int(version), out
