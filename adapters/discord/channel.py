"""The Discord channel on discord.py: DMs, mentions, replies and slash commands.

`create` reads `[discord]` and the token env var. `start` runs a `Client`
(an `AutoShardedClient` when `shard_count` is "auto" or above 1) with only the
intents it needs — guilds, guild and DM messages, message content — routes
its REST calls and gateway through `api_base_url` / `gateway_url` (see
adapters.discord.routing), syncs the slash commands in `setup_hook`, and
returns once the gateway has said READY or `connect_timeout_s` has passed.
A Discord that cannot be reached is retried with backoff in the background
while the other channels serve; a rejected token or a missing intent turns
the channel off with one loud line.

Which messages are for the bot (DMs, mentions, replies to it, `respond_to`,
the `channels` allow-list) is decided in adapters.discord.addressing; slash
commands are defined in adapters.discord.commands; replies are rendered by
adapters.discord.outbound. Each message and slash command is handled in its own
task, so one slow answer or one failing event never holds up or kills the
others.

This module is `adapters.discord`; `import discord` below is the library
(absolute imports), never this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, ClassVar

import aiohttp
import discord
from discord import app_commands

from adapters.discord.addressing import Addressing
from adapters.discord.commands import build_command_tree
from adapters.discord.outbound import (
    NO_MENTIONS,
    DiscordOutbound,
    DiscordTarget,
    InteractionTarget,
    MessageTarget,
)
from adapters.discord.routing import Endpoints, RebasedWebhookAdapter, route_http
from adapters.outbound import Slot
from bot.channels import ChannelState, Services, platform_token
from bot.config import DiscordSection
from bot.messages import ConversationKey, Incoming
from bot.texts import INTERNAL_ERROR

log = logging.getLogger(__name__)

PLATFORM = "discord"


def intents() -> discord.Intents:
    """Only what the channel needs. `message_content` is privileged: enable it
    in the Developer Portal (Bot > Privileged Gateway Intents)."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    wanted.message_content = True
    return wanted


#: What the bot needs in a channel: see it, read the history a reply refers
#: to, write (also in threads) and attach pictures.
PERMISSIONS = discord.Permissions(
    view_channel=True,
    read_message_history=True,
    send_messages=True,
    send_messages_in_threads=True,
    attach_files=True,
)


def invite_url(application_id: int) -> str:
    return discord.utils.oauth_url(
        application_id, permissions=PERMISSIONS, scopes=("bot", "applications.commands")
    )


class _Events:
    """Client hooks forwarded to the channel; mixed into both client classes."""

    channel: DiscordChannel

    async def setup_hook(self) -> None:
        await self.channel._setup()

    async def on_connect(self) -> None:
        self.channel._connected.set()

    async def on_ready(self) -> None:
        self.channel._on_ready()

    async def on_message(self, message: discord.Message) -> None:
        self.channel._on_message(message)


class _Client(_Events, discord.Client):
    pass


class _ShardedClient(_Events, discord.AutoShardedClient):
    pass


