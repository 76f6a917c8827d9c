"""What the conversation manager needs from the services around it.

Each service (drawing, the knowledge base, handoff to people, governance)
lives in its own package and is wired in by `bot.app`; the manager only knows
these small protocols, so every service can be built, tested and left out on
its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from bot.messages import Incoming, Notice, Reply, Source

#: Where a text is checked by moderation.
Where = Literal["input", "output", "draw"]


class DrawPort(Protocol):
    """`/draw` (bot.draw.service.DrawService)."""

    def handle(self, incoming: Incoming, args: str) -> AsyncIterator[Reply]: ...

    def cancel(self, platform: str, user_id: str) -> int: ...


@dataclass(frozen=True, slots=True)
class KnowledgeDecision:
    """What the knowledge base makes of a message."""

    kind: Literal["answer", "suggest", "fallback"]
    #: The entry's answer verbatim, or the "Did you mean ...?" text; "" for a fallback.
    text: str = ""
    #: Source("faq", id=...) or Source("suggestion", ids=...); None for a fallback.
    source: Source | None = None
    #: A fallback while `[knowledge] fallback = "human"`: offer a person.
    escalate: bool = False


class KnowledgePort(Protocol):
    """Answers from the shop's FAQ (bot.knowledge.KnowledgeService)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def decide(
        self, incoming: Incoming, text: str, previous: Source | None
    ) -> KnowledgeDecision: ...


class HandoffPort(Protocol):
    """People taking conversations over (bot.handoff.HandoffService)."""

    def is_trigger(self, text: str) -> bool:
        """Whether a message asks for a person (`[handoff] triggers`)."""
        ...

    async def request(self, incoming: Incoming, conversation_id: int, trigger: str) -> list[Reply]:
        """Hand the conversation to people (state `waiting`); what to tell the user."""
        ...

    async def on_held_message(
        self, incoming: Incoming, conversation_id: int, state: str
    ) -> list[Reply]:
        """A user message stored while people hold the conversation (not answered
        by the bot); what, if anything, to tell the user."""
        ...

    async def give_back(self, incoming: Incoming, conversation_id: int) -> list[Reply]:
        """`/cancel` from the user: the bot takes the conversation back."""
        ...

    async def note_outcome(self, conversation_id: int, *, answered: bool) -> bool:
        """Count an (un)answered question; True when it is time to hand over
        (`[handoff] after_unanswered`)."""
        ...


class GovernancePort(Protocol):
    """Who may use the bot and how much, and what may be said (bot.governance)."""

    def is_admin(self, incoming: Incoming) -> bool: ...

    def is_banned(self, platform: str, user_id: str) -> bool:
        """From memory, no database round trip: for reads such as a history."""
        ...

    async def admit(self, incoming: Incoming) -> Refusal | None:
        """Before any work: None to go on, else the refusal (bans, access lists,
        muted chats, flood control, quotas)."""
        ...

    async def moderate(self, incoming: Incoming, text: str, where: Where) -> str | None:
        """None when `text` may be said; else what the user sees instead. Blocked
        texts are written to the audit log."""
        ...

    async def usage_lines(self, incoming: Incoming) -> list[str]:
        """For /stats: what the user has used today and what is left."""
        ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message the bot will not work on. `reply` None: stay silent."""

    reason: str
    reply: Notice | None = None
