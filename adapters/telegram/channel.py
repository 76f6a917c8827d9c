"""The Telegram channel on python-telegram-bot's `ExtBot`.

Flow: the channel connects (`getMe`, retried with backoff while the Bot API
cannot be reached; a rejected token turns the channel off with one loud line,
the other channels go on), registers the command menu, attaches its outbound
half to the bot's delivery, then fetches updates — long polling, or a webhook
server of its own. Each update is read into an `Incoming` (adapters.telegram
.inbound) and handed to the manager in a task of its own; the update is
confirmed to the Bot API (the next `getUpdates` offset, or the webhook's 200)
only once the manager has committed the message, so a crash never loses one.
Replies are rendered by adapters.telegram.outbound in the conversation's
delivery order; every Bot API call but `getUpdates` is paced by
`PacedRateLimiter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from typing import ClassVar
from urllib.parse import urlsplit

from aiohttp import web
from telegram import BotCommand, Update
from telegram.error import Forbidden, InvalidToken, TelegramError
from telegram.ext import ExtBot

from adapters.outbound import Slot
from adapters.telegram.inbound import Reader
from adapters.telegram.outbound import (
    Destination,
    PacedRateLimiter,
    TelegramOutbound,
    TelegramTarget,
)
from bot.channels import ChannelState, Handler, Services, StartupError, platform_token
from bot.config import Config, read_secret
from bot.logging_setup import register_secret
from bot.messages import ConversationKey, Notice, NoticeKind, Reply
from bot.texts import INTERNAL_ERROR, TEXT_ONLY

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 30  # long-poll wait of one getUpdates call
MAX_BACKOFF_S = 60.0


async def _one(reply: Reply) -> AsyncGenerator[Reply, None]:
    yield reply


class TelegramChannel:
    name: ClassVar[str] = "telegram"
    in_run: ClassVar[bool] = True
    first_backoff_s: ClassVar[float] = 1.0

    def __init__(self, services: Services, token: str) -> None:
        self.services = services
        self.config: Config = services.config
        self.section = services.config.telegram
        self.handle: Handler = services.handle
        self.bot = ExtBot(
            token,
            base_url=self.section.base_url,
            base_file_url=self.section.base_file_url,
            rate_limiter=PacedRateLimiter(),
        )
        self.outbound = TelegramOutbound(self.bot)
        self.health = ChannelState()
        self.reader: Reader | None = None
        self._main: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._webhook: web.AppRunner | None = None
        self._secret = ""

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
        """Connect and fetch updates in the background: a Bot API that cannot
        be reached yet is retried while the other channels serve."""
        self._main = asyncio.create_task(self._run(), name="telegram")

    async def stop(self) -> None:
        """Stop fetching, let the answers in flight finish (within the
        shutdown grace), then close the Bot API connections."""
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if self._webhook is not None:
            await self._webhook.cleanup()
            self._webhook = None
        await self._drain(self.config.bot.shutdown_grace_s)
        self.services.delivery.detach(self.outbound)
        with contextlib.suppress(Exception):
            await self.bot.shutdown()
        self.health = ChannelState("off", "stopped")

    async def _drain(self, grace: float) -> None:
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _run(self) -> None:
        if not await self._connect():
            return
        try:
            await self.bot.set_my_commands(
                [BotCommand(spec.name, spec.summary) for spec in self.services.commands.public()]
            )
        except TelegramError as exc:
            log.warning("telegram: could not register the command list: %s", exc)
        self.services.delivery.attach(self.outbound)
        log.info(
            "telegram channel: @%s via %s (%s)",
            self.bot.username,
            self.section.mode,
            urlsplit(self.section.base_url).netloc,
        )
        if self.section.mode == "webhook":
            await self._serve_webhook()
            self.health = ChannelState("up")
            await asyncio.Event().wait()  # until stop() cancels us
        else:
            await self._poll()

    async def _connect(self) -> bool:
        """`getMe` until it works; False when the token is rejected."""
        pause = self.first_backoff_s
        while True:
            try:
                await self.bot.initialize()
            except InvalidToken:
                self._token_rejected()
                return False
            except TelegramError as exc:
                self.health = ChannelState("down", f"cannot reach the Bot API ({exc})")
                log.warning(
                    "telegram: cannot reach the Bot API at %s (%s); retrying in %.0f s",
                    urlsplit(self.section.base_url).netloc,
                    exc,
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_BACKOFF_S)
                continue
            self.reader = Reader(self.config, self.bot.username, self.bot.id)
            return True

    def _token_rejected(self) -> None:
        message = (
            f"telegram: the Bot API at {self.section.base_url} rejected the token in "
            f"${self.section.token_env}; the Telegram channel is off "
            "(get a new token from @BotFather; `aigc-bot doctor` checks it)"
        )
        log.error(message)
        self.health = ChannelState("off", "the Bot API rejected the token")

    # -- inbound: polling and the webhook --------------------------------------------

    async def _poll(self) -> None:
        """Long polling. An update is confirmed (by the next call's offset) only
        after `_take` has seen its message committed."""
        offset: int | None = None
        pause = self.first_backoff_s
        with contextlib.suppress(TelegramError):
            await self.bot.delete_webhook()
        while True:
            try:
                updates = await self.bot.get_updates(
                    offset=offset,
                    timeout=POLL_TIMEOUT_S,
                    allowed_updates=self.allowed_updates,
                    read_timeout=POLL_TIMEOUT_S + 10,
                )
            except InvalidToken:
                self._token_rejected()
                return
            except TelegramError as exc:
                self.health = ChannelState("down", f"getUpdates failed ({exc})")
                log.warning("telegram: getUpdates failed (%s); retrying in %.0f s", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_BACKOFF_S)
                continue
            self.health = ChannelState("up")
            pause = self.first_backoff_s
            for update in updates:
                await self._take(update)
                offset = update.update_id + 1
            if self.section.poll_interval_s:
                await asyncio.sleep(self.section.poll_interval_s)

    async def _serve_webhook(self) -> None:
        self._secret = self._webhook_secret()
        app = web.Application()
        app.router.add_post("/" + urlsplit(self.section.webhook_url).path.strip("/"), self._hook)
        self._webhook = web.AppRunner(app, access_log=None)
        await self._webhook.setup()
        site = web.TCPSite(self._webhook, self.section.webhook_listen, self.section.webhook_port)
        await site.start()
        await self.bot.set_webhook(
            url=self.section.webhook_url,
            secret_token=self._secret,
            allowed_updates=self.allowed_updates,
        )

    async def _hook(self, request: web.Request) -> web.Response:
        """One update from Telegram; answered 200 once its message is committed
        (Telegram sends it again otherwise)."""
        given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
        if not hmac.compare_digest(given.encode(), self._secret.encode()):
            return web.Response(status=403)
        try:
            update = Update.de_json(await request.json(), self.bot)
        except (ValueError, TypeError, KeyError):
            return web.Response(status=400)
        await self._take(update)
        return web.Response(status=200)

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

    async def _take(self, update: Update) -> None:
        """Start answering one update; returns once the manager has committed
        its message (or found it needs no storing)."""
        message = update.message
        edited = False
        if update.edited_message is not None and self.section.edited_messages == "answer":
            message, edited = update.edited_message, True
        if message is None or self.reader is None:
            return
        incoming = self.reader.read(message, edited=edited)
        if incoming is None:
            return
        if message.text is not None:
            replies = self.handle(incoming)
        elif incoming.addressed:
            replies = _one(Notice(TEXT_ONLY, NoticeKind.EMPTY))
        else:
            return  # group_messages = "all" answers text, not every sticker in the group
        scope = self.config.bot.scope_for(incoming.platform, incoming.chat_id)
        slot = self.outbound.order.take(ConversationKey.for_message(incoming, scope))
        accepted = asyncio.Event()
        target = TelegramTarget(self.bot, Destination.of(message))
        task = asyncio.create_task(
            self._answer(replies, target, slot, accepted),
            name=f"telegram:{message.chat_id}:{message.message_id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        waiter = asyncio.ensure_future(accepted.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    # -- outbound -------------------------------------------------------------------

    async def _answer(
        self,
        replies: AsyncIterator[Reply],
        target: TelegramTarget,
        slot: Slot,
        accepted: asyncio.Event,
    ) -> None:
        async def signalling() -> AsyncIterator[Reply]:
            try:
                async for reply in replies:
                    accepted.set()  # the manager has committed the message by now
                    yield reply
            except Exception:
                log.exception(
                    "telegram: handling a message in chat %s failed", target.where.chat_id
                )
                accepted.set()
                yield Notice(INTERNAL_ERROR, NoticeKind.ERROR)
            finally:
                accepted.set()
                aclose = getattr(replies, "aclose", None)
                if aclose is not None:
                    await aclose()

        try:
            await self.outbound.deliver(signalling(), target, slot)
        except Forbidden as exc:
            log.info("telegram: cannot write to chat %s any more: %s", target.where.chat_id, exc)
        except TelegramError as exc:
            log.error("telegram: answering in chat %s failed: %s", target.where.chat_id, exc)
