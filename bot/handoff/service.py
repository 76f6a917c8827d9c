"""`HandoffService`: the bot stepping aside for people (`bot.ports.HandoffPort`).

The hops of a handoff:

1. A user sends `/human` or a `[handoff] triggers` phrase, or the bot gives
   up on them (`[knowledge] fallback = "human"`, `[handoff] after_unanswered`).
2. `request` moves the conversation bot -> waiting (compare-and-set in the
   database, with its audit row), counts it, publishes it to every process's
   operator consoles, sends the notices (`notify_url`, operators' chats) in
   the background, and tells the user once what happens next (or, outside
   `[handoff] hours`, when people are back).
3. While the conversation is not with the bot, the manager stores each user
   message and calls `on_held_message` instead of answering: consoles get it.
4. An operator claims, answers and releases it through `OperatorDesk`
   (bot.handoff.desk); the user's `/cancel` gives it back too (`give_back`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from bot.bus import EventBus
from bot.commands import CommandCall, CommandRegistry, CommandSpec
from bot.config import Config
from bot.delivery import Delivery
from bot.errors import StartupError
from bot.handoff import texts
from bot.handoff.desk import OperatorDesk
from bot.handoff.hours import HoursError, OfficeHours
from bot.handoff.notify import Notifier, RetryPolicy, notice_payload
from bot.handoff.operators import Operators, OperatorTokensError
from bot.handoff.states import GIVE_BACK, REQUEST, Switchboard
from bot.handoff.triggers import Triggers
from bot.handoff.views import TOPIC, TranscriptEntry
from bot.messages import ConversationKey, Incoming, Notice, NoticeKind, Reply
from bot.metrics import Metrics
from bot.text_safety import safe_text
from storage import Store

log = logging.getLogger(__name__)

TRIGGERS = ("command", "phrase", "fallback", "unanswered")


def console_url(config: Config) -> str:
    """Where the operator console is: `[web] public_url`, else `[web] host:port`."""
    web = config.web
    if web.public_url:
        return web.public_url.rstrip("/") + "/operator"
    if not web.enabled or not web.port:
        return ""
    host = "127.0.0.1" if web.host in ("0.0.0.0", "::", "") else web.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{web.port}/operator"


class HandoffService:
    def __init__(
        self,
        config: Config,
        store: Store,
        delivery: Delivery,
        bus: EventBus,
        operators: Operators,
        metrics: Metrics | None = None,
        *,
        notifier: Notifier | None = None,
    ) -> None:
        settings = config.handoff
        self.config = config
        self.store = store
        self.metrics = metrics
        self.bus = bus
        self.triggers = Triggers(settings.triggers)
        self.hours = OfficeHours(settings.hours, settings.timezone)
        self.console_url = console_url(config)
        self.switchboard = Switchboard(store, bus, metrics)
        self.notifier = notifier or Notifier(
            delivery,
            notify_url=settings.notify_url,
            telegram_chat_id=settings.telegram_chat_id,
            discord_channel_id=settings.discord_channel_id,
            policy=RetryPolicy(attempts=settings.notify_attempts),
        )
        self.desk = OperatorDesk(self.switchboard, store, delivery, operators, metrics)
        self._watcher: asyncio.Task[None] | None = None
        self._watching = asyncio.Event()

    @classmethod
    def create(
        cls,
        config: Config,
        store: Store,
        delivery: Delivery,
        bus: EventBus,
        commands: CommandRegistry,
        metrics: Metrics | None = None,
    ) -> HandoffService | None:
        """The service with `/human` registered; None when handoff is off
        (`[handoff] enabled = false`, or no operator can sign in because the
        tokens env var is unset: handing users to nobody helps no one).
        `StartupError` for tokens or hours that cannot be read."""
        settings = config.handoff
        if not settings.enabled:
            log.info("handoff is off: [handoff] enabled = false")
            return None
        try:
            operators = Operators.from_env(settings.operator_tokens_env)
            service = cls(config, store, delivery, bus, operators, metrics)
        except OperatorTokensError as exc:
            raise StartupError(f"[handoff] operator_tokens_env: {exc}") from exc
        except HoursError as exc:
            raise StartupError(f"[handoff] hours: {exc}") from exc
        if not len(operators):
            log.info(  # like a channel whose token is unset: off, and why
                "handoff is off: no operator can sign in, because the env var %s "
                "([handoff] operator_tokens_env) is not set (name:token,name:token)",
                settings.operator_tokens_env,
            )
            return None
        service.register(commands)
        log.info("handoff is on for %d operator(s): %s", len(operators), ", ".join(operators.names))
        return service

    def register(self, commands: CommandRegistry) -> None:
        if "human" not in commands:
            commands.register(CommandSpec("human", "/human", "talk to a person", self._human))

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the notifier's HTTP session, set the waiting gauge from the
        database, and keep it right as any process changes a conversation."""
        await self.notifier.start()
        await self.switchboard.refresh_waiting()
        self._watcher = asyncio.create_task(self._watch(), name="handoff-gauge")
        subscribed = asyncio.ensure_future(self._watching.wait())
        await asyncio.wait({subscribed, self._watcher}, return_when=asyncio.FIRST_COMPLETED)
        if self._watcher.done():  # it could not subscribe: say why
            subscribed.cancel()
            self._watcher.result()

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.notifier.close()

    async def _watch(self) -> None:
        async with self.bus.subscribe(TOPIC) as events:
            self._watching.set()
            async for event in events:
                if event.get("type") == "conversation":
                    await self.switchboard.refresh_waiting()

    # -- HandoffPort ---------------------------------------------------------------

    def is_trigger(self, text: str) -> bool:
        return self.triggers(text)

    async def request(self, incoming: Incoming, conversation_id: int, trigger: str) -> list[Reply]:
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown handoff trigger {trigger!r}")
        change = await self.switchboard.move(conversation_id, REQUEST, reason=trigger)
        if change is None:
            return []
        if not change.changed:
            # Already with people: an explicit /human is answered; a phrase or
            # a fallback racing with another message is not (told once).
            if trigger != "command" or change.after.state == "bot":
                return []
            waiting = change.after.state == "waiting"
            text = texts.ALREADY_WAITING if waiting else texts.ALREADY_CLAIMED
            return [Notice(text, NoticeKind.INFO)]
        if self.metrics is not None:
            self.metrics.handoffs.labels(trigger).inc()
        view = await self.switchboard.view(conversation_id)
        if view is not None:
            link = f"{self.console_url}#conversation={view.id}" if self.console_url else ""
            self.notifier.waiting(notice_payload(view, trigger, link))
        return [Notice(self.what_happens_next(), NoticeKind.INFO)]

    def what_happens_next(self, now: datetime | None = None) -> str:
        now = now or datetime.now(UTC)
        if self.hours.is_open(now):
            return texts.HANDED_OVER
        return texts.AWAY.format(when=self.hours.describe_next(now))

    async def on_held_message(
        self, incoming: Incoming, conversation_id: int, state: str
    ) -> list[Reply]:
        """Stored, not answered: the consoles are told, the user is not (they
        were told once what happens next)."""
        text = safe_text(incoming.text).strip()
        message = TranscriptEntry.now("user", text, datetime.now(UTC))
        newest = await self.store.conversations.history(conversation_id, limit=1)
        if newest and newest[-1].role == "user" and newest[-1].text == text:
            message = TranscriptEntry.of(newest[-1])  # as stored: consoles match it up
        await self.switchboard.announce_message(conversation_id, message)
        return []

    async def give_back(self, incoming: Incoming, conversation_id: int) -> list[Reply]:
        await self.switchboard.move(conversation_id, GIVE_BACK, reason="user_cancel")
        return [Notice(texts.BACK_TO_BOT, NoticeKind.INFO)]

    async def note_outcome(self, conversation_id: int, *, answered: bool) -> bool:
        threshold = self.config.handoff.after_unanswered
        if not threshold:
            return False
        streak = await self.store.handoff.note_outcome(conversation_id, answered=answered)
        return not answered and streak >= threshold

    # -- /human --------------------------------------------------------------------

    async def _human(self, call: CommandCall) -> AsyncIterator[Reply]:
        incoming = call.incoming
        key = ConversationKey.for_message(
            incoming, self.config.bot.scope_for(incoming.platform, incoming.chat_id)
        )
        # StorageUnavailable goes to the manager, which tells the user to try again.
        conversation_id, _state = await self.store.conversations.ensure_active(
            key.platform, key.chat_id, key.user_id, incoming.address.as_dict()
        )
        for reply in await self.request(incoming, conversation_id, "command"):
            yield reply
