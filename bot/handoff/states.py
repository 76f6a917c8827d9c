"""The handoff state machine and what every change brings with it.

    bot ──request──▶ waiting ──claim──▶ claimed
     ▲                 │                 │
     └──release/cancel─┴─────────────────┘

An operator may also claim a conversation the bot holds (to step in), and
claims again what they hold already (a no-op). A conversation claimed by one
operator cannot be claimed or released by another (409). The user's /cancel
gives it back to the bot from any state.

Every change is one compare-and-set transaction in the database with its
audit row (storage.handoff); then the `Switchboard` publishes it on the event
bus (every process's consoles see it) and refreshes the waiting gauge from
the database, so the figure is right whichever process made the change and
after restarts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bot.bus import EventBus
from bot.handoff.views import (
    TOPIC,
    ConversationView,
    TranscriptEntry,
    conversation_event,
    message_event,
)
from bot.metrics import Metrics
from storage import StorageUnavailable, Store
from storage.handoff import HandoffChange

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Move:
    """One kind of transition: where to, from where, and whether a claim by
    another operator blocks it."""

    name: str
    to: str
    allowed_from: frozenset[str]
    holder_only: bool


REQUEST = Move("request", "waiting", frozenset({"bot"}), holder_only=False)
CLAIM = Move("claim", "claimed", frozenset({"bot", "waiting", "claimed"}), holder_only=True)
RELEASE = Move("release", "bot", frozenset({"waiting", "claimed"}), holder_only=True)
GIVE_BACK = Move("give_back", "bot", frozenset({"waiting", "claimed"}), holder_only=False)


def held_by_other(change: HandoffChange, operator: str) -> bool:
    """Whether a claim or release failed because another operator holds the conversation."""
    after = change.after
    return after.state == "claimed" and after.operator != operator


class Switchboard:
    """State changes with their events and figures."""

    def __init__(self, store: Store, bus: EventBus, metrics: Metrics | None) -> None:
        self.store = store
        self.bus = bus
        self.metrics = metrics

    async def move(
        self, conversation_id: int, move: Move, *, operator: str | None = None, reason: str = ""
    ) -> HandoffChange | None:
        """Apply `move` atomically; when it changed the state, announce it.
        None when the conversation does not exist."""
        change = await self.store.handoff.transition(
            conversation_id,
            to=move.to,
            allowed_from=move.allowed_from,
            operator=operator,
            reason=reason or move.name,
            holder_only=move.holder_only,
        )
        if change is not None and change.changed:
            await self.announce(conversation_id)
            await self.refresh_waiting()
        return change

    async def view(self, conversation_id: int) -> ConversationView | None:
        summary = await self.store.handoff.summary(conversation_id)
        return ConversationView.of(summary) if summary is not None else None

    async def announce(self, conversation_id: int) -> ConversationView | None:
        """Publish the conversation as it is now."""
        view = await self.view(conversation_id)
        if view is not None:
            await self.publish(conversation_event(view))
        return view

    async def announce_message(
        self, conversation_id: int, message: TranscriptEntry
    ) -> ConversationView | None:
        view = await self.view(conversation_id)
        if view is not None:
            await self.publish(message_event(view, message))
        return view

    async def publish(self, event: dict[str, Any]) -> None:
        """Events only say "look" (what they tell is stored already), so one
        that cannot be sent is logged, not raised: the state change stands."""
        try:
            await self.bus.publish(TOPIC, event)
        except Exception as exc:
            log.warning(
                "handoff: an event could not be published (%s: %s)", type(exc).__name__, exc
            )

    async def refresh_waiting(self) -> None:
        """Set the waiting gauge from the database (all processes' conversations)."""
        if self.metrics is None:
            return
        try:
            waiting = await self.store.handoff.count("waiting")
        except StorageUnavailable as exc:
            log.debug("handoff: the waiting gauge was not refreshed: %s", exc)
            return
        self.metrics.waiting.set(waiting)
