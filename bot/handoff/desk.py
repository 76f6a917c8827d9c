"""`OperatorDesk`: what the operator console may do, for the web adapter.

Authenticate an operator by token, list conversations by state, read a
transcript, claim, release, answer, and follow changes as they happen. Errors
are typed (`NotFound`, `Conflict`, `InvalidRequest`; `bot.errors.Unavailable`
while the database is down), so the adapter maps them to HTTP without
knowing storage.

An operator's answer is stored first (role "operator", with their name),
then pushed to the user on their own platform through `Delivery` (split at
the platform's limit like any reply); answering a conversation claims it, so
the bot never talks over a person.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from bot.bus import Subscription
from bot.delivery import Delivery
from bot.errors import Unavailable
from bot.handoff import texts
from bot.handoff.operators import Operators
from bot.handoff.states import CLAIM, RELEASE, Move, Switchboard, held_by_other
from bot.handoff.views import STATES, TOPIC, ConversationView, Transcript, TranscriptEntry
from bot.messages import Notice, NoticeKind, Source, Text
from bot.metrics import Metrics
from bot.text_safety import safe_text
from storage import StorageUnavailable, Store, aware
from storage.handoff import HandoffChange

log = logging.getLogger(__name__)

#: The longest answer an operator may send; longer ones are split by the platform.
MAX_REPLY_CHARS = 20_000
TRANSCRIPT_LIMIT = 500


class HandoffError(Exception):
    """Something the operator asked for that cannot be done."""


class NotFound(HandoffError):
    pass


class InvalidRequest(HandoffError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Conflict(HandoffError):
    """Another operator holds the conversation."""

    def __init__(self, conversation: ConversationView) -> None:
        super().__init__(f"{conversation.operator} has this conversation")
        self.conversation = conversation


@dataclass(frozen=True, slots=True)
class Answered:
    conversation: ConversationView
    message: TranscriptEntry
    #: False when the user's platform is not served by this process (the
    #: answer is stored; they see it in their history).
    delivered: bool


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    try:
        yield
    except StorageUnavailable as exc:
        raise Unavailable(f"the database is unavailable ({exc})") from exc


def _seconds_since(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return max(0.0, (datetime.now(UTC) - aware(moment)).total_seconds())


class OperatorDesk:
    def __init__(
        self,
        switchboard: Switchboard,
        store: Store,
        delivery: Delivery,
        operators: Operators,
        metrics: Metrics | None = None,
        *,
        max_reply_chars: int = MAX_REPLY_CHARS,
    ) -> None:
        self.switchboard = switchboard
        self.store = store
        self.delivery = delivery
        self.operators = operators
        self.metrics = metrics
        self.max_reply_chars = max_reply_chars

    def authenticate(self, token: str) -> str | None:
        """The operator's name for a console token; None for anything else
        (a web visitor's session token included)."""
        return self.operators.authenticate(token)

    def events(self) -> Subscription:
        """`async with desk.events() as events: async for event in events` —
        conversation changes from every process (see bot.handoff.views)."""
        return self.switchboard.bus.subscribe(TOPIC)

    async def list(self, state: str = "all") -> list[ConversationView]:
        """Conversations in `state` ("waiting", "claimed", "bot" or "all"):
        waiting first, then claimed, newest first within each."""
        if state != "all" and state not in STATES:
            raise InvalidRequest("state must be one of waiting, claimed, bot, all")
        states = STATES if state == "all" else (state,)
        with _guarded():
            summaries = await self.store.handoff.listing(states)
        return [ConversationView.of(summary) for summary in summaries]

    async def conversation(self, conversation_id: int) -> ConversationView:
        with _guarded():
            view = await self.switchboard.view(conversation_id)
        if view is None:
            raise NotFound(f"no conversation {conversation_id}")
        return view

    async def transcript(self, conversation_id: int) -> Transcript:
        view = await self.conversation(conversation_id)
        with _guarded():
            messages = await self.store.conversations.history(
                conversation_id, limit=TRANSCRIPT_LIMIT
            )
            audit = await self.store.handoff.audit(conversation_id)
        return Transcript(view, [TranscriptEntry.of(message) for message in messages], audit)

    async def claim(self, conversation_id: int, operator: str) -> ConversationView:
        """Take the conversation (from the queue, or from the bot); `Conflict`
        when another operator has it."""
        await self._move(conversation_id, CLAIM, operator, "claim")
        return await self.conversation(conversation_id)

    async def release(self, conversation_id: int, operator: str) -> ConversationView:
        """Give the conversation back to the bot; the user is told."""
        change = await self._move(conversation_id, RELEASE, operator, "release")
        if change.changed:
            await self._push(conversation_id, Notice(texts.RELEASED, NoticeKind.INFO))
        return await self.conversation(conversation_id)

    async def reply(self, conversation_id: int, operator: str, text: str) -> Answered:
        """Store the operator's answer and deliver it; claims the conversation first."""
        text = safe_text(text).strip()
        if not text:
            raise InvalidRequest("text must not be empty")
        if len(text) > self.max_reply_chars:
            raise InvalidRequest(
                f"the answer is too long ({len(text):,} characters; the limit is "
                f"{self.max_reply_chars:,})",
                status=413,
            )
        await self._move(conversation_id, CLAIM, operator, "reply")
        view = await self.conversation(conversation_id)
        with _guarded():
            waited = await self.store.handoff.unreplied_since(conversation_id)
            stored = await self.store.conversations.add_operator_message(
                conversation_id=conversation_id,
                platform=view.platform,
                user_id=view.user_id,
                operator=operator,
                text=text,
            )
        if self.metrics is not None and (seconds := _seconds_since(waited)) is not None:
            self.metrics.time_to_first_reply.observe(seconds)
        message = TranscriptEntry.of(stored)
        reply = Text(text, role="operator", author=operator, source=Source("operator"))
        delivered = await self._push(conversation_id, reply)
        with _guarded():
            await self.switchboard.announce_message(conversation_id, message)
        return Answered(view, message, delivered)

    # -- helpers ---------------------------------------------------------------------

    async def _move(
        self, conversation_id: int, move: Move, operator: str, reason: str
    ) -> HandoffChange:
        with _guarded():
            change = await self.switchboard.move(
                conversation_id, move, operator=operator, reason=reason
            )
        if change is None:
            raise NotFound(f"no conversation {conversation_id}")
        if not change.changed and held_by_other(change, operator):
            raise Conflict(await self.conversation(conversation_id))
        if change.changed and change.before.state == "waiting" and change.after.state == "claimed":
            seconds = _seconds_since(change.before.since)
            if self.metrics is not None and seconds is not None:
                self.metrics.time_to_claim.observe(seconds)
        return change

    async def _push(self, conversation_id: int, reply: Text | Notice) -> bool:
        delivered = await self.delivery.push(conversation_id, reply)
        if not delivered:
            log.warning(
                "handoff: conversation %s's platform is not served here; the answer is stored",
                conversation_id,
            )
        return delivered
