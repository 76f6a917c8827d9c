"""The message path's statements, built once on the Core tables with bound
parameters, so that SQLAlchemy reuses their compiled form for every message
(storage.conversations runs them; storage.turns and storage.people share a few).

A write that adds a message moves its conversation's `version` in a statement
it makes anyway: the lookup of the active conversation is an UPDATE ...
RETURNING (`TOUCH_ACTIVE`), and so is a reply's handoff check
(`TOUCH_FOR_REPLY`). storage.history relies on that.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from storage.models import Conversation, Message, User

messages_table: Table = Message.__table__  # type: ignore[assignment]
conversations_table: Table = Conversation.__table__  # type: ignore[assignment]
users: Table = User.__table__  # type: ignore[assignment]


def lock_key(platform: str, chat_id: str, owner: str) -> int:
    """A stable signed 64-bit key for PostgreSQL advisory locks."""
    digest = hashlib.blake2b(f"{platform}\x1f{chat_id}\x1f{owner}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


XACT_LOCK = sql("SELECT pg_advisory_xact_lock(:key)")
FINISH_TURN = (
    update(messages_table)
    .where(messages_table.c.id == bindparam("message_id"), messages_table.c.turn_done.is_(False))
    .values(turn_done=True)
)
INSERT_MESSAGE = insert(messages_table)
INSERT_CONVERSATION = insert(conversations_table)


def _active_of_key(prefix: str, *columns: Any) -> Any:
    """SELECT `columns` of the key's active conversation (the newest), the key
    bound as `{prefix}platform`, `{prefix}chat_id` and `{prefix}owner`."""
    return (
        select(*columns)
        .where(
            conversations_table.c.platform == bindparam(f"{prefix}platform"),
            conversations_table.c.chat_id == bindparam(f"{prefix}chat_id"),
            conversations_table.c.owner == bindparam(f"{prefix}owner"),
            conversations_table.c.active.is_(True),
        )
        .order_by(conversations_table.c.id.desc())
        .limit(1)
    )


ACTIVE_CONVERSATION = _active_of_key(
    "", conversations_table.c.id, conversations_table.c.handoff_state, conversations_table.c.address
)
version_column = conversations_table.c.version
#: A user message's conversation: the active one, its version moved (a
#: message follows in the same transaction) and its state read, in one statement.
TOUCH_ACTIVE = (
    update(conversations_table)
    .where(
        # (an UPDATE keeps the columns' own names for its SET clause)
        conversations_table.c.id
        == _active_of_key("key_", conversations_table.c.id).scalar_subquery()
    )
    .values(version=version_column + 1)
    .returning(conversations_table.c.id, conversations_table.c.handoff_state, version_column)
)
#: The same, also remembering where replies go.
TOUCH_ACTIVE_AT = TOUCH_ACTIVE.values(
    address=bindparam("address", type_=conversations_table.c.address.type)
)
#: A reply's conversation, its version moved, unless people hold it now.
TOUCH_FOR_REPLY = (
    update(conversations_table)
    .where(
        conversations_table.c.id == bindparam("conversation_id"),
        conversations_table.c.handoff_state == "bot",
    )
    .values(version=version_column + 1)
    .returning(version_column)
)
#: Any message's conversation, its version moved.
TOUCH = (
    update(conversations_table)
    .where(conversations_table.c.id == bindparam("conversation_id"))
    .values(version=version_column + 1)
    .returning(version_column)
)
VERSION = select(version_column).where(conversations_table.c.id == bindparam("conversation_id"))
BY_DEDUP_KEY = select(
    messages_table.c.id,
    messages_table.c.conversation_id,
    messages_table.c.role,
    messages_table.c.text,
    messages_table.c.created_at,
    messages_table.c.turn_done,
).where(messages_table.c.dedup_key == bindparam("dedup_key"))
#: A reply sorts right after the message it answers.
turn_order = func.coalesce(messages_table.c.reply_to_id, messages_table.c.id)
HISTORY_COLUMNS = select(
    messages_table.c.id,
    messages_table.c.conversation_id,
    messages_table.c.role,
    messages_table.c.text,
    messages_table.c.created_at,
    messages_table.c.author,
    messages_table.c.source,
).where(messages_table.c.conversation_id == bindparam("conversation_id"))
HISTORY_ORDER = (turn_order.desc(), messages_table.c.id.desc())
HISTORY = HISTORY_COLUMNS.order_by(*HISTORY_ORDER).limit(bindparam("limit"))
#: The newest messages with what they answer: what fills the in-memory turns.
RECENT = HISTORY.add_columns(messages_table.c.reply_to_id)
HISTORY_BEFORE = (
    HISTORY_COLUMNS.where(turn_order < bindparam("before_id"))
    .order_by(*HISTORY_ORDER)
    .limit(bindparam("limit"))
)
REPLIES_TO = (
    select(messages_table.c.text, messages_table.c.source)
    .where(messages_table.c.reply_to_id == bindparam("message_id"))
    .order_by(messages_table.c.id)
)


def upsert_user_statement(dialect_insert: Any) -> Any:
    """Create the user, or update their display name if it changed."""
    statement = dialect_insert(users)
    return statement.on_conflict_do_update(
        index_elements=[users.c.platform, users.c.user_id],
        set_={"user_name": statement.excluded.user_name},
        where=(users.c.user_name != statement.excluded.user_name)
        & (statement.excluded.user_name != ""),
    )


UPSERT_USER = {
    "sqlite": upsert_user_statement(sqlite_insert),
    "postgresql": upsert_user_statement(postgresql_insert),
}
INSERT_DEDUPED = {
    "sqlite": sqlite_insert(messages_table).on_conflict_do_nothing(index_elements=["dedup_key"]),
    "postgresql": postgresql_insert(messages_table).on_conflict_do_nothing(
        index_elements=["dedup_key"]
    ),
}
