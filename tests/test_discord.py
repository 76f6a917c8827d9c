"""The Discord channel end to end: `bot.app.serve` (what `aigc-bot run` runs)
with the tiny model, against a fake Discord REST API + gateway on 127.0.0.1
reached through `[discord] api_base_url` / `gateway_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import discord
import pytest
from support.eventually import eventually
from support.fakes.discord_server import FakeDiscord, Recorded
from support.net import free_port

import adapters.discord.channel as discord_adapter
from adapters.discord import DiscordChannel
from adapters.discord.commands import draw_text
from adapters.discord.routing import DEFAULT_API_BASE, Endpoints
from adapters.outbound import Renderer, Target
from bot.app import serve
from bot.config import Config
from bot.engines import TextChunk
from bot.messages import Image, Incoming, Notice, NoticeKind, Reply, Text, Typing

TOKEN = "fake-discord-token-123"


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = await FakeDiscord(token=TOKEN).start()
    yield server
    await server.close()
    assert not server.unknown, "the bot called endpoints the fake does not know"


@pytest.fixture(autouse=True)
def quick_discord(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token in the env; discord.py's wait for more guilds cut short."""
    monkeypatch.setenv("DISCORD_BOT_TOKEN", TOKEN)
    monkeypatch.setattr(DiscordChannel, "guild_ready_timeout_s", 0.1)
    monkeypatch.setattr(DiscordChannel, "connect_timeout_s", 10.0)


def discord_config(
    make_config: Callable[..., Config], fake: FakeDiscord, **discord_keys: Any
) -> Config:
    keys = {"enabled": True, "api_base_url": fake.api_base, **discord_keys}
    return make_config(discord=keys, web={"enabled": False}, text={"greedy": True})


@contextlib.asynccontextmanager
async def serving(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[DiscordChannel]]:
    """`serve(config, stop)` in a task, until the Discord channel has started."""
    started: list[DiscordChannel] = []
    original_start = DiscordChannel.start

    async def start(self: DiscordChannel) -> None:
        await original_start(self)
        started.append(self)

    monkeypatch.setattr(DiscordChannel, "start", start)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))

    def channel_started() -> bool:
        if task.done():
            task.result()
            raise AssertionError("serve ended before the Discord channel started")
        return bool(started)

    await eventually(channel_started, within=60)
    try:
        yield started
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def mentions_forbidden(request: Recorded) -> bool:
    """The payload's allowed_mentions lets nothing generated ping anyone."""
    allowed = request.json.get("allowed_mentions")
    return (
        allowed is not None
        and allowed.get("parse") == []
        and not allowed.get("users")
        and not allowed.get("roles")
    )


