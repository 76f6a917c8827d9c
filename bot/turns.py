"""When a turn may start: the policy over storage's turn primitives.

Messages of one conversation are answered in arrival order. Within a process
`KeyedLocks` order them; across processes (PostgreSQL) a turn also holds the
conversation's advisory lock and makes way while an earlier message of its
conversation has not had its turn: another process may have committed it
first yet asked for the lock later. A process that died mid-turn leaves its
message unfinished, so a turn waits for such a message at most `TURN_WAIT_S`,
and never for one older than `TURN_ABANDONED_AFTER`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from storage import Store, StoredMessage, TurnLock

log = logging.getLogger(__name__)

#: A turn waits at most this long for an earlier message's turn (whose process
#: may have died) before it goes ahead anyway.
TURN_WAIT_S = 30.0
#: Unfinished turns older than this are abandoned and never waited for.
TURN_ABANDONED_AFTER = timedelta(minutes=10)


async def wait_for_earlier_turns(lock: TurnLock, message: StoredMessage) -> None:
    """With the lock held, make way while an earlier message's turn is not
    over: unlock, wait a little (doubling up to 0.2 s), lock again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TURN_WAIT_S
    pause = 0.01
    while True:
        since = datetime.now(UTC) - TURN_ABANDONED_AFTER
        pending = await lock.earlier_turn_pending(message, since)
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
        await lock.make_way(pause)
        pause = min(pause * 2, 0.2)


@asynccontextmanager
async def conversation_turn(
    store: Store, platform: str, chat_id: str, owner: str, message: StoredMessage | None = None
) -> AsyncIterator[None]:
    """Hold the conversation's turn across processes; with `message`, also
    wait until every earlier message of its conversation has had its turn."""
    async with store.turns.lock(platform, chat_id, owner) as lock:
        if message is not None:
            await wait_for_earlier_turns(lock, message)
        yield
