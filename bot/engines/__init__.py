"""Engines behind small protocols, so the manager never cares which one runs.

Engines are pure: they take their own settings objects (`bot.engines.settings`),
yield their own chunk type, read no environment and hold no product copy.
`bot.engine_settings` turns config sections into engines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class EngineUnavailable(Exception):
    """The engine cannot answer (model missing, server down, generation failed).
    The message is safe to show to an operator and names the key to fix."""


@dataclass(frozen=True, slots=True)
class TextChunk:
    """One step of a reply: `text` is the whole reply so far (partials) or the
    cleaned reply (final; may be "" when the model said nothing)."""

    text: str
    final: bool
    #: on the final chunk: tokens generated for this reply (for token quotas)
    tokens: int = 0
    #: on the final chunk: tokens of the prompt the reply continued, as fitted to
    #: the budget (0 where the engine does not know, e.g. a remote server)
    prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class KvUse:
    """An engine's key/value memory, against `text.kv_cache_mb` (the bench's
    memory probe reports it). `batch_bytes` is what the running batch holds or
    may hold (the local engine's preallocated slots; the most a CTranslate2
    sub-batch held so far), `prefix_bytes` what is kept between turns."""

    batch_bytes: int = 0
    #: rows the batch's key/value memory is sized for
    batch_rows: int = 0
    prefix_bytes: int = 0
    prefix_entries: int = 0

    @property
    def total(self) -> int:
        return self.batch_bytes + self.prefix_bytes

    def __add__(self, other: KvUse) -> KvUse:
        return KvUse(
            self.batch_bytes + other.batch_bytes,
            max(self.batch_rows, other.batch_rows),
            self.prefix_bytes + other.prefix_bytes,
            self.prefix_entries + other.prefix_entries,
        )


class EngineObserver(Protocol):
    """Where an engine reports its load (implemented by `bot.metrics.Metrics`)."""

    def observe_queue(self, engine: str, depth: int) -> None: ...

    def observe_batch(self, rows: int) -> None: ...

    def count_tokens(self, count: int) -> None: ...


@runtime_checkable
class TextEngine(Protocol):
    """Answers a dialogue. `turns` alternate speakers, oldest first, and end
    with the user's newest message. The engine fits them into its own token
    budget, dropping the oldest turns first."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def stream(self, turns: Sequence[str], *, conversation: str = "") -> AsyncIterator[TextChunk]:
        """Yield the reply as it grows, then one `final=True` chunk.
        `conversation` keys the engine's per-conversation caches. Closing the
        iterator early (`aclose`) drops the request from the engine."""
        ...

    @property
    def ready(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...


async def final_text(engine: TextEngine, turns: Sequence[str], *, conversation: str = "") -> str:
    """The final text of one reply (a convenience for tools and tests)."""
    async for chunk in engine.stream(turns, conversation=conversation):
        if chunk.final:
            return chunk.text
    raise EngineUnavailable("the engine ended without a reply")


def clean_reply(text: str) -> str:
    """Whitespace collapsed, replacement characters dropped; "" when nothing is left."""
    return " ".join(text.replace("\ufffd", "").split())


__all__ = [
    "EngineObserver",
    "EngineUnavailable",
    "TextChunk",
    "TextEngine",
    "clean_reply",
    "final_text",
]