class LongEngine:
    """A text-engine double whose every answer is `text`."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.ready = True
        self.queue_depth = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def text_for(self, turns: Sequence[str]) -> str:
        return self.text

    async def stream(
        self, turns: Sequence[str], *, conversation: str = ""
    ) -> AsyncIterator[TextChunk]:
        text = self.text_for(turns)
        yield TextChunk(text[:50], final=False)
        yield TextChunk(text, final=True)

    async def generate(self, turns: Sequence[str], *, conversation: str = "") -> str:
        return self.text


# -- end to end ----------------------------------------------------------------


async def test_mention_in_a_guild_channel_is_answered_there_as_a_reply(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = discord_config(make_config, fake)
    async with serving(config, monkeypatch):
        identify = fake.identified[0]
        assert identify["token"] == TOKEN
        wanted = discord.Intents.none()
        wanted.guilds = wanted.guild_messages = wanted.dm_messages = True
        wanted.message_content = True
        assert identify["intents"] == wanted.value
        asked = await fake.user_message(f"<@{fake.bot['id']}> hello there", mention_bot=True)
        posts = await fake.wait_for(lambda: fake.posts(fake.channel_id))
        reply = posts[0].json
        assert reply["content"].strip()
        assert str(reply["message_reference"]["message_id"]) == asked["id"]
        assert mentions_forbidden(posts[0])
        assert fake.calls("POST", rf"/channels/{fake.channel_id}/typing")
        # The bot's own message comes back over the gateway, and is not answered.
        await asyncio.sleep(0.3)
        assert len(fake.posts()) == 1
    assert not fake.unknown
    # The mention itself is not part of what the user said.
    from storage import Store

    store = await Store.open(config.storage.url)
    try:
        [conversation] = await store.people.export("discord", fake.human["id"])
    finally:
        await store.close()
    assert conversation.chat_id == str(fake.channel_id)
    assert [m.text for m in conversation.messages if m.role == "user"] == ["hello there"]


async def test_a_dm_is_answered_and_the_token_is_never_logged(
    fake: FakeDiscord,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(discord_config(make_config, fake), monkeypatch):
        asked = await fake.user_message("hi, how are you?", dm=True)
        posts = await fake.wait_for(lambda: fake.posts(fake.dm_channel_id))
        assert posts[0].json["content"].strip()
        assert str(posts[0].json["message_reference"]["message_id"]) == asked["id"]
        assert mentions_forbidden(posts[0])
    assert "discord.gateway" in caplog.text  # discord.py's debug logs were captured...
    assert TOKEN not in caplog.text  # ...and not one holds the token


async def test_messages_not_addressed_to_the_bot_are_ignored(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(discord_config(make_config, fake), monkeypatch):
        await fake.user_message("just chatting with friends")
        await fake.user_message("@everyone meeting at 5", mention_everyone=True)
        await fake.user_message(f"<@{fake.bot['id']}> hi", mention_bot=True, author=fake.other_bot)
        # Events are handled in order: once this one is answered, the three
        # above have been seen and dropped.
        await fake.user_message(f"<@{fake.bot['id']}> and now?", mention_bot=True)
        await fake.wait_for(lambda: fake.posts())
        await asyncio.sleep(0.3)
        [post] = fake.posts()
        assert post.json["message_reference"]["message_id"]
    from storage import Store

    store = await Store.open(make_config().storage.url)
    try:
        exported = await store.people.export("discord", fake.human["id"])
        assert [m.text for c in exported for m in c.messages if m.role == "user"] == ["and now?"]
        assert await store.people.export("discord", fake.other_bot["id"]) == []
    finally:
        await store.close()


async def test_a_keyword_addresses_the_bot_in_a_guild_channel(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(discord_config(make_config, fake, keywords=["bot,"]), monkeypatch):
        await fake.user_message("robots are cool")
        await fake.user_message("BOT, are you there?")
        posts = await fake.wait_for(lambda: fake.posts(fake.channel_id))
        await asyncio.sleep(0.3)  # what would be a second answer has had its chance
        assert len(fake.posts(fake.channel_id)) == 1
    from storage import Store

    store = await Store.open(discord_config(make_config, fake).storage.url)
    try:
        [conversation] = await store.people.export("discord", fake.human["id"])
    finally:
        await store.close()
    assert [m.text for m in conversation.messages if m.role == "user"] == ["are you there?"]
    assert posts[0].json["content"].strip()


async def test_a_reply_to_the_bots_message_is_answered_without_a_mention(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(discord_config(make_config, fake), monkeypatch):
        await fake.user_message(f"<@{fake.bot['id']}> tell me something", mention_bot=True)
        await fake.wait_for(lambda: fake.posts())
        bot_message = next(iter(fake._messages.values()))
        reply = await fake.user_message("and then?", reply_to=bot_message)
        posts = await fake.wait_for(lambda: fake.posts()[1:])
        assert str(posts[0].json["message_reference"]["message_id"]) == reply["id"]


async def test_channel_allow_list_threads_and_respond_to_all(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = discord_config(
        make_config,
        fake,
        channels=[str(fake.channel_id), str(fake.other_channel_id)],
        channel_respond_to={str(fake.other_channel_id): "all"},
    )
    mention = f"<@{fake.bot['id']}> hello"
    async with serving(config, monkeypatch):
        await fake.user_message(mention, channel_id=fake.third_channel_id, mention_bot=True)
        await fake.user_message(
            "no mention, but this channel answers all", channel_id=fake.other_channel_id
        )
        await fake.wait_for(lambda: fake.posts(fake.other_channel_id))
        # A thread counts as its parent channel.
        await fake.user_message(mention, channel_id=fake.thread_id, mention_bot=True)
        await fake.wait_for(lambda: fake.posts(fake.thread_id))
        # Mentions (of the bot or of its role) still work in a listed channel
        # that answers only mentions.
        await fake.user_message("not for the bot", channel_id=fake.channel_id)
        await fake.user_message(mention, channel_id=fake.channel_id, mention_bot=True)
        role_mention = f"<@&{fake.bot_role_id}> and you?"
        await fake.user_message(role_mention, channel_id=fake.channel_id, mention_bot_role=True)
        await fake.wait_for(lambda: fake.posts(fake.channel_id)[1:])
        # A slash command in an unlisted channel gets a private refusal.
        interaction = await fake.slash_command(
            "chat", {"message": "hi"}, channel_id=fake.third_channel_id
        )
        callback_path = rf"/interactions/{interaction['id']}/[^/]+/callback"
        [refusal] = await fake.wait_for(lambda: fake.calls("POST", callback_path))
        assert refusal.json["type"] == 4 and refusal.json["data"]["flags"] & 64
        await asyncio.sleep(0.3)
        assert not fake.posts(fake.third_channel_id)
        assert len(fake.posts()) == 4


async def test_slash_commands_are_synced_deferred_and_followed_up(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(discord_config(make_config, fake), monkeypatch):
        [sync] = fake.calls("PUT", rf"/applications/{fake.app_id}/commands")
        names = {command["name"] for command in sync.json}
        assert {"chat", "draw", "reset", "forget", "stats", "help"} <= names
        interaction = await fake.slash_command("chat", {"message": "hello bot"})
        callback_path = rf"/interactions/{interaction['id']}/[^/]+/callback"
        follow_path = rf"/webhooks/{fake.app_id}/{interaction['token']}"
        followups = await fake.wait_for(lambda: fake.calls("POST", follow_path))
        [callback] = fake.calls("POST", callback_path)
        assert callback.json["type"] == 5  # deferred: "thinking…"
        assert fake.requests.index(callback) < fake.requests.index(followups[0])
        assert followups[0].json["content"].strip()
        assert mentions_forbidden(followups[0])
        # Personal commands answer only to the person who asked.
        interaction = await fake.slash_command("stats")
        follow_path = rf"/webhooks/{fake.app_id}/{interaction['token']}"
        [followup] = await fake.wait_for(lambda: fake.calls("POST", follow_path))
        assert followup.json["flags"] & 64
        assert "Your usage" in followup.json["content"]
    assert not fake.unknown


async def test_slash_commands_sync_to_the_configured_guild(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = discord_config(make_config, fake, command_guild_id=str(fake.guild_id))
    async with serving(config, monkeypatch):
        assert not fake.calls("PUT", rf"/applications/{fake.app_id}/commands")
        [sync] = fake.calls("PUT", rf"/applications/{fake.app_id}/guilds/{fake.guild_id}/commands")
        assert "draw" in {command["name"] for command in sync.json}


async def test_a_long_reply_is_split_whole_and_pings_nobody(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    paragraph = "@everyone look at this <@&42> and <@7>! " + "word " * 60 + "\n"
    code = "```python\n" + "".join(f"print({i})  # a line of code\n" for i in range(40)) + "```\n"
    long_text = paragraph * 20 + code + paragraph * 10
    assert len(long_text) > 3 * 2000
    engine = LongEngine(long_text)
    monkeypatch.setattr("bot.engine_settings.build_text_engine", lambda *args, **kwargs: engine)
    # Discord rate-limits the first send: discord.py waits and retries it.
    fake = await FakeDiscord(token=TOKEN, rate_limit_posts=1).start()
    try:
        async with serving(discord_config(make_config, fake), monkeypatch):
            await fake.user_message(f"<@{fake.bot['id']}> say a lot", mention_bot=True)

            def whole() -> list[Recorded]:
                posts = fake.posts(fake.channel_id)
                done = sum(len(p.json["content"]) for p in posts) >= len(long_text)
                return posts if done else []

            posts = await fake.wait_for(whole)
            await asyncio.sleep(0.3)
            assert len(fake.posts(fake.channel_id)) == len(posts)
    finally:
        await fake.close()
    assert any("(429)" in r.path for r in fake.requests)
    contents = [p.json["content"] for p in posts]
    assert len(contents) >= 4
    assert all(len(c) <= 2000 for c in contents)
    assert "".join(contents) == long_text
    assert all(c.count("```") % 2 == 0 for c in contents)  # the code block is never cut
    assert all(mentions_forbidden(p) for p in posts)
    assert posts[0].json.get("message_reference")
    assert posts[0].json["allowed_mentions"].get("replied_user") is True
    assert not any(p.json["allowed_mentions"].get("replied_user") for p in posts[1:])


class StubDrawer:
    """Stands in for bot.draw.service: a queue notice, its update, then a picture."""

    def __init__(self) -> None:
        self.args: list[str] = []

    async def handle(self, incoming: Incoming, args: str) -> AsyncIterator[Reply]:
        self.args.append(args)
        yield Notice("You are number 2 in the queue.", NoticeKind.QUEUED, ref="draw-1")
        yield Notice("Drawing… 50%", NoticeKind.PROGRESS, ref="draw-1")
        yield Image(b"\x89PNG\r\n\x1a\n" + bytes(64), caption="“a red fox”\nseed 1234", seed=1234)

    def cancel(self, platform: str, user_id: str) -> int:
        return 0

    async def close(self) -> None:
        pass


async def test_draw_sends_the_picture_as_an_attachment_with_its_seed(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    drawer = StubDrawer()

    async def start_drawer(self: Any) -> StubDrawer:
        return drawer

    monkeypatch.setattr("bot.app.BotApp._start_drawer", start_drawer)
    async with serving(discord_config(make_config, fake), monkeypatch):
        options = {"prompt": "a red fox", "seed": 1234, "negative": "blurry, dark"}
        interaction = await fake.slash_command("draw", options)
        follow_path = rf"/webhooks/{fake.app_id}/{interaction['token']}"

        def picture() -> list[Recorded]:
            return [r for r in fake.calls("POST", follow_path) if r.files]

        [posted] = await fake.wait_for(picture)
    assert drawer.args == ['"a red fox" --seed 1234 --negative "blurry, dark"']
    [(filename, data)] = posted.files
    assert filename == "draw-1234.png" and data.startswith(b"\x89PNG")
    assert "1234" in posted.json["content"]
    assert mentions_forbidden(posted)
    # The queue notice was sent once, then edited in place.
    notices = [r for r in fake.calls("POST", follow_path) if not r.files]
    assert [r.json["content"] for r in notices] == ["You are number 2 in the queue."]
    [edit] = fake.calls("PATCH", follow_path + r"/messages/\d+")
    assert edit.json["content"] == "Drawing… 50%"


async def test_one_failing_message_does_not_stop_the_others(
    fake: FakeDiscord,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.forbidden_channels.add(fake.third_channel_id)
    mention = f"<@{fake.bot['id']}> hello"
    async with serving(discord_config(make_config, fake), monkeypatch):
        await fake.user_message(mention, channel_id=fake.third_channel_id, mention_bot=True)
        await fake.wait_for(lambda: "answering message" in caplog.text)
        await fake.user_message(mention, channel_id=fake.channel_id, mention_bot=True)
        await fake.wait_for(lambda: fake.posts(fake.channel_id))
    assert "Missing Permissions" in caplog.text


@pytest.mark.parametrize(
    ("fake_options", "expected"),
    [
        ({"token": "another-token"}, "DISCORD_BOT_TOKEN was rejected"),
        ({"token": TOKEN, "gateway_close_code": 4014}, "Message Content Intent"),
    ],
)
async def test_a_refused_token_or_intent_turns_discord_off_not_the_bot(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fake_options: dict[str, Any],
    expected: str,
) -> None:
    """One loud line; the channel reports "off" and the process keeps serving."""
    fake = await FakeDiscord(**fake_options).start()
    try:
        async with serving(discord_config(make_config, fake), monkeypatch) as [channel]:
            assert channel.health.state == "off"
            assert expected in channel.health.detail
    finally:
        await fake.close()
    [line] = [r for r in caplog.records if r.levelno >= logging.ERROR and "discord" in r.message]
    assert expected in line.getMessage() and "channel is off" in line.getMessage()
    assert "\n" not in line.getMessage()


async def test_discord_unreachable_at_start_is_retried_while_the_web_serves(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, unused_port: int
) -> None:
    """Discord down: `serve` does not fail; the web channel answers, /healthz
    names the Discord channel, and once Discord is back the bot connects."""
    import aiohttp

    monkeypatch.setattr(DiscordChannel, "connect_timeout_s", 0.5)
    monkeypatch.setattr(DiscordChannel, "first_backoff_s", 0.2)
    fake = FakeDiscord(token=TOKEN)
    fake.port = unused_port  # nothing listens there yet
    web_port = free_port()
    config = make_config(
        discord={"enabled": True, "api_base_url": fake.api_base},
        web={"enabled": True, "port": web_port},
        text={"greedy": True},
    )
    async with serving(config, monkeypatch) as [channel]:
        assert channel.health.state == "down"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{web_port}/healthz") as response:
                body = await response.json()
            assert response.status == 503
            assert any("discord" in problem for problem in body["problems"])
            async with session.post(f"http://127.0.0.1:{web_port}/api/sessions") as response:
                assert response.status == 201
        await fake.start(port=unused_port)
        try:
            await fake.wait_for(lambda: channel.health.state == "up" or None, within_s=30)
        finally:
            await fake.close()


async def test_replies_of_one_conversation_never_interleave_under_rate_limits(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first answer is two messages and Discord rate-limits its second
    part; the answer to the next message, ready long before, waits for the
    whole first answer instead of landing while discord.py waits out the 429."""
    first = "first " * 500  # 3,000 characters: two Discord messages
    engine = LongEngine(first)
    answers = iter([first, "second answer"])
    engine.text_for = lambda turns: next(answers)  # type: ignore[attr-defined]
    monkeypatch.setattr("bot.engine_settings.build_text_engine", lambda *args, **kwargs: engine)
    fake.rate_limit_post_numbers = {2}
    async with serving(discord_config(make_config, fake), monkeypatch):
        await fake.user_message(f"<@{fake.bot['id']}> one", mention_bot=True)
        await fake.user_message(f"<@{fake.bot['id']}> two", mention_bot=True)
        posts = await fake.wait_for(lambda: len(fake.posts(fake.channel_id)) >= 3 or None)
        posts = fake.posts(fake.channel_id)
    contents = [p.json["content"] for p in posts]
    assert any("(429)" in r.path for r in fake.requests)
    assert "".join(contents[:2]) == first
    assert contents[2] == "second answer"


