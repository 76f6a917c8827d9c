"""The Telegram channel, on python-telegram-bot's `Application`.

Flow: PTB fetches updates (long polling, or its webhook server) and calls
`_on_update` for each, one after another. That handler only reads the message
into an `Incoming`, takes the message's turn in its conversation and starts a
task; the task feeds the manager and renders the replies: a typing indicator
while it works, texts split at 4,096 characters, pictures with their seed,
notices. Conversations run concurrently; within one, replies leave in the
order the messages came (`ReplyOrder`). Every Bot API call but `getUpdates`
goes through `PacedRateLimiter` (per-chat pace, group and global limits,
`RetryAfter` and network errors retried).

In groups the bot answers a mention, a reply to one of its messages or a
command (`/cmd` or `/cmd@thisbot`), threading its answer to that message;
with `[bot] group_messages = "all"` it answers every text it is shown.
Stickers, photos, voice and other non-text messages addressed to it get a
short "text only" answer. Edited messages are ignored, or with
`edited_messages = "answer"` answered like new ones. Partial (streaming)
texts are not shown: the typing indicator runs until the whole answer is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import urlsplit

from telegram import BotCommand, Message, Update
from telegram.constants import ChatType, MessageEntityType
from telegram.error import Forbidden, InvalidToken, TelegramError
from telegram.ext import Application, ContextTypes, TypeHandler

from adapters.telegram.outbound import Destination, PacedRateLimiter, ReplyOrder, ReplyWriter, Turn
from bot.app import StartupError
from bot.channels import Handler, Services, platform_token
from bot.commands import COMMANDS, parse_command
from bot.config import Config, read_secret
from bot.logging_setup import register_secret
from bot.manager import INTERNAL_ERROR
from bot.messages import ConversationKey, Incoming, Notice, NoticeKind, Reply, Typing

log = logging.getLogger(__name__)

PLATFORM = "telegram"
TEXT_ONLY = "I can only read text messages. Please type what you'd like to say."
POLL_TIMEOUT_S = 30  # long-poll wait of one getUpdates call


def mentions(message: Message, username: str) -> bool:
    """Whether the text or caption has an @mention of `username`."""
    wanted = "@" + username.lower()
    found = {
        **message.parse_entities([MessageEntityType.MENTION]),
        **message.parse_caption_entities([MessageEntityType.MENTION]),
    }
    return any(text.lower() == wanted for text in found.values())


def replies_to(message: Message, bot_id: int) -> bool:
    """Whether the message answers one of the bot's own messages."""
    original = message.reply_to_message
    if original is None or original.from_user is None:
        return False
    if message.is_topic_message and original.message_id == message.message_thread_id:
        return False  # every message in a forum topic "replies" to the topic's first message
    return original.from_user.id == bot_id


def strip_mention(text: str, username: str) -> str:
    """The text without `@username` (and a comma or colon right after it)."""
    pattern = re.compile(rf"[ \t]*(?<![\w@])@{re.escape(username)}\b[,:;]?[ \t]*", re.IGNORECASE)
    return pattern.sub(" ", text).strip()


async def _one(reply: Reply) -> AsyncIterator[Reply]:
    yield reply


