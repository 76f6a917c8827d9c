"""Cancelling requests in flight: `/cancel`, a caller that went away, shutdown.

Each request holds a `Ticket`; setting its event stops whatever the request
is waiting on (its turn, the engine) at the next step, without cancelling the
task that runs it, so the request still finishes its bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """The request's ticket was cancelled."""


@dataclass(eq=False)
class Ticket:
    """One request in flight."""

    event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def cancel(self) -> None:
        self.event.set()


class Tickets:
    """The tickets in flight, by owner (a platform user)."""

    def __init__(self) -> None:
        self._by_owner: dict[Hashable, set[Ticket]] = {}

    @contextlib.contextmanager
    def issue(self, owner: Hashable) -> Iterator[Ticket]:
        ticket = Ticket()
        self._by_owner.setdefault(owner, set()).add(ticket)
        try:
            yield ticket
        finally:
            tickets = self._by_owner.get(owner)
            if tickets is not None:
                tickets.discard(ticket)
                if not tickets:
                    del self._by_owner[owner]

    def cancel(self, owner: Hashable) -> int:
        """Cancel the owner's requests in flight; how many there were."""
        pending = [t for t in self._by_owner.get(owner, ()) if not t.cancelled]
        for ticket in pending:
            ticket.cancel()
        return len(pending)

    def cancel_all(self) -> None:
        for tickets in self._by_owner.values():
            for ticket in tickets:
                ticket.cancel()


async def until_cancelled(awaitable: Awaitable[T], ticket: Ticket) -> T:
    """Await `awaitable` unless the ticket is cancelled first (then `Cancelled`)."""
    task = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(ticket.event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()  # our caller went away: don't leave the work running
        raise
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await task
    raise Cancelled


async def race(stream: AsyncIterator[T], ticket: Ticket) -> AsyncIterator[T]:
    """Iterate `stream` until it ends or the ticket is cancelled; closes it either way."""
    iterator = aiter(stream)
    try:
        while True:
            try:
                item = await until_cancelled(anext(iterator), ticket)
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
