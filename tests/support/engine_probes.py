"""Probes for tests of the real text engines: an observer that remembers what an
engine reported, a hold on its worker thread at the first partial text, and a
worker made to look idle for a while."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from bot.engines.batch_window import QUIET_WINDOWS, BatchWindow


def idle_for(window: BatchWindow, windows: float = QUIET_WINDOWS) -> None:
    """Make the worker behind `window` look idle for `windows` batch windows
    (by default a quiet spell: its next request starts at once). Call it after
    `start`: the worker rests before `start` returns."""
    ahead = windows * window.wait_s
    window.clock = lambda: time.monotonic() + ahead


class CountingObserver:
    """An `EngineObserver` that remembers the tokens and batches reported."""

    def __init__(self) -> None:
        self.tokens = 0
        self.batches: list[int] = []

    def observe_queue(self, engine: str, depth: int) -> None:
        pass

    def observe_batch(self, rows: int) -> None:
        self.batches.append(rows)

    def count_tokens(self, count: int) -> None:
        self.tokens += count


def hold_at_first_partial(
    monkeypatch: pytest.MonkeyPatch, engine: Any
) -> tuple[threading.Event, threading.Event]:
    """Make `engine`'s worker wait, right after it sends its first partial text,
    until the second event is set; the first is set once it waits. Tests then
    act while a batch is known to be running, without racing the model."""
    held, release = threading.Event(), threading.Event()
    send = engine._send

    def holding(pending: Any, kind: str, value: Any, tokens: int = 0) -> None:
        send(pending, kind, value, tokens)
        if kind == "partial" and not held.is_set():
            held.set()
            assert release.wait(10)

    monkeypatch.setattr(engine, "_send", holding)
    return held, release
