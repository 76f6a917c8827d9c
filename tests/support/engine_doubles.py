"""Text-engine doubles for manager and channel tests (the real engine is tested
on its own with the tiny model)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence

from bot.engines import EngineUnavailable, TextChunk


class ScriptedEngine:
    """Answers with `reply(turns)`, records every prompt, optionally slowly."""

    def __init__(
        self,
        reply: Callable[[Sequence[str]], str] = lambda turns: f"echo: {turns[-1]}",
        *,
        delay: Callable[[], float] = lambda: 0.0,
        fail: bool = False,
    ) -> None:
        self.reply = reply
        self.delay = delay
        self.fail = fail
        self.prompts: list[list[str]] = []
        self.started = asyncio.Event()
        self.release: asyncio.Event | None = None
        self.closed = False
        self.streams_closed = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    @property
    def ready(self) -> bool:
        return not self.fail

    @property
    def queue_depth(self) -> int:
        return 0

    async def stream(
        self, turns: Sequence[str], *, conversation: str = ""
    ) -> AsyncIterator[TextChunk]:
        if self.fail:
            raise EngineUnavailable("text.model is not loaded")
        self.prompts.append(list(turns))
        self.started.set()
        try:
            if self.release is not None:
                await self.release.wait()
            await asyncio.sleep(self.delay())
            text = self.reply(turns)
            words = text.split(" ")
            for index in range(1, len(words)):
                yield TextChunk(" ".join(words[:index]), final=False)
            yield TextChunk(text, final=True, tokens=len(words))
        finally:
            self.streams_closed += 1


def jitter(low: float = 0.0, high: float = 0.01) -> Callable[[], float]:
    generator = random.Random(7)
    return lambda: generator.uniform(low, high)
