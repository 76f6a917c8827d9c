"""Pushes to web visitors: `GET /api/events`, and the web channel's outbound half.

A visitor's widget keeps one Server-Sent Events stream open. When the bot
pushes a reply to a web conversation (an operator's answer, an answer
recovered after a restart), `WebOutbound.push` publishes it on the event bus
under `web.push`; every `aigc-bot run` process's `PushHub` forwards it to the
streams of that visitor it holds, so the visitor gets it whichever process
their widget is connected to. The reply is stored before it is pushed, so a
visitor who is away finds it in `GET /api/messages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from adapters.web.http import EventStream
from bot.bus import EventBus
from bot.messages import Address, ConversationKey, Image, Notice, Reply, Text

log = logging.getLogger(__name__)

TOPIC = "web.push"
#: Events waiting for one visitor's slow stream before the oldest are dropped.
STREAM_BACKLOG = 64
_CLOSE = "\x00close"


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def push_event(reply: Reply, media_base: str = "") -> tuple[str, dict[str, Any]] | None:
    """The SSE event for a pushed reply: `message` `{"role", "text", "at"}`
    (plus `author`, `source` or `kind` when they apply), or `image`."""
    at = now_iso()
    if isinstance(reply, Text) and reply.final:
        data: dict[str, Any] = {"role": reply.role, "text": reply.text, "at": at}
        if reply.author:
            data["author"] = reply.author
        if reply.source is not None and reply.role == "bot":
            data["source"] = reply.source.as_dict()
        return "message", data
    if isinstance(reply, Notice):
        return "message", {"role": "bot", "text": reply.text, "at": at, "kind": str(reply.kind)}
    if isinstance(reply, Image):
        return "image", {
            "role": "bot",
            "type": "image",
            "url": f"{media_base}/media/{reply.draw_id}.png",
            "seed": reply.seed,
            "caption": reply.caption,
            "at": at,
        }
    return None  # typing and partials are not pushed


class WebOutbound:
    """The web channel's outbound half: a push goes to the visitor's event streams."""

    platform = "web"

    def __init__(self, bus: EventBus, media_base: str = "") -> None:
        self.bus = bus
        self.media_base = media_base

    async def push(self, conversation: ConversationKey, to: Address, reply: Reply) -> None:
        event = push_event(reply, self.media_base)
        if event is None:
            return
        name, data = event
        await self.bus.publish(TOPIC, {"user_id": to.chat_id, "event": name, "data": data})


class PushHub:
    """This process's open `/api/events` streams, fed from the bus."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._streams: dict[str, set[asyncio.Queue[tuple[str, dict[str, Any]]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._forward(), name="web-push-hub")
        await self.subscribed.wait()

    async def close(self) -> None:
        """End every open stream (they finish their response), then stop forwarding."""
        for queues in self._streams.values():
            for queue in queues:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait((_CLOSE, {}))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _forward(self) -> None:
        async with self.bus.subscribe(TOPIC) as events:
            self.subscribed.set()
            async for event in events:
                for queue in list(self._streams.get(str(event.get("user_id")), ())):
                    if queue.full():  # a stalled stream loses its oldest event, not the others
                        with contextlib.suppress(asyncio.QueueEmpty):
                            queue.get_nowait()
                    queue.put_nowait((str(event["event"]), dict(event["data"])))

    @contextlib.contextmanager
    def listen(self, user_id: str) -> Any:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(STREAM_BACKLOG)
        self._streams.setdefault(user_id, set()).add(queue)
        try:
            yield queue
        finally:
            streams = self._streams.get(user_id)
            if streams is not None:
                streams.discard(queue)
                if not streams:
                    del self._streams[user_id]

    async def stream(
        self, request: web.Request, user_id: str, heartbeat_s: float
    ) -> web.StreamResponse:
        """`GET /api/events`: pushed replies as they come, a comment every
        `heartbeat_s` so proxies keep the stream open, until the visitor leaves."""
        stream = EventStream(request)
        with self.listen(user_id) as queue:
            await stream.comment("connected")
            while not stream.gone:
                try:
                    name, data = await asyncio.wait_for(queue.get(), heartbeat_s)
                except TimeoutError:
                    await stream.comment("keep-alive")
                    continue
                if name == _CLOSE:
                    break
                await stream.send(name, data)
        return await stream.finish()