class TelegramChannel:
    name: ClassVar[str] = "telegram"
    in_run: ClassVar[bool] = True

    def __init__(self, services: Services, token: str) -> None:
        self.config: Config = services.config
        self.section = services.config.telegram
        self.handle: Handler = services.handle
        self.application: Application[Any, Any, Any, Any, Any, Any] = (
            Application.builder()
            .token(token)
            .base_url(self.section.base_url)
            .base_file_url(self.section.base_file_url)
            .rate_limiter(PacedRateLimiter())
            .build()
        )
        self.application.add_handler(TypeHandler(Update, self._on_update))
        self.application.add_error_handler(self._on_error)
        self._order = ReplyOrder()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def create(cls, services: Services) -> TelegramChannel | None:
        section = services.config.telegram
        token = platform_token("telegram", section.enabled, section.token_env)
        if token is None:
            return None
        if section.mode == "webhook" and not section.webhook_url:
            raise StartupError('telegram.webhook_url is required when telegram.mode = "webhook"')
        # httpx logs every request URL at INFO, and Bot API URLs hold the token.
        httpx_logger = logging.getLogger("httpx")
        if httpx_logger.getEffectiveLevel() < logging.WARNING:
            httpx_logger.setLevel(logging.WARNING)
        return cls(services, token)

    @property
    def allowed_updates(self) -> list[str]:
        if self.section.edited_messages == "answer":
            return [Update.MESSAGE, Update.EDITED_MESSAGE]
        return [Update.MESSAGE]

    # -- lifetime -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        app = self.application
        try:
            await app.initialize()
        except BaseException as exc:
            # Application.shutdown() skips a half-initialized bot: close its connections here.
            await app.bot.shutdown()
            if isinstance(exc, InvalidToken):
                raise StartupError(
                    f"telegram: the Bot API at {self.section.base_url} rejected the token "
                    f"in ${self.section.token_env}"
                ) from None
            raise
        try:
            await app.bot.set_my_commands(
                [BotCommand(info.name, info.summary) for info in COMMANDS]
            )
        except TelegramError as exc:
            log.warning("telegram: could not register the command list: %s", exc)
        await app.start()
        assert app.updater is not None
        if self.section.mode == "webhook":
            await app.updater.start_webhook(
                listen=self.section.webhook_listen,
                port=self.section.webhook_port,
                url_path=urlsplit(self.section.webhook_url).path.strip("/"),
                webhook_url=self.section.webhook_url,
                secret_token=self._webhook_secret(),
                allowed_updates=self.allowed_updates,
            )
        else:
            await app.updater.start_polling(
                poll_interval=self.section.poll_interval_s,
                timeout=POLL_TIMEOUT_S,
                allowed_updates=self.allowed_updates,
                error_callback=self._on_polling_error,
            )
        log.info(
            "telegram channel: @%s via %s (%s)",
            app.bot.username,
            self.section.mode,
            urlsplit(self.section.base_url).netloc,
        )

    def _webhook_secret(self) -> str:
        secret = read_secret(self.section.webhook_secret_env)
        if secret is not None:
            return secret.get_secret_value()
        log.info(
            "telegram: %s is not set; using a random webhook secret "
            "(set it when several processes share the webhook)",
            self.section.webhook_secret_env,
        )
        value = secrets.token_urlsafe(32)
        register_secret(value)
        return value

    async def stop(self) -> None:
        """Stop fetching, let the answers in flight finish (within the
        shutdown grace), then close the Bot API connections."""
        app = self.application
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        await self._drain(self.config.bot.shutdown_grace_s)
        if app.running:
            await app.stop()
        await app.shutdown()

    async def _drain(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- inbound --------------------------------------------------------------------

    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Runs for every update in arrival order; must not wait on anything."""
        message = update.message
        if update.edited_message is not None and self.section.edited_messages == "answer":
            message = update.edited_message
        if message is None:
            return
        incoming = self.read(message)
        if incoming is None:
            return
        if message.text is not None:
            replies = self.handle(incoming)
        elif incoming.addressed:
            replies = _one(Notice(TEXT_ONLY, NoticeKind.EMPTY))
        else:
            return  # group_messages = "all" answers text, not every sticker in the group
        key = ConversationKey.for_message(incoming, self.config.bot.history_scope)
        turn = self._order.take(key)
        task = self.application.create_task(
            self._answer(ReplyWriter(self.application.bot, Destination.of(message)), replies, turn),
            update=update,
            name=f"telegram:{message.chat_id}:{message.message_id}",
        )
        # Released when the task is over, error handler included, so that an
        # apology for a failed message still comes before the next answer.
        task.add_done_callback(lambda _: turn.done())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def read(self, message: Message) -> Incoming | None:
        """The message as the bot sees it, or None when it is not for the bot."""
        user = message.from_user
        if user is None or user.is_bot:
            return None
        if message.text is None and message.effective_attachment is None:
            return None  # a service message: someone joined, a pin, a new title...
        bot = self.application.bot
        private = message.chat.type == ChatType.PRIVATE
        body = message.text or message.caption or ""
        command = parse_command(body)
        if (
            command is not None
            and command.addressed_to is not None
            and command.addressed_to.lower() != bot.username.lower()
            and not private
        ):
            return None  # /cmd@another_bot
        addressed = (
            private
            or command is not None
            or mentions(message, bot.username)
            or replies_to(message, bot.id)
        )
        if not addressed and self.config.bot.group_messages == "addressed":
            return None
        return Incoming(
            platform=PLATFORM,
            chat_id=str(message.chat_id),
            user_id=str(user.id),
            user_name=user.full_name,
            text=strip_mention(message.text, bot.username) if message.text else "",
            message_id=str(message.message_id),
            is_private=private,
            addressed=addressed,
        )

    # -- outbound -------------------------------------------------------------------

    async def _answer(self, writer: ReplyWriter, replies: AsyncIterator[Reply], turn: Turn) -> None:
        typing: asyncio.Task[None] | None = None
        try:
            async with contextlib.aclosing(replies):
                async for reply in replies:
                    if isinstance(reply, Typing):
                        typing = typing or asyncio.create_task(writer.keep_typing())
                        continue
                    if not writer.shows(reply):
                        continue
                    await turn.wait()
                    if typing is not None:
                        typing.cancel()
                        typing = None
                    await writer.write(reply)
        finally:
            if typing is not None:
                typing.cancel()

    # -- errors ---------------------------------------------------------------------

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """PTB's central error handler: one failing update never stops the bot."""
        error = context.error
        if isinstance(error, Forbidden):
            log.info("telegram: cannot write to the chat any more: %s", error)
            return
        update_id = update.update_id if isinstance(update, Update) else None
        log.error("telegram: handling update %s failed", update_id, exc_info=error)
        if isinstance(error, TelegramError) or not isinstance(update, Update):
            return  # the Bot API is what failed: an apology would fail the same way
        message = update.effective_message
        if message is None:
            return
        try:
            await ReplyWriter(self.application.bot, Destination.of(message)).send_text(
                INTERNAL_ERROR
            )
        except TelegramError as exc:
            log.warning(
                "telegram: could not tell chat %s about the error: %s", message.chat_id, exc
            )

    def _on_polling_error(self, error: TelegramError) -> None:
        log.warning("telegram: getUpdates failed (%s); retrying", error)
