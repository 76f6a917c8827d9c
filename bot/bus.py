"""Events between the parts of the bot, and between processes.

A pushed reply must reach a web visitor whose event stream is open on another
`aigc-bot run` process, and an operator console must see conversations change
wherever they change. `EventBus` carries small JSON events on named topics:

* `LocalBus`: in this process only (SQLite runs one process);
* `storage.notify.PostgresBus`: PostgreSQL `LISTEN/NOTIFY` on the database the
  processes already share;
* `RedisBus`: Redis pub/sub, when `[storage] redis_url` is set.

Delivery is at most once and only to subscribers present at publish time:
what must not be lost is stored first, and events only say "look".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Protocol

log = logging.getLogger(__name__)

Event = dict[str, Any]
#: Events a slow subscriber may fall behind by before the oldest are dropped.
SUBSCRIBER_BACKLOG = 256


class Subscription:
    """Events of one topic, as they arrive; `async with` ends the subscription."""

    def __init__(self, bus: BusBase, topic: str) -> None:
        self.bus = bus
        self.topic = topic
        self.queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_BACKLOG)

    def offer(self, event: Event) -> None:
        if self.queue.full():  # a stalled reader must not hold up the others
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            yield await self.queue.get()

    async def __aenter__(self) -> Subscription:
        await self.bus._add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.bus._remove(self)


class EventBus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, topic: str, event: Event) -> None: ...

    def subscribe(self, topic: str) -> Subscription: ...


class BusBase:
    """Fan-out to this process's subscribers; subclasses carry events between processes."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def subscribe(self, topic: str) -> Subscription:
        return Subscription(self, topic)

    async def _add(self, subscription: Subscription) -> None:
        first = subscription.topic not in self._subscribers
        self._subscribers.setdefault(subscription.topic, set()).add(subscription)
        if first:
            await self._listen(subscription.topic)

    async def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.topic)
        if subscribers is None:
            return
        subscribers.discard(subscription)
        if not subscribers:
            del self._subscribers[subscription.topic]
            await self._unlisten(subscription.topic)

    async def _listen(self, topic: str) -> None:
        return None

    async def _unlisten(self, topic: str) -> None:
        return None

    def deliver_locally(self, topic: str, event: Event) -> None:
        for subscription in list(self._subscribers.get(topic, ())):
            subscription.offer(event)


class LocalBus(BusBase):
    """Events within this process."""

    async def publish(self, topic: str, event: Event) -> None:
        self.deliver_locally(topic, event)


class RedisBus(BusBase):
    """Redis pub/sub (`[storage] redis_url`): one connection listens for every
    topic this process subscribes to, publishes go over the client's pool."""

    PREFIX = "aigc-bot:"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._client: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import redis.asyncio as redis

        self._client = redis.Redis.from_url(self.url)
        await self._client.ping()
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.PREFIX + "_")  # a live connection before any topic
        self._reader = asyncio.create_task(self._read(), name="redis-bus")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._client is not None:
            await self._client.aclose()

    async def publish(self, topic: str, event: Event) -> None:
        await self._client.publish(self.PREFIX + topic, json.dumps(event))

    async def _listen(self, topic: str) -> None:
        await self._pubsub.subscribe(self.PREFIX + topic)

    async def _unlisten(self, topic: str) -> None:
        await self._pubsub.unsubscribe(self.PREFIX + topic)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection dropped: redis-py reconnects
                log.warning("redis bus: %s; reconnecting", exc)
                await asyncio.sleep(1.0)
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            topic = (channel.decode() if isinstance(channel, bytes) else channel).removeprefix(
                self.PREFIX
            )
            try:
                event = json.loads(message["data"])
            except (ValueError, TypeError):
                continue
            self.deliver_locally(topic, event)
