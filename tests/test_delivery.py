"""Replies pushed to a stored conversation when nobody is waiting on a request
(an operator's answer, an answer recovered after a crash) reach the user on
their own platform: web (GET /api/events and the history), Telegram (fake
Bot API), Discord (fake gateway and REST) and the console."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from support.engine_doubles import ScriptedEngine
from support.eventually import eventually
from support.fakes.discord_server import FakeDiscord
from support.fakes.telegram_server import FakeBotApi
from support.web_support import parse_sse

from adapters.console import ConsoleChannel
from adapters.discord import DiscordChannel
from adapters.telegram import TelegramChannel
from adapters.web import WebChannel
from bot.app import BotApp
from bot.config import Config
from bot.messages import Image, Notice, NoticeKind, Source, Text

OPERATOR_REPLY = Text("Hi, this is Sam from the shop.", role="operator", author="Sam",
                      source=Source("operator"))  # fmt: skip


async def conversation_of(app: BotApp, platform: str, chat_id: str, owner: str) -> int:
    assert app.store is not None
    conversation_id, _state = await app.store.conversations.ensure_active(platform, chat_id, owner)
    return conversation_id


async def test_a_push_reaches_a_web_visitor_on_the_event_stream_and_in_history(
    make_config: Callable[..., Config],
) -> None:
    async with BotApp(make_config(), engine=ScriptedEngine()) as app:
        channel = WebChannel.create(app.services)
        assert channel is not None
        await channel.start()
        base = f"http://127.0.0.1:{channel.port}"
        try:
            async with aiohttp.ClientSession(base_url=base) as http:
                async with http.post("/api/sessions") as response:
                    session = await response.json()
                auth = {"Authorization": f"Bearer {session['session']}"}
                async with http.post(
                    "/api/messages", json={"text": "is anyone there?"}, headers=auth
                ):
                    pass
                user = session["user_id"]
                conversation = await conversation_of(app, "web", user, user)
                async with http.get("/api/events", headers=auth) as events:
                    assert events.status == 200
                    assert events.headers["Content-Type"].startswith("text/event-stream")
                    await events.content.readuntil(b"\n\n")  # ": connected"
                    assert app.delivery is not None
                    assert await app.delivery.push(conversation, OPERATOR_REPLY)
                    block = (await events.content.readuntil(b"\n\n")).decode()
                [(name, data)] = parse_sse(block)
                assert name == "message"
                assert data["role"] == "operator" and data["author"] == "Sam"
                assert data["text"] == OPERATOR_REPLY.text and data["at"].endswith("Z")
                # Delivery pushes what is already stored; an operator reply is stored
                # by the handoff service before it is pushed, so here only the push shows.
                async with http.get("/api/events", headers={"Authorization": "Bearer nope"}) as bad:
                    assert bad.status == 401
                    assert "error" in json.loads(await bad.text())
        finally:
            await channel.stop()


async def test_a_push_for_a_visitor_with_no_open_stream_is_not_an_error(
    make_config: Callable[..., Config],
) -> None:
    async with BotApp(make_config(), engine=ScriptedEngine()) as app:
        channel = WebChannel.create(app.services)
        assert channel is not None and app.delivery is not None
        await channel.start()
        try:
            conversation = await conversation_of(app, "web", "w-away", "w-away")
            assert await app.delivery.push(conversation, Text("later"))
        finally:
            await channel.stop()


async def test_a_push_reaches_a_telegram_chat_in_its_topic(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "123456789:AAFake-delivery-token-0123456789"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", token)
    api = FakeBotApi(token)
    await api.start()
    config = make_config(
        telegram={"enabled": True, "base_url": api.base_url},
        web={"enabled": False},
    )
    try:
        async with BotApp(config, engine=ScriptedEngine()) as app:
            [channel] = app.build_channels()
            assert isinstance(channel, TelegramChannel) and app.delivery is not None
            await channel.start()
            try:
                api.private_message(4242, "hello")
                await api.wait_until(lambda: bool(api.texts(4242)))
                conversation = await conversation_of(app, "telegram", "4242", "4242")
                long_text = "word " * 1000  # 5,000 characters: two Telegram messages
                assert await app.delivery.push(conversation, Text(long_text, role="operator"))
                assert await app.delivery.push(conversation, Notice("A note", NoticeKind.INFO))
                await api.wait_until(lambda: len(api.texts(4242)) >= 4)
            finally:
                await channel.stop()
    finally:
        await api.close()
    texts = api.texts(4242)
    assert "".join(texts[1:3]) == long_text and all(len(t) <= 4096 for t in texts)  # no author
    assert texts[3] == "A note"


async def test_a_push_reaches_a_discord_channel(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "fake-discord-delivery-token"
    monkeypatch.setenv("DISCORD_BOT_TOKEN", token)
    monkeypatch.setattr(DiscordChannel, "guild_ready_timeout_s", 0.1)
    fake = await FakeDiscord(token=token).start()
    config = make_config(
        discord={"enabled": True, "api_base_url": fake.api_base}, web={"enabled": False}
    )
    try:
        async with BotApp(config, engine=ScriptedEngine()) as app:
            [channel] = app.build_channels()
            assert isinstance(channel, DiscordChannel) and app.delivery is not None
            await channel.start()
            try:
                await fake.user_message("hello in private", dm=True)
                await fake.wait_for(lambda: fake.posts(fake.dm_channel_id))
                owner = str(fake.human["id"])
                conversation = await conversation_of(app, "discord", str(fake.dm_channel_id), owner)
                assert await app.delivery.push(conversation, OPERATOR_REPLY)
                image = Image(b"\x89PNG\r\n\x1a\n" + bytes(32), caption="a fox", seed=7)
                assert await app.delivery.push(conversation, image)
                posts = await fake.wait_for(lambda: fake.posts(fake.dm_channel_id)[2:] or None)
            finally:
                await channel.stop()
    finally:
        await fake.close()
    pushed = fake.posts(fake.dm_channel_id)[1:]
    assert pushed[0].json["content"] == f"Sam: {OPERATOR_REPLY.text}"  # who is writing
    assert pushed[0].json["allowed_mentions"]["parse"] == []
    assert pushed[1].files and "seed: 7" in pushed[1].json["content"]
    assert posts


async def test_a_push_reaches_the_console(make_config: Callable[..., Config]) -> None:
    stdout = io.StringIO()
    async with BotApp(make_config(), engine=ScriptedEngine()) as app:
        console = ConsoleChannel(
            app.services.handle,
            data_dir=app.config.bot.data_dir,
            stdin=io.StringIO("hello\n"),
            stdout=stdout,
            user_id="local",
            services=app.services,
        )
        await console.start()
        await console.wait_closed()
        assert app.delivery is not None
        conversation = await conversation_of(app, "console", "console", "local")
        assert await app.delivery.push(conversation, OPERATOR_REPLY)
        await console.stop()
        assert not await app.delivery.push(conversation, Text("nobody listens now"))
    lines = stdout.getvalue().splitlines()
    assert lines[0] == "bot> echo: hello"
    assert lines[1] == f"Sam> {OPERATOR_REPLY.text}"


async def test_pushes_to_one_conversation_keep_their_order(
    make_config: Callable[..., Config],
) -> None:
    """Ten pushes fired at once arrive in the order they were made."""
    stdout = io.StringIO()
    async with BotApp(make_config(), engine=ScriptedEngine()) as app:
        console = ConsoleChannel(
            app.services.handle,
            data_dir=app.config.bot.data_dir,
            stdin=io.StringIO("hi\n"),
            stdout=stdout,
            services=app.services,
        )
        await console.start()
        await console.wait_closed()
        assert app.delivery is not None
        conversation = await conversation_of(app, "console", "console", "local")
        results = await asyncio.gather(
            *(app.delivery.push(conversation, Text(f"push {i}")) for i in range(10))
        )
        await console.stop()
    assert all(results)
    assert stdout.getvalue().splitlines()[1:] == [f"bot> push {i}" for i in range(10)]


async def test_a_push_to_a_platform_that_is_not_running_says_so(
    make_config: Callable[..., Config], caplog: Any
) -> None:
    async with BotApp(make_config(), engine=ScriptedEngine()) as app:
        assert app.delivery is not None
        conversation = await conversation_of(app, "telegram", "1", "1")
        assert not await app.delivery.push(conversation, Text("hello?"))
        assert not await app.delivery.push(10**9, Text("nobody"))
    await eventually(lambda: "that channel is not running" in caplog.text)