@pytest.mark.parametrize(
    ("settings", "env", "why"),
    [
        ({"enabled": False}, TOKEN, "enabled = false"),
        ({"enabled": True}, "", "the env var DISCORD_BOT_TOKEN ([discord] token_env) is not set"),
    ],
)
async def test_discord_is_off_without_a_token_or_when_disabled(
    running_app: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    settings: dict[str, Any],
    env: str,
    why: str,
) -> None:
    monkeypatch.setenv("DISCORD_BOT_TOKEN", env)
    config = running_app.config.model_copy(
        update={"discord": running_app.config.discord.model_copy(update=settings)}
    )
    services = dataclasses.replace(running_app.services, config=config)
    with caplog.at_level(logging.INFO):
        assert DiscordChannel.create(services) is None
    assert why in caplog.text


async def test_fixed_shards_connect_through_gateway_url(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # /gateway/bot points nowhere: only gateway_url can get the shards connected.
    fake = await FakeDiscord(token=TOKEN, shards=2, announce_gateway=False).start()
    config = discord_config(make_config, fake, shard_count=2, gateway_url=fake.gateway_url)
    try:
        async with serving(config, monkeypatch) as [channel]:
            assert isinstance(channel.client, discord.AutoShardedClient)
            assert sorted(i["shard"] for i in fake.identified) == [[0, 2], [1, 2]]
            shard = fake.shard_of(fake.guild_id)
            await fake.user_message(f"<@{fake.bot['id']}> hi", mention_bot=True)
            await fake.wait_for(lambda: fake.posts(fake.channel_id))
            await fake.user_message("hi in private", dm=True)
            await fake.wait_for(lambda: fake.posts(fake.dm_channel_id))
            assert shard in (0, 1)
    finally:
        await fake.close()


async def test_one_shard_finds_the_gateway_through_the_rest_api(
    fake: FakeDiscord, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(discord_config(make_config, fake, shard_count=1), monkeypatch) as [channel]:
        assert not isinstance(channel.client, discord.AutoShardedClient)
        assert fake.calls("GET", "/gateway/bot")
        assert "shard" not in fake.identified[0]
        await fake.user_message("hello", dm=True)
        await fake.wait_for(lambda: fake.posts(fake.dm_channel_id))


# -- units ---------------------------------------------------------------------


def test_the_module_name_does_not_shadow_the_library() -> None:
    assert discord_adapter.discord is discord
    assert "site-packages" in (discord.__file__ or "")
    assert hasattr(discord_adapter.discord, "AutoShardedClient")


def test_endpoints_rebase_rest_and_gateway_urls() -> None:
    endpoints = Endpoints(api_base="http://proxy:8080/api/v10/")
    assert endpoints.rest(DEFAULT_API_BASE + "/users/@me") == "http://proxy:8080/api/v10/users/@me"
    assert endpoints.rest("https://cdn.discordapp.com/x.png") == "https://cdn.discordapp.com/x.png"
    default = "wss://gateway.discord.gg/?v=10&encoding=json&compress=zlib-stream"
    assert endpoints.gateway(default) == default  # nothing announced, nothing set
    endpoints.gateway_announced = "wss://gw.example/"
    assert endpoints.gateway(default) == "wss://gw.example/?v=10&encoding=json&compress=zlib-stream"
    resume = "wss://gateway-us-east1-b.discord.gg/?v=10"
    assert endpoints.gateway(resume) == resume
    endpoints.gateway_override = "ws://127.0.0.1:9000/gw"
    assert endpoints.gateway(resume) == "ws://127.0.0.1:9000/gw?v=10"
    assert not Endpoints().rebased


def test_routing_is_per_client_not_global(fake: FakeDiscord) -> None:
    from discord.webhook.async_ import AsyncWebhookAdapter, async_context

    from adapters.discord.routing import route_http

    assert discord.http.Route.BASE == DEFAULT_API_BASE
    assert type(async_context.get()) is AsyncWebhookAdapter
    routed, plain = (
        discord.Client(intents=discord.Intents.none()),
        discord.Client(intents=discord.Intents.none()),
    )
    route_http(routed.http, Endpoints(api_base=fake.api_base))
    assert "request" in vars(routed.http) and "request" not in vars(plain.http)


def test_draw_options_become_one_command_line() -> None:
    assert draw_text("a cat's hat") == '/draw "a cat\'s hat"'
    assert draw_text('the "best" fox', size="512 x 768", guidance=7.5, steps=20) == (
        '/draw “the "best" fox” --steps 20 --size 512x768 --guidance 7.5'
    )


class RecordingTarget(Target):
    text_limit = 2000
    typing_every_s = 60.0

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    async def show_typing(self) -> None:
        self.events.append(("typing", True))

    async def send_text(self, text: str) -> int:
        self.events.append(("send", text))
        return len(self.events)

    async def edit_text(self, sent: Any, text: str) -> bool:
        self.events.append(("edit", (sent, text)))
        return True

    async def finish(self, sent_anything: bool) -> None:
        self.events.append(("finish", sent_anything))


async def test_render_types_until_the_answer_and_never_sends_partials() -> None:
    typing_started = asyncio.Event()

    async def replies() -> AsyncIterator[Reply]:
        yield Typing()
        await typing_started.wait()
        yield Text("part", final=False)
        yield Notice("queued", NoticeKind.QUEUED, ref="r")
        yield Notice("running", NoticeKind.PROGRESS, ref="r")
        yield Text("x" * 2500)

    target = RecordingTarget()
    original = target.show_typing

    async def show_typing() -> None:
        await original()
        typing_started.set()

    target.show_typing = show_typing  # type: ignore[method-assign]
    assert await Renderer(target).run(replies()) == 3
    assert target.events == [
        ("typing", True),
        ("send", "queued"),
        ("edit", (2, "running")),
        ("send", "x" * 2000),
        ("send", "x" * 500),
        ("finish", True),
    ]


def test_invite_link_asks_for_the_bot_and_command_scopes_and_few_permissions() -> None:
    url = discord_adapter.invite_url(123)
    assert "client_id=123" in url and "scope=bot+applications.commands" in url
    granted = discord_adapter.PERMISSIONS
    assert granted.send_messages and granted.attach_files and granted.read_message_history
    assert not (granted.administrator or granted.mention_everyone or granted.manage_messages)
