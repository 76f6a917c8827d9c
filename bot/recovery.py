"""Nothing accepted is lost: answering messages a dead process left unanswered.

Every user message is committed, with the id of the process that owns its
turn, before any work. Each process registers itself (host and pid) and sends
a heartbeat; at start and then every `SWEEP_EVERY_S` it looks for messages
whose turn never ended and whose process is gone — no heartbeat for
`DEAD_AFTER`, or on this host a pid that no longer runs (an earlier run
killed a moment ago) — takes each over with a compare-and-set
(so of several processes exactly one answers it), answers it through the
normal turn — in order with the conversation's other messages — and pushes the
answer to the user's platform. Messages older than `ANSWER_WITHIN` are not
answered any more: the user is told instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from bot import texts
from bot.delivery import Delivery
from bot.engines import EngineUnavailable
from bot.messages import ConversationKey, Incoming, Notice, NoticeKind, Text
from bot.tickets import Cancelled
from storage import PendingTurn, StorageUnavailable

if TYPE_CHECKING:
    from bot.manager import ConversationManager

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
SWEEP_EVERY_S = 30.0
#: A process silent this long is taken for dead.
DEAD_AFTER = timedelta(seconds=45)
#: Older unanswered messages get an apology instead of an answer.
ANSWER_WITHIN = timedelta(hours=1)
#: Unanswered messages older than this are left alone entirely.
LOOK_BACK = timedelta(days=2)


class Recovery:
    def __init__(
        self, manager: ConversationManager, delivery: Delivery, *, host: str = "", pid: int = 0
    ) -> None:
        self.manager = manager
        self.delivery = delivery
        self.store = manager.store
        self.instance_id = manager.instance_id
        self.host = host
        self.pid = pid
        self._task: asyncio.Task[None] | None = None
        self._answers: set[asyncio.Task[None]] = set()
        #: Set after each sweep (tests wait on it).
        self.swept = asyncio.Event()

    async def start(self) -> None:
        try:
            await self.store.instances.register(self.instance_id, self.host, self.pid)
        except StorageUnavailable as exc:
            log.warning("could not register this process: %s", exc)
        self._task = asyncio.create_task(self._run(), name="recovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._answers):
            task.cancel()
        await asyncio.gather(*self._answers, return_exceptions=True)
        with contextlib.suppress(StorageUnavailable):
            await self.store.instances.remove(self.instance_id)

    async def _run(self) -> None:
        next_sweep = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.store.instances.heartbeat(self.instance_id)
                if loop.time() >= next_sweep:
                    await self.sweep()
                    next_sweep = loop.time() + SWEEP_EVERY_S
            except StorageUnavailable as exc:
                log.warning("recovery: the database is unavailable (%s); trying again", exc)
            except Exception:
                log.exception("recovery sweep failed")
            await asyncio.sleep(HEARTBEAT_S)

    async def sweep(self) -> int:
        """Take over and answer every orphaned message; how many were taken."""
        now = datetime.now(UTC)
        await self.store.instances.prune(before=now - LOOK_BACK)  # long-gone processes
        pending = await self.store.turns.pending(since=now - LOOK_BACK)
        if not pending:
            self.swept.set()
            return 0
        alive = {
            instance
            for instance, (host, pid) in (
                await self.store.instances.alive(now - DEAD_AFTER)
            ).items()
            if host != self.host or _running(pid)
        }
        alive.add(self.instance_id)
        taken = 0
        for turn in pending:
            if turn.handled_by in alive:
                continue
            if not await self.store.turns.take_over(
                turn.message.id, turn.handled_by, self.instance_id
            ):
                continue  # another process took it first
            taken += 1
            task = asyncio.create_task(self._answer(turn, now), name=f"recover-{turn.message.id}")
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)
        if taken:
            log.info("recovery: answering %d message(s) left unanswered", taken)
            await asyncio.gather(*list(self._answers), return_exceptions=True)
        self.swept.set()
        return taken

    async def _answer(self, turn: PendingTurn, now: datetime) -> None:
        message = turn.message
        key = ConversationKey(turn.platform, turn.chat_id, turn.owner)
        incoming = Incoming(
            platform=turn.platform,
            chat_id=turn.chat_id,
            user_id=turn.user_id,
            user_name="",
            text=message.text,
            is_private=bool(turn.owner),
        )
        created = message.created_at
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        if now - created > ANSWER_WITHIN:
            await self.manager.conversation.finish_turn(message)
            await self.delivery.push(
                message.conversation_id,
                Notice(texts.LOST_ANSWER.format(text=message.text[:200]), NoticeKind.INFO),
            )
            return
        conversation = self.manager.conversation
        final: Text | None = None
        with self.manager.tickets.issue((turn.platform, turn.user_id)) as ticket:
            try:
                async for reply in conversation.turn(key, message, incoming, message.text, ticket):
                    if isinstance(reply, Text) and reply.final:
                        final = reply
            except (Cancelled, EngineUnavailable, StorageUnavailable, TimeoutError) as exc:
                log.warning("recovery: message %s not answered: %s", message.id, exc)
                await self.delivery.push(  # the user is told, rather than left waiting
                    message.conversation_id,
                    Notice(texts.LOST_ANSWER.format(text=message.text[:200]), NoticeKind.INFO),
                )
                return
        if final is not None:
            await self.delivery.push(message.conversation_id, final)


def _running(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours
    return True
