"""The outbound half every channel shares: rendering replies onto a `Target`.

A platform implements `Target` — one required method, `send_text`, for one
message of at most `text_limit` characters; pictures, editing an earlier
notice in place, typing indicators and streaming partials are optional and
fall back to text (or to nothing, for typing and partials). `Renderer` walks
the replies of one request or one push onto a target: it splits long texts
(never truncating), keeps a typing indicator alive until the next visible
reply, edits a notice whose `ref` it has seen, and lets a picture replace its
progress notice. `DeliveryOrder` keeps one conversation's deliveries in the
order they were asked for, whatever each one's retries cost, while other
conversations go ahead. `Outbound` ties them together for a platform: the
request path (`deliver`) and pushes (`push`) go through the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Hashable
from typing import Any, ClassVar

from adapters.splitting import split_message
from bot.messages import Address, ConversationKey, Image, Notice, NoticeKind, Reply, Text, Typing

log = logging.getLogger(__name__)


class Target(ABC):
    """Where the replies of one delivery go."""

    #: The longest message the platform takes, in characters.
    text_limit: ClassVar[int] = 4096
    #: How often the typing indicator must be refreshed (0: the platform has none).
    typing_every_s: ClassVar[float] = 0.0
    #: Progress notices are edited in place at most this often (0: every one).
    progress_every_s: ClassVar[float] = 0.0
    #: The platform shows who wrote a message itself; otherwise an operator's
    #: reply starts with their name ("Sam: ...").
    shows_author: ClassVar[bool] = False

    @abstractmethod
    async def send_text(self, text: str) -> Any:
        """Send one message (at most `text_limit` characters); returns a handle
        that `edit_text`/`delete` accept, or None."""

    async def send_image(self, image: Image) -> Any:
        """A picture; without pictures, its caption and seed as text."""
        return await self.send_text(image_caption(image) + "\n(pictures can't be shown here)")

    async def edit_text(self, sent: Any, text: str) -> bool:
        """Replace an earlier message's text; False when the platform can't
        (then a new message is sent)."""
        return False

    async def delete(self, sent: Any) -> None:
        return None

    async def show_typing(self) -> None:
        return None

    async def show_partial(self, text: str) -> None:
        """The reply so far, while it is written; platforms without streaming skip it."""
        return None

    async def finish(self, sent_anything: bool) -> None:
        return None


def image_caption(image: Image) -> str:
    """The caption, with the seed (so a picture can be made again)."""
    seed = str(image.seed)
    caption = image.caption.strip()
    if seed in caption:
        return caption
    return f"{caption}\nseed: {seed}" if caption else f"seed: {seed}"


class Slot:
    """One delivery's place in its conversation's queue."""

    def __init__(self, previous: asyncio.Future[None] | None, own: asyncio.Future[None]) -> None:
        self._previous = previous
        self._own = own

    async def wait(self) -> None:
        """Until every earlier delivery of the conversation is done."""
        if self._previous is not None and not self._previous.done():
            await asyncio.wait([self._previous])

    def done(self) -> None:
        if not self._own.done():
            self._own.set_result(None)


class DeliveryOrder:
    """Per-conversation FIFO of deliveries. `take` must be called in arrival
    order (before any await), so deliveries leave in that order even when a
    later one is ready sooner; different keys never wait for each other."""

    def __init__(self) -> None:
        self._tails: dict[Hashable, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def take(self, key: Hashable) -> Slot:
        own: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slot = Slot(self._tails.get(key), own)
        self._tails[key] = own
        own.add_done_callback(lambda future: self._release(key, future))
        return slot

    def _release(self, key: Hashable, future: asyncio.Future[None]) -> None:
        if self._tails.get(key) is future:
            del self._tails[key]


class Renderer:
    """Renders replies onto one target, in order, within its limits."""

    def __init__(self, target: Target, slot: Slot | None = None) -> None:
        self.target = target
        self.slot = slot
        self.sent = 0
        self._notices: dict[str, Any] = {}
        self._edited_at: dict[str, float] = {}
        self._typing: asyncio.Task[None] | None = None
        self._waited = slot is None

    async def run(self, replies: AsyncIterator[Reply]) -> int:
        """Render every reply; returns how many messages were sent. The replies
        generator is closed however this ends, so the manager finishes its
        bookkeeping for the request instead of waiting for it."""
        try:
            async with contextlib.aclosing(replies):  # type: ignore[type-var]
                async for reply in replies:
                    await self.render(reply)
        finally:
            await self._stop_typing()
        await self.target.finish(self.sent > 0)
        return self.sent

    async def render(self, reply: Reply) -> None:
        if isinstance(reply, Typing):
            self._start_typing()
            return
        if isinstance(reply, Text) and not reply.final:
            await self._turn()
            await self.target.show_partial(reply.text)
            return
        await self._turn()
        await self._stop_typing()
        if isinstance(reply, Text):
            text = reply.text
            if reply.role == "operator" and reply.author and not self.target.shows_author:
                text = f"{reply.author}: {text}"
            await self._send_text(text)
        elif isinstance(reply, Image):
            await self._send_image(reply)
        elif isinstance(reply, Notice):
            await self._send_notice(reply)

    async def _turn(self) -> None:
        if not self._waited and self.slot is not None:
            self._waited = True
            await self.slot.wait()

    async def _send_text(self, text: str) -> Any:
        last = None
        for part in split_message(text, self.target.text_limit):
            if part.strip():  # platforms refuse blank messages
                last = await self.target.send_text(part)
                self.sent += 1
        return last

    async def _send_image(self, image: Image) -> None:
        await self.target.send_image(image)
        self.sent += 1
        progress = self._notices.pop(image.draw_id, None) if image.draw_id else None
        if progress is not None:
            try:
                await self.target.delete(progress)
            except Exception as exc:  # a progress notice left behind is harmless
                log.debug("deleting a progress notice failed: %s", exc)

    async def _send_notice(self, notice: Notice) -> None:
        progress = notice.kind is NoticeKind.PROGRESS
        if progress and notice.ref is None:
            return  # progress that can't be edited in place would be spam
        earlier = self._notices.get(notice.ref) if notice.ref else None
        if earlier is not None and len(notice.text) <= self.target.text_limit:
            assert notice.ref is not None
            now = time.monotonic()
            if progress and now - self._edited_at.get(notice.ref, -1e9) < (
                self.target.progress_every_s
            ):
                return  # edited a moment ago: skip this step rather than spam
            if await self.target.edit_text(earlier, notice.text):
                self._edited_at[notice.ref] = now
                return
        if progress and earlier is not None:
            return
        sent = await self._send_text(notice.text)
        if notice.ref and sent is not None:
            self._notices[notice.ref] = sent
            self._edited_at[notice.ref] = -1e9

    def _start_typing(self) -> None:
        if self._typing is not None or self.target.typing_every_s <= 0:
            return
        self._typing = asyncio.create_task(self._keep_typing(), name="typing")

    async def _keep_typing(self) -> None:
        while True:
            try:
                await self.target.show_typing()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # best effort: never delays or breaks an answer
                log.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(self.target.typing_every_s)

    async def _stop_typing(self) -> None:
        task, self._typing = self._typing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Outbound(ABC):
    """A platform's outbound half: requests and pushes, one order per conversation."""

    platform: str

    def __init__(self) -> None:
        self.order = DeliveryOrder()

    @abstractmethod
    def target_for(self, to: Address) -> Target:
        """A target that writes to `to` with no request to answer (a push)."""

    async def deliver(
        self, replies: AsyncIterator[Reply], target: Target, slot: Slot | None = None
    ) -> int:
        """The request path: render one request's replies in its slot."""
        try:
            return await Renderer(target, slot).run(replies)
        finally:
            if slot is not None:
                slot.done()

    async def push(self, conversation: ConversationKey, to: Address, reply: Reply) -> None:
        """Deliver one reply to `to` after what is on its way to that conversation."""
        slot = self.order.take(conversation)
        try:
            renderer = Renderer(self.target_for(to), slot)
            await renderer.render(reply)
        finally:
            slot.done()
