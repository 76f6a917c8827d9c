"""Engines behind small protocols, so the manager never cares which one runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from bot.messages import Text


class EngineUnavailable(Exception):
    """The engine cannot answer (model missing, server down). The message is
    safe to show to an operator and names the config key to fix."""


@runtime_checkable
class TextEngine(Protocol):
    """Answers a dialogue. `turns` alternate speakers, oldest first, and end
    with the user's newest message. The engine fits them into its own token
    budget, dropping the oldest turns first."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def stream(self, turns: Sequence[str], *, conversation: str = "") -> AsyncIterator[Text]:
        """Yield the reply as it grows: each item holds the whole text so far,
        and the last one, `final=True`, the cleaned reply (never empty).
        `conversation` keys the engine's per-conversation caches."""
        ...

    async def generate(self, turns: Sequence[str], *, conversation: str = "") -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...


def create_text_engine(config: object, metrics: object | None = None) -> TextEngine:
    """Build the engine `[text] engine` names."""
    from bot.config import TextSection

    assert isinstance(config, TextSection)
    if config.engine == "remote":
        from bot.engines.remote import RemoteTextEngine

        return RemoteTextEngine(config, metrics=metrics)
    from bot.engines.text import LocalTextEngine

    return LocalTextEngine(config, metrics=metrics)
