"""The outbound half of the Telegram channel: rendering replies, pacing
requests, keeping replies in order.

`ReplyWriter` renders the manager's replies for one incoming message (split
texts, photos with their seed, notices edited in place, typing).
`PacedRateLimiter` plugs into python-telegram-bot as the bot's rate limiter,
so every Bot API call except `getUpdates` passes through it. `ReplyOrder`
keeps the replies of one conversation in the order its messages arrived while
other conversations go ahead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

from telegram import Bot, InputFile, Message, ReplyParameters
from telegram.constants import ChatAction, ChatType, MessageLimit
from telegram.error import BadRequest, NetworkError, TelegramError
from telegram.ext import AIORateLimiter

from adapters.splitting import split_message
from bot.messages import Image, Notice, NoticeKind, Reply, Text

log = logging.getLogger(__name__)

# Telegram's published limits: about one message per second in a chat, 20 a
# minute in a group (AIORateLimiter's group default), 30 a second overall.
PER_CHAT_INTERVAL_S = 1.0
RETRIES = 5
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
_UNPACED = frozenset({"sendChatAction"})
_PACE_TABLE_SIZE = 1024
TYPING_REFRESH_S = 4.0  # Telegram shows "typing…" for about 5 s
PROGRESS_EDIT_INTERVAL_S = 3.0  # progress notices are edited in place at most this often
TEXT_LIMIT = MessageLimit.MAX_TEXT_LENGTH  # 4096
CAPTION_LIMIT = MessageLimit.CAPTION_LENGTH  # 1024

ApiCall = Callable[..., Coroutine[Any, Any, Any]]


class PacedRateLimiter(AIORateLimiter):
    """PTB's `AIORateLimiter` (30 requests/s overall, 20/min per group,
    `RetryAfter` waited out and retried) plus what it lacks: about one message
    per second per chat, network errors retried with exponential backoff, and
    chat actions kept out of the message budgets (a typing indicator is best
    effort and must not delay an answer)."""

    def __init__(
        self,
        *,
        per_chat_interval_s: float = PER_CHAT_INTERVAL_S,
        retries: int = RETRIES,
        first_backoff_s: float = FIRST_BACKOFF_S,
    ) -> None:
        super().__init__(max_retries=retries)
        self._interval = per_chat_interval_s
        self._retries = retries
        self._first_backoff_s = first_backoff_s
        self._next_slot: dict[str, float] = {}

    async def process_request(
        self,
        callback: ApiCall,
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> Any:
        if endpoint in _UNPACED:
            return await callback(*args, **kwargs)
        backoff = self._first_backoff_s
        attempt = 0
        while True:
            await self._pace(data.get("chat_id"))
            try:
                return await super().process_request(
                    callback, args, kwargs, endpoint, data, rate_limit_args
                )
            except BadRequest:
                raise  # the request itself is wrong; sending it again changes nothing
            except NetworkError as exc:
                attempt += 1
                if attempt > self._retries:
                    raise
                log.warning(
                    "Telegram %s failed (%s); retry %d/%d in %.1f s",
                    endpoint,
                    exc,
                    attempt,
                    self._retries,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _pace(self, chat_id: object) -> None:
        """Wait for this chat's next free slot; slots are handed out in call order."""
        if chat_id is None or self._interval <= 0:
            return
        now = asyncio.get_running_loop().time()
        key = str(chat_id)
        slot = max(now, self._next_slot.get(key, now))
        self._next_slot[key] = slot + self._interval
        if len(self._next_slot) > _PACE_TABLE_SIZE:
            for stale in [k for k, free_at in self._next_slot.items() if free_at <= now]:
                del self._next_slot[stale]
        if slot > now:
            await asyncio.sleep(slot - now)


class Turn:
    """One message's place in its conversation's queue of replies."""

    def __init__(self, previous: asyncio.Future[None] | None, own: asyncio.Future[None]) -> None:
        self._previous = previous
        self._own = own

    async def wait(self) -> None:
        """Until every earlier message of the conversation has been answered."""
        if self._previous is not None and not self._previous.done():
            await asyncio.wait([self._previous])

    def done(self) -> None:
        if not self._own.done():
            self._own.set_result(None)


