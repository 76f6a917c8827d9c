"""Nothing stored twice: a web retry with the same `Idempotency-Key` returns
the first answer; a Telegram update or a Discord message delivered twice is
one message, answered once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from support.engine_doubles import ScriptedEngine
from support.fakes.telegram_server import FakeBotApi

from adapters.web import WebChannel
from bot.app import BotApp
from bot.config import Config
from bot.messages import Incoming, Text


async def _stored(app: BotApp, platform: str, user: str) -> list[tuple[str, str]]:
    assert app.store is not None
    conversations = await app.store.people.export(platform, user)
    return [(m.role, m.text) for c in conversations for m in c.messages]


async def test_a_web_retry_with_the_same_key_returns_the_first_answer(
    make_config: Callable[..., Config],
) -> None:
    counter = iter(range(100))
    engine = ScriptedEngine(lambda turns: f"answer {next(counter)}")
    async with BotApp(make_config(), engine=engine) as app:
        channel = WebChannel.create(app.services)
        assert channel is not None
        await channel.start()
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{channel.port}") as http:
                async with http.post("/api/sessions") as response:
                    session = await response.json()
                auth = {"Authorization": f"Bearer {session['session']}"}

                async def post(key: str | None, text: str) -> tuple[int, Any]:
                    headers = dict(auth, **({"Idempotency-Key": key} if key else {}))
                    async with http.post(
                        "/api/messages", json={"text": text}, headers=headers
                    ) as r:
                        return r.status, json.loads(await r.text())

                first = await post("k-1", "hello")
                again = await post("k-1", "hello")
                other = await post("k-2", "hello")
                plain = [await post(None, "hello"), await post(None, "hello")]
                bad = await post("x" * 300, "hello")
        finally:
            await channel.stop()
        stored = await _stored(app, "web", session["user_id"])
    assert first == (200, {"replies": [{"type": "text", "text": "answer 0",
                                        "source": {"kind": "model"}}]})  # fmt: skip
    assert again == first
    assert other[1]["replies"][0]["text"] == "answer 1"
    assert [reply[1]["replies"][0]["text"] for reply in plain] == ["answer 2", "answer 3"]
    assert bad[0] == 400 and "Idempotency-Key" in bad[1]["error"]
    assert stored == [
        ("user", "hello"), ("bot", "answer 0"), ("user", "hello"), ("bot", "answer 1"),
        ("user", "hello"), ("bot", "answer 2"), ("user", "hello"), ("bot", "answer 3"),
    ]  # fmt: skip


async def test_a_retry_while_the_first_is_still_answering_waits_for_that_answer(
    make_config: Callable[..., Config],
) -> None:
    engine = ScriptedEngine(lambda turns: "the only answer")
    engine.release = asyncio.Event()
    async with BotApp(make_config(), engine=engine) as app:
        assert app.manager is not None
        message = Incoming("web", "w1", "w1", "visitor", "slow question", message_id="idem:a",
                           answer_duplicates=True)  # fmt: skip

        assert app.store is not None
        store_message = app.store.conversations.add_user_message
        retry_found_the_first = asyncio.Event()

        async def spy(**values: Any) -> Any:
            intake = await store_message(**values)
            if intake.duplicate:
                retry_found_the_first.set()
            return intake

        app.store.conversations.add_user_message = spy  # type: ignore[method-assign]

        async def ask() -> list[Any]:
            return [reply async for reply in app.manager.handle(message)]  # type: ignore[union-attr]

        first = asyncio.create_task(ask())
        await engine.started.wait()
        second = asyncio.create_task(ask())
        await retry_found_the_first.wait()  # the retry is in before the answer exists
        engine.release.set()
        replies = await asyncio.gather(first, second)
        stored = await _stored(app, "web", "w1")
    finals = [[r.text for r in each if isinstance(r, Text) and r.final] for each in replies]
    assert finals == [["the only answer"], ["the only answer"]]
    assert stored == [("user", "slow question"), ("bot", "the only answer")]
    assert len(engine.prompts) == 1


async def test_a_telegram_update_delivered_twice_is_stored_and_answered_once(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "123456789:AAFake-idempotency-token-012345"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", token)
    api = FakeBotApi(token)
    await api.start()
    config = make_config(
        telegram={"enabled": True, "base_url": api.base_url}, web={"enabled": False}
    )
    try:
        async with BotApp(config, engine=ScriptedEngine()) as app:
            [channel] = app.build_channels()
            await channel.start()
            try:
                message = api.private_message(5151, "only once please")
                await api.wait_until(lambda: bool(api.texts(5151)))
                api.push(message)  # the Bot API sends the same message again
                api.private_message(5151, "and this is new")
                await api.wait_until(lambda: len(api.texts(5151)) >= 2)
                await api.settle(0.3)
            finally:
                await channel.stop()
            stored = await _stored(app, "telegram", "5151")
    finally:
        await api.close()
    assert api.texts(5151) == ["echo: only once please", "echo: and this is new"]
    assert stored == [
        ("user", "only once please"), ("bot", "echo: only once please"),
        ("user", "and this is new"), ("bot", "echo: and this is new"),
    ]  # fmt: skip


async def test_a_discord_message_seen_twice_is_stored_once(
    make_config: Callable[..., Config],
) -> None:
    """A gateway that replays a MESSAGE_CREATE after a resume: same message id."""
    async with BotApp(make_config(), engine=ScriptedEngine()) as app:
        assert app.manager is not None
        message = Incoming("discord", "42", "7", "ann", "hi", message_id="1234567890")
        first = [r async for r in app.manager.handle(message)]
        second = [r async for r in app.manager.handle(message)]
        stored = await _stored(app, "discord", "7")
    assert [r.text for r in first if isinstance(r, Text) and r.final] == ["echo: hi"]
    assert second == []
    assert stored == [("user", "hi"), ("bot", "echo: hi")]
