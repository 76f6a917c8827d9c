"""Turns: a committed user message waits for, takes and ends its turn.

A user message is stored with `turn_done = False`; its turn ends when a reply
is stored (storage.conversations) or `finish` is called. On PostgreSQL a
conversation's turn is held across processes by an advisory lock
(`TurnLock`); the policy of how long to wait is the bot's (bot.turns).
Messages whose turn never ended — their process died — are found with
`pending` and taken over with `take_over` (bot.recovery).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy import text as sql
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.base import DATABASE_ERRORS, Repository, StorageUnavailable, guarded, rows_affected
from storage.conversations import StoredMessage
from storage.statements import FINISH_TURN, conversations_table, lock_key, messages_table

_LOCK = sql("SELECT pg_advisory_lock(:key)")
_UNLOCK = sql("SELECT pg_advisory_unlock(:key)")
_EARLIER_TURN_PENDING = (
    select(messages_table.c.id)
    .where(
        messages_table.c.conversation_id == bindparam("conversation_id"),
        messages_table.c.id < bindparam("message_id"),
        messages_table.c.role == "user",
        messages_table.c.turn_done.is_(False),
        messages_table.c.created_at > bindparam("since"),
    )
    .limit(1)
)


@dataclass(frozen=True, slots=True)
class PendingTurn:
    """A user message whose turn never ended (its process died, say)."""

    message: StoredMessage
    platform: str
    chat_id: str
    owner: str
    user_id: str
    handled_by: str | None


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


class Turns(Repository):
    @asynccontextmanager
    async def lock(self, platform: str, chat_id: str, owner: str) -> AsyncIterator[TurnLock]:
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
    async def finish(self, message: StoredMessage) -> None:
        """Mark a user message's turn over without a stored reply (it failed, was
        cancelled, or a person answers it), so later messages stop waiting."""
        await self.db.write_rows(
            lambda connection: connection.execute(FINISH_TURN, {"message_id": message.id})
        )

    @guarded
    async def pending(self, *, since: datetime, limit: int = 500) -> list[PendingTurn]:
        """User messages newer than `since` whose turn never ended, oldest first."""
        query = (
            select(
                messages_table.c.id,
                messages_table.c.conversation_id,
                messages_table.c.role,
                messages_table.c.text,
                messages_table.c.created_at,
                messages_table.c.user_id,
                messages_table.c.handled_by,
                conversations_table.c.platform,
                conversations_table.c.chat_id,
                conversations_table.c.owner,
            )
            .join(conversations_table, messages_table.c.conversation_id == conversations_table.c.id)
            .where(
                messages_table.c.turn_done.is_(False),
                messages_table.c.role == "user",
                messages_table.c.created_at > since,
            )
            .order_by(messages_table.c.id)
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
    async def take_over(self, message_id: int, previous: str | None, instance: str) -> bool:
        """Claim a pending turn from the process that owned it (compare and
        set, so of several processes exactly one wins)."""
        owner = messages_table.c.handled_by
        statement = (
            update(messages_table)
            .where(
                messages_table.c.id == message_id,
                messages_table.c.turn_done.is_(False),
                owner.is_(None) if previous is None else owner == previous,
            )
            .values(handled_by=instance)
        )
        return await self.db.write_rows(
            lambda connection: bool(rows_affected(connection.execute(statement)))
        )