class DiscordChannel:
    name: ClassVar[str] = "discord"
    in_run: ClassVar[bool] = True
    #: How long `start` waits for the first READY (the client keeps trying after).
    connect_timeout_s: ClassVar[float] = 60.0
    #: After READY, how long to wait for every guild (and shard) to arrive
    #: before `start` returns anyway (the client keeps connecting).
    ready_timeout_s: ClassVar[float] = 60.0
    #: discord.py's wait for more GUILD_CREATEs after the last one.
    guild_ready_timeout_s: ClassVar[float] = 2.0
    #: At shutdown, how long replies still being sent get to finish.
    stop_grace_s: ClassVar[float] = 5.0
    #: The first pause before connecting again after a failure (doubling to a minute).
    first_backoff_s: ClassVar[float] = 1.0

    def __init__(self, services: Services, token: str) -> None:
        self.services = services
        self.settings: DiscordSection = services.config.discord
        self._token = token
        self.endpoints = Endpoints(
            api_base=self.settings.api_base_url, gateway_override=self.settings.gateway_url
        )
        self.addressing = Addressing(self.settings)
        self.outbound = DiscordOutbound()
        self.health = ChannelState()
        self.client: discord.Client | None = None
        self.tree: app_commands.CommandTree | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connected = asyncio.Event()
        self._ready = asyncio.Event()
        self._stopping = False

    @classmethod
    def create(cls, services: Services) -> DiscordChannel | None:
        settings = services.config.discord
        token = platform_token("discord", settings.enabled, settings.token_env)
        return None if token is None else cls(services, token)

    # -- lifetime ----------------------------------------------------------------

    def _build_client(self) -> discord.Client:
        # This bot never joins voice: skip discord.py's warnings about voice libraries.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        options: dict[str, Any] = {
            "intents": intents(),
            "allowed_mentions": NO_MENTIONS,
            "guild_ready_timeout": self.guild_ready_timeout_s,
        }
        shards = self.settings.shard_count
        client: discord.Client
        if shards == "auto":
            client = _ShardedClient(**options)
        elif shards > 1:
            client = _ShardedClient(shard_count=shards, **options)
        else:
            client = _Client(**options)
        client.channel = self
        route_http(client.http, self.endpoints)
        return client

    async def start(self) -> None:
        """Connect in the background; wait for READY at most `connect_timeout_s`."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="discord-client")
        if not await self._wait_for(self._connected, self.connect_timeout_s):
            if self.health.state != "off":
                log.warning(
                    "discord: not connected after %.0f s; still trying in the background",
                    self.connect_timeout_s,
                )
            return
        if not await self._wait_for(self._ready, self.ready_timeout_s):
            log.warning("discord: still receiving guilds or shards; going on meanwhile")

    async def _wait_for(self, event: asyncio.Event, limit_s: float) -> bool:
        """True once `event` is set; False after `limit_s` or if the client gave up."""
        assert self._task is not None
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait(
                {self._task, waiter}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        return event.is_set()

    def _explain(self, exc: BaseException | None) -> str:
        api = self.settings.api_base_url
        if isinstance(exc, discord.LoginFailure):
            return (
                f"discord: the bot token in ${self.settings.token_env} was rejected; "
                "copy a fresh one from the Developer Portal (Bot > Reset Token)"
            )
        if isinstance(exc, discord.PrivilegedIntentsRequired):
            return (
                "discord: the Message Content intent is not enabled for this bot; turn on "
                "Developer Portal > Bot > Privileged Gateway Intents > Message Content Intent"
            )
        if isinstance(exc, discord.GatewayNotFound):
            return f"discord: {api}/gateway/bot did not name a gateway ([discord] api_base_url)"
        if isinstance(exc, discord.ConnectionClosed):
            reason = exc.reason or "no reason given"
            return f"discord: the gateway closed the connection (code {exc.code}: {reason})"
        if isinstance(exc, discord.HTTPException):
            return f"discord: {api} answered {exc.status} {exc.text or ''}".rstrip()
        if isinstance(exc, aiohttp.ClientError | OSError):
            return f"discord: cannot reach Discord at {api} ({type(exc).__name__}: {exc})"
        if exc is None:
            return "discord: the client stopped"
        return f"discord: the client stopped ({type(exc).__name__}: {exc})"

    async def _run(self) -> None:
        """Owns the client: login, connect, reconnect; a client that stops for a
        reason discord.py does not retry (Discord unreachable at login, say) is
        built anew after a backoff. Ends when the token or intents are refused."""
        if self.endpoints.rebased:
            # Interaction callbacks and follow-ups use discord.py's webhook
            # adapter; this task's context (inherited by every task the client
            # spawns) gets one that honours api_base_url.
            from discord.webhook.async_ import async_context

            async_context.set(RebasedWebhookAdapter(self.endpoints))
        pause = self.first_backoff_s
        while not self._stopping:
            self.client = self._build_client()
            self.outbound.client = self.client
            self.tree = build_command_tree(self.client, self._run_command, self.services.commands)
            self.tree.error(self._on_command_error)
            problem: BaseException | None = None
            try:
                async with self.client:
                    await self.client.start(self._token, reconnect=True)
            except (discord.LoginFailure, discord.PrivilegedIntentsRequired) as exc:
                log.error("%s; the Discord channel is off", self._explain(exc))
                self.health = ChannelState("off", self._explain(exc).removeprefix("discord: "))
                self.services.delivery.detach(self.outbound)
                return
            except Exception as exc:
                problem = exc
            if self._stopping:
                return
            self.health = ChannelState("down", self._explain(problem).removeprefix("discord: "))
            self._connected.clear()
            self.services.delivery.detach(self.outbound)
            log.warning("%s; connecting again in %.0f s", self._explain(problem), pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 60.0)

    def _on_ready(self) -> None:
        self.health = ChannelState("up")
        self.services.delivery.attach(self.outbound)
        first = not self._ready.is_set()
        self._ready.set()
        assert self.client is not None
        if first:
            user = self.client.user
            log.info("discord: connected as %s (id %s)", user, user.id if user else "?")
            if self.client.application_id is not None:
                log.info("discord: invite link: %s", invite_url(self.client.application_id))

    async def _setup(self) -> None:
        """After login, before the gateway: find the gateway, sync slash commands."""
        assert self.client is not None and self.tree is not None
        if not self.settings.gateway_url and self.settings.shard_count != "auto":
            # An AutoShardedClient asks itself; a plain Client would go
            # straight to Discord's default, which a proxy or test server is not.
            try:
                _, url, _ = await self.client.http.get_bot_gateway()
                self.endpoints.gateway_announced = url
            except discord.DiscordException as exc:
                log.warning(
                    "discord: GET /gateway/bot failed (%s); using discord.py's default gateway", exc
                )
        await self._sync_commands()

    async def _sync_commands(self) -> None:
        assert self.tree is not None
        guild_id = self.settings.command_guild_id
        try:
            if guild_id:
                guild = discord.Object(int(guild_id))
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("discord: %d slash commands synced to guild %s", len(synced), guild_id)
            else:
                synced = await self.tree.sync()
                log.info("discord: %d slash commands synced globally", len(synced))
        except discord.HTTPException as exc:
            log.error(
                "discord: syncing slash commands failed (%s); was the bot invited with the "
                "applications.commands scope? Messages are still answered.",
                exc,
            )

    async def stop(self) -> None:
        self._stopping = True
        pending = {task for task in self._tasks if task is not asyncio.current_task()}
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.stop_grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        self.services.delivery.detach(self.outbound)
        await self._close_client()
        self.health = ChannelState("off", "stopped")

    async def _close_client(self) -> None:
        if self.client is not None and not self.client.is_closed():
            await self.client.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
            self._task = None

    # -- events ------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _slot(self, incoming: Incoming) -> Slot:
        """The message's place in its conversation's delivery order (taken on arrival)."""
        scope = self.services.config.bot.scope_for(incoming.platform, incoming.chat_id)
        return self.outbound.order.take(ConversationKey.for_message(incoming, scope))

    def _on_message(self, message: discord.Message) -> None:
        assert self.client is not None
        if self.client.user is None:
            return
        text = self.addressing.text_for_bot(message, self.client.user.id)
        if text is None:
            return
        incoming = Incoming(
            platform=PLATFORM,
            chat_id=str(message.channel.id),
            user_id=str(message.author.id),
            user_name=message.author.display_name,
            text=text,
            message_id=str(message.id),
            is_private=message.guild is None,
            addressed=True,
        )
        slot = self._slot(incoming)
        self._spawn(
            self._answer(incoming, MessageTarget(message), slot),
            name=f"discord-message-{message.id}",
        )

    async def _answer(self, incoming: Incoming, target: DiscordTarget, slot: Slot) -> None:
        try:
            await self.outbound.deliver(self.services.handle(incoming), target, slot)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "discord: answering message %s in %s failed", incoming.message_id, incoming.chat_id
            )

    async def _run_command(
        self, interaction: discord.Interaction, text: str, ephemeral: bool
    ) -> None:
        """A slash command: defer at once (Discord allows 3 s), follow up when ready."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        channel = interaction.channel or discord.Object(interaction.channel_id or 0)
        if interaction.guild_id is not None and not self.addressing.allowed(channel):
            await interaction.response.send_message(
                "I don't answer in this channel.", ephemeral=True
            )
            return
        incoming = Incoming(
            platform=PLATFORM,
            chat_id=str(interaction.channel_id),
            user_id=str(interaction.user.id),
            user_name=interaction.user.display_name,
            text=text,
            message_id=str(interaction.id),
            is_private=interaction.guild_id is None,
            addressed=True,
        )
        slot = self._slot(incoming)
        await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        await self._answer(incoming, InteractionTarget(interaction, ephemeral=ephemeral), slot)

    async def _on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        log.error(
            "discord: slash command /%s failed",
            getattr(interaction.command, "name", "?"),
            exc_info=error,
        )
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await interaction.followup.send(INTERNAL_ERROR, ephemeral=True)
            else:
                await interaction.response.send_message(INTERNAL_ERROR, ephemeral=True)