class ReplyOrder:
    """Per-key FIFO of turns. `take` is called in arrival order (from the
    update handler, before any await), so replies leave in that order even
    when a later message is answered sooner; different keys never wait for
    each other. A key is forgotten once its last turn is done."""

    def __init__(self) -> None:
        self._tails: dict[Hashable, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def take(self, key: Hashable) -> Turn:
        own: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turn = Turn(self._tails.get(key), own)
        self._tails[key] = own
        own.add_done_callback(lambda future: self._release(key, future))
        return turn

    def _release(self, key: Hashable, future: asyncio.Future[None]) -> None:
        if self._tails.get(key) is future:
            del self._tails[key]


@dataclass(frozen=True, slots=True)
class Destination:
    """Where the replies to one message go: its chat and forum topic, and in
    groups a reply to the message itself."""

    chat_id: int
    thread_id: int | None
    reply_to: int | None

    @classmethod
    def of(cls, message: Message) -> Destination:
        private = message.chat.type == ChatType.PRIVATE
        return cls(
            chat_id=message.chat_id,
            thread_id=message.message_thread_id if message.is_topic_message else None,
            reply_to=None if private else message.message_id,
        )

    def send_kwargs(self) -> dict[str, Any]:
        reply = (
            ReplyParameters(self.reply_to, allow_sending_without_reply=True)
            if self.reply_to is not None
            else None
        )
        return {
            "chat_id": self.chat_id,
            "message_thread_id": self.thread_id,
            "reply_parameters": reply,
        }


class ReplyWriter:
    """Renders the replies to one incoming message. Texts are split at 4,096
    characters (never cut); a picture goes out with its seed in the caption
    and replaces its progress notice; a notice whose `ref` was seen before
    edits that message instead of sending another."""

    def __init__(self, bot: Bot, where: Destination) -> None:
        self.bot = bot
        self.where = where
        self._notices: dict[str, tuple[int, float]] = {}  # ref -> (message id, last edit)

    @staticmethod
    def shows(reply: Reply) -> bool:
        """False for what is not rendered: partial texts (the typing indicator
        runs until the whole answer is there) and progress that cannot be
        edited in place (it would be spam)."""
        if isinstance(reply, Text):
            return reply.final
        if isinstance(reply, Notice):
            return reply.kind is not NoticeKind.PROGRESS or reply.ref is not None
        return True

    async def write(self, reply: Reply) -> None:
        if isinstance(reply, Text):
            await self.send_text(reply.text)
        elif isinstance(reply, Image):
            await self._send_image(reply)
        elif isinstance(reply, Notice):
            await self._send_notice(reply)

    async def send_text(self, text: str) -> Message | None:
        """Every part of `text`, in order; returns the last message sent."""
        sent = None
        for part in split_message(text, TEXT_LIMIT):
            if part.strip():
                sent = await self.bot.send_message(text=part, **self.where.send_kwargs())
        return sent

    async def keep_typing(self) -> None:
        """Show "typing…" until cancelled."""
        while True:
            try:
                await self.bot.send_chat_action(
                    self.where.chat_id, ChatAction.TYPING, message_thread_id=self.where.thread_id
                )
            except TelegramError as exc:
                log.debug("telegram: typing indicator failed: %s", exc)
            await asyncio.sleep(TYPING_REFRESH_S)

    async def _send_image(self, image: Image) -> None:
        caption = image.caption.strip()
        if str(image.seed) not in caption:
            caption = f"{caption} (seed {image.seed})".strip()
        photo = InputFile(image.png, filename=f"draw-{image.seed}.png")
        fits = len(caption) <= CAPTION_LIMIT
        await self.bot.send_photo(
            photo=photo,
            caption=caption if fits else f"seed {image.seed}",
            **self.where.send_kwargs(),
        )
        if not fits:
            await self.send_text(caption)
        shown = self._notices.pop(image.draw_id, None) if image.draw_id else None
        if shown is not None:
            try:
                await self.bot.delete_message(self.where.chat_id, shown[0])
            except BadRequest as exc:
                log.debug("telegram: deleting a progress notice failed: %s", exc)

    async def _send_notice(self, notice: Notice) -> None:
        earlier = self._notices.get(notice.ref) if notice.ref else None
        if earlier is None or len(notice.text) > TEXT_LIMIT:
            sent = await self.send_text(notice.text)
            if notice.ref and sent is not None:
                self._notices[notice.ref] = (sent.message_id, -math.inf)
            return
        message_id, edited_at = earlier
        now = time.monotonic()
        if notice.kind is NoticeKind.PROGRESS and now - edited_at < PROGRESS_EDIT_INTERVAL_S:
            return
        try:
            await self.bot.edit_message_text(
                notice.text, chat_id=self.where.chat_id, message_id=message_id
            )
        except BadRequest as exc:  # "message is not modified", or it was deleted
            log.debug("telegram: editing a notice failed: %s", exc)
        self._notices[notice.ref] = (message_id, now)  # type: ignore[index]
