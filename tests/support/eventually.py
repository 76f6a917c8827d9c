"""`eventually()`: the one way tests wait for something that no event announces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]], *, within: float = 15.0, every: float = 0.02
) -> T:
    """Check `condition` until it returns something truthy (then return it),
    failing after `within` seconds. Use it where nothing can be awaited
    directly: a log line, a row in a database, a file appearing."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s: {condition}")
        await asyncio.sleep(every)
