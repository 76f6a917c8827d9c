"""How long a model's worker waits for company before it starts a batch.

A worker that takes a request waits up to `batch_wait_ms` for others to join
it: under load, one forward pass for many users costs little more than one for
a single user. But a request that finds the worker idle after a quiet spell has
nobody to wait for. With arrivals that sparse (none in the last
`QUIET_WINDOWS` windows), the chance that another comes within the window is
about one in `QUIET_WINDOWS`, so the request starts at once, with whatever is
already queued. A lone user stops paying the window on every message (10 ms
of a 50-60 ms reply on the default engine; docs/PERFORMANCE.md), while under
load nothing changes: a request that arrives while a batch runs finds the
worker busy, and the worker was idle for no time at all when it takes it.

What it costs: a burst that begins after a quiet spell (many users at once,
after none for a while) starts with its first request alone. The local engine
admits the rest at its next step; CTranslate2, and so the both-engines engine,
answers that one first, and the rest of the burst, gathered meanwhile, goes
on together after it (one reply later: about 50 ms on the bundled model).

Used by the text engines' worker (`bot.engines.worker`) and the FAQ embedder
(`bot.knowledge.embedder`); only their worker thread calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Idle for this many batch windows: a request starts without waiting.
QUIET_WINDOWS = 20


class BatchWindow:
    """`batch_wait_ms`, skipped after a quiet spell (see the module docstring)."""

    def __init__(self, wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait_s = wait_s
        self.clock = clock
        self._idle_since = clock()

    def rest(self) -> None:
        """The worker is idle from now on: its batch ended, or its model is ready."""
        self._idle_since = self.clock()

    def wait(self) -> float:
        """How long the request just taken waits for company, in seconds:
        `wait_s`, or 0 when the worker had been idle for `QUIET_WINDOWS` windows."""
        if self.clock() - self._idle_since >= QUIET_WINDOWS * self.wait_s:
            return 0.0
        return self.wait_s
