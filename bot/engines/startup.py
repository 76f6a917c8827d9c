"""The start of a worker thread that loads a model, when the `start` awaiting it
may be cancelled meanwhile (Ctrl-C or SIGTERM during start-up).

A load can't be interrupted, so a cancelled `start` tells the worker to stop
once it is done: under one lock, either the worker sees the cancellation
before it begins to serve (and unloads instead), or `start` sees it serving
and stops it the way `close` would. A later `start` joins the abandoned
worker first, so two never share a queue. Used by the text engines'
`WorkerEngine` and the FAQ's `Embedder`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class StartGuard:
    """One per engine; see the module docstring."""

    def __init__(self) -> None:
        #: one `start` at a time
        self.starting = asyncio.Lock()
        self._lock = threading.Lock()
        self._cancelled = False
        self._abandoned: threading.Thread | None = None

    async def begin(self) -> None:
        """Before starting a worker: wait for one a cancelled start left loading."""
        if self._abandoned is not None:
            await asyncio.to_thread(self._abandoned.join)
            self._abandoned = None
        self._cancelled = False

    def serve(self, publish: Callable[[], None]) -> bool:
        """The worker, once loaded: `publish()` (make the model usable) unless the
        start was cancelled; whether it did."""
        with self._lock:
            if self._cancelled:
                return False
            publish()
            return True

    def cancel(
        self, worker: threading.Thread, serving: Callable[[], bool], stop: Callable[[], None]
    ) -> None:
        """`start`, cancelled: the worker stops once loaded, or now (`stop()`) if it
        is already `serving()` (asked under the lock)."""
        with self._lock:
            self._cancelled = True
            if serving():
                stop()
        self._abandoned = worker


def settle(loaded: asyncio.Future[Any], result: Any = None) -> None:
    """Tell `start` the load is over (a loop callback), unless it stopped waiting."""
    if not loaded.done():
        loaded.set_result(result)
