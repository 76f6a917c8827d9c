"""The outbound half of the Telegram channel: pacing requests and rendering
replies into a chat.

`PacedRateLimiter` plugs into python-telegram-bot as the bot's rate limiter,
so every Bot API call except `getUpdates` passes through it. `TelegramTarget`
is one chat (and forum topic), answering one message or receiving a push:
texts up to 4,096 characters, photos with their seed, notices edited in
place, "typing…". `TelegramOutbound` is what `Services.delivery` pushes
through; its `order` keeps one conversation's deliveries in sequence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

from telegram import Bot, InputFile, Message, ReplyParameters
from telegram.constants import ChatAction, ChatType, MessageLimit
from telegram.error import BadRequest, NetworkError, TelegramError
from telegram.ext import AIORateLimiter

from adapters.outbound import Outbound, Target
from bot.messages import Address, Image

log = logging.getLogger(__name__)

# Telegram's published limits: about one message per second in a chat, 20 a
# minute in a group (AIORateLimiter's group default), 30 a second overall.
PER_CHAT_INTERVAL_S = 1.0
RETRIES = 5
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
_UNPACED = frozenset({"sendChatAction"})
_PACE_TABLE_SIZE = 1024
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
        if endpoint in _UNPACED or endpoint == "getUpdates":
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


@dataclass(frozen=True, slots=True)
class Destination:
    """Where replies go: a chat and forum topic, and in groups a reply to the
    message being answered."""

    chat_id: int | str
    thread_id: int | None = None
    reply_to: int | None = None

    @classmethod
    def of(cls, message: Message) -> Destination:
        private = message.chat.type == ChatType.PRIVATE
        return cls(
            chat_id=message.chat_id,
            thread_id=message.message_thread_id if message.is_topic_message else None,
            reply_to=None if private else message.message_id,
        )

    @classmethod
    def at(cls, address: Address) -> Destination:
        thread = int(address.thread_id) if address.thread_id.lstrip("-").isdigit() else None
        chat = int(address.chat_id) if address.chat_id.lstrip("-").isdigit() else address.chat_id
        return cls(chat_id=chat, thread_id=thread)

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


class TelegramTarget(Target):
    text_limit: ClassVar[int] = MessageLimit.MAX_TEXT_LENGTH  # 4096
    typing_every_s: ClassVar[float] = 4.0  # Telegram shows "typing…" for about 5 s

    progress_every_s: ClassVar[float] = 3.0  # progress is edited in place at most this often

    def __init__(self, bot: Bot, where: Destination) -> None:
        self.bot = bot
        self.where = where

    async def send_text(self, text: str) -> Message:
        return await self.bot.send_message(text=text, **self.where.send_kwargs())

    async def send_image(self, image: Image) -> Message:
        caption = image.caption.strip()
        if str(image.seed) not in caption:
            caption = f"{caption} (seed {image.seed})".strip()
        photo = InputFile(image.png, filename=f"draw-{image.seed}.png")
        fits = len(caption) <= CAPTION_LIMIT
        sent = await self.bot.send_photo(
            photo=photo,
            caption=caption if fits else f"seed {image.seed}",
            **self.where.send_kwargs(),
        )
        if not fits:
            for start in range(0, len(caption), self.text_limit):
                await self.send_text(caption[start : start + self.text_limit])
        return sent

    async def edit_text(self, sent: Any, text: str) -> bool:
        try:
            await self.bot.edit_message_text(
                text, chat_id=self.where.chat_id, message_id=sent.message_id
            )
        except BadRequest as exc:  # "message is not modified", or it was deleted
            log.debug("telegram: editing a notice failed: %s", exc)
        return True

    async def delete(self, sent: Any) -> None:
        try:
            await self.bot.delete_message(self.where.chat_id, sent.message_id)
        except BadRequest as exc:
            log.debug("telegram: deleting a message failed: %s", exc)

    async def show_typing(self) -> None:
        try:
            await self.bot.send_chat_action(
                self.where.chat_id, ChatAction.TYPING, message_thread_id=self.where.thread_id
            )
        except TelegramError as exc:
            log.debug("telegram: typing indicator failed: %s", exc)


class TelegramOutbound(Outbound):
    platform = "telegram"

    def __init__(self, bot: Bot) -> None:
        super().__init__()
        self.bot = bot

    def target_for(self, to: Address) -> TelegramTarget:
        return TelegramTarget(self.bot, Destination.at(to))
