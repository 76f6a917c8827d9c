"""The conversation manager: one place where every channel's messages meet.

The flow of one message, top to bottom:

1. `handle(incoming)` — the adapter's call; an async iterator of replies that
   never raises: bad input and failing dependencies become short notices.
2. `_dispatch` — unaddressed group chatter is ignored; the text is made safe
   to store (`bot.text_safety`); empty or huge messages get a notice;
   governance may refuse the sender (bans, access lists, muted chats, quotas);
   a `/command` goes to the command registry; the per-minute rate limit and
   input moderation apply to everything else.
3. `Conversation.converse` (bot.conversation) — commits the message (once per
   platform message id), honours the handoff state, then waits for the
   conversation's turn (strict arrival order within a conversation, others run
   concurrently), answers from the knowledge base or the dialogue model,
   stores the reply and yields it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from bot import texts
from bot.builtin_commands import register_builtin_commands
from bot.commands import Command, CommandCall, CommandRegistry, parse_command
from bot.config import Config
from bot.conversation import Conversation
from bot.engines import TextEngine
from bot.limits import SlidingWindowLimiter
from bot.messages import Incoming, Notice, NoticeKind, Reply, Text
from bot.metrics import Metrics
from bot.ports import DrawPort, GovernancePort, HandoffPort, KnowledgePort
from bot.text_safety import safe_text
from bot.tickets import Tickets
from storage import StorageUnavailable, Store

log = logging.getLogger(__name__)


class ConversationManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        engine: TextEngine,
        *,
        commands: CommandRegistry | None = None,
        drawer: DrawPort | None = None,
        metrics: Metrics | None = None,
        knowledge: KnowledgePort | None = None,
        handoff: HandoffPort | None = None,
        governance: GovernancePort | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        # The prompt's turns come from the store's memory of them (storage.history).
        store.recent.resize(config.storage.history_cache)
        self.engine = engine
        self.drawer = drawer
        self.metrics = metrics
        self.knowledge = knowledge
        self.handoff = handoff
        self.governance = governance
        #: Marks the turns this process owns, so others can tell when it died.
        self.instance_id = instance_id or uuid.uuid4().hex[:16]
        self.tickets = Tickets()
        self.conversation = Conversation(self)
        self.commands = commands if commands is not None else CommandRegistry()
        register_builtin_commands(self)
        self._limiter = SlidingWindowLimiter(config.limits.messages_per_minute, 60.0)
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0

    @property
    def closing(self) -> bool:
        return self._closing

    # -- entry point -------------------------------------------------------------

    async def handle(self, incoming: Incoming) -> AsyncGenerator[Reply, None]:
        """Every reply to one incoming message, in order. Never raises for bad
        input or a failing dependency: the user gets a short notice instead."""
        if (
            not incoming.addressed
            and not incoming.is_private
            and self.config.bot.group_messages == "addressed"
        ):
            return
        started = time.monotonic()
        if self.metrics is not None:
            self.metrics.messages.labels(incoming.platform).inc()
        self._in_flight += 1
        self._idle.clear()
        try:
            async for reply in self._dispatch(incoming):
                yield reply
        except Exception:
            log.exception("failed to handle a %s message", incoming.platform)
            self.count_error("internal")
            yield Notice(texts.INTERNAL_ERROR, NoticeKind.ERROR)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            if self.metrics is not None:
                self.metrics.reply_latency.labels(incoming.platform).observe(
                    time.monotonic() - started
                )

    async def close(self, grace: float | None = None) -> None:
        """Stop taking messages; let in-flight ones finish for `grace` seconds, then cancel them."""
        self._closing = True
        grace = self.config.bot.shutdown_grace_s if grace is None else grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        self.tickets.cancel_all()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5)

    # -- dispatch ------------------------------------------------------------------

    async def _dispatch(self, incoming: Incoming) -> AsyncIterator[Reply]:
        if self._closing:
            yield Notice(texts.RESTARTING, NoticeKind.UNAVAILABLE, retry_after=30)
            return
        text = safe_text(incoming.text).strip()
        if not text:
            yield Notice(texts.EMPTY, NoticeKind.EMPTY)
            return
        limit = self.config.bot.max_input_chars
        if len(text) > limit:
            yield Notice(texts.too_long(len(text), limit), NoticeKind.TOO_LONG)
            return
        try:
            if self.governance is not None:
                refusal = await self.governance.admit(incoming)
                if refusal is not None:
                    if self.metrics is not None:
                        self.metrics.refused.labels(refusal.reason).inc()
                    if refusal.reply is not None:
                        yield refusal.reply
                    return
            command = parse_command(text)
            if command is not None:
                async for reply in self._command(incoming, command):
                    yield reply
                return
            wait = self._limiter.acquire((incoming.platform, incoming.user_id))
            if wait is not None:
                self.count_error("rate_limited")
                yield Notice(texts.rate_limited(wait), NoticeKind.RATE_LIMITED, retry_after=wait)
                return
            if self.governance is not None:
                blocked = await self.governance.moderate(incoming, text, "input")
                if blocked is not None:
                    yield Text(blocked)
                    return
        except StorageUnavailable as exc:
            yield self.storage_down(exc)
            return
        async for reply in self.conversation.converse(incoming, text):
            yield reply

    async def _command(self, incoming: Incoming, command: Command) -> AsyncIterator[Reply]:
        is_admin = self.is_admin(incoming)
        spec = self.commands.get(command.name)
        if spec is None:
            yield Text(
                texts.unknown_command(command.name)
                + "\n\n"
                + self.commands.help_text(self.config.bot.name, is_admin=is_admin)
            )
            return
        if spec.admin and not is_admin:
            yield Text(texts.ADMIN_ONLY.format(name=spec.name))
            return
        try:
            async for reply in spec.handler(CommandCall(incoming, command.args, is_admin)):
                yield reply
        except StorageUnavailable as exc:
            yield self.storage_down(exc)

    # -- shared with the conversation and the commands ---------------------------

    def is_admin(self, incoming: Incoming) -> bool:
        if self.governance is not None:
            return self.governance.is_admin(incoming)
        return incoming.sender in self.config.bot.admins

    def storage_down(self, exc: Exception) -> Notice:
        log.warning("storage unavailable: %s", exc)
        self.count_error("storage")
        return Notice(texts.STORAGE_DOWN, NoticeKind.UNAVAILABLE, retry_after=10)

    def count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.count_error(kind)
