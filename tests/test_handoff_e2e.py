"""Handoff end to end: a web visitor and a Telegram user each ask for a person,
are listed, claimed, answered by an operator (a long answer split like any
reply), released, and answered by the bot again, while a visitor who never
asked stays with the bot; a second operator gets 409, bad tokens 401.

The bot is the real one (BotApp: store, tiny model, manager, the handoff
service it builds when operator tokens are set; the web channel on a free
port; Telegram against the fake Bot API).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from support.fakes.telegram_server import FakeBotApi

from bot.app import BotApp
from bot.channels import Channel
from bot.config import Config
from bot.handoff import HandoffService

TG_TOKEN = "123456789:AAFake-token_for-handoff-tests-0123456"
ANNA = "anna-token-0123456789abcdef0123"
BEN = "ben-token-0123456789abcdef01234"
OPERATOR_TOKENS = f"anna:{ANNA},ben:{BEN}"


# -- harness (also used by test_operator_console.py) --------------------------------------


@dataclass
class RunningBot:
    app: BotApp
    service: HandoffService
    channels: list[Channel]
    url: str = ""


@asynccontextmanager
async def handoff_bot(config: Config, engine: Any = None) -> AsyncIterator[RunningBot]:
    """BotApp (which builds the handoff service when operator tokens are set)
    with the channels `aigc-bot run` starts: web, and Telegram when enabled."""
    async with BotApp(config, engine=engine) as app:
        assert isinstance(app.handoff, HandoffService), "handoff is off: are the tokens set?"
        assert app.services.operator_desk is app.handoff.desk
        channels: list[Channel] = []
        try:
            for channel in app.build_channels():
                await channel.start()
                channels.append(channel)
            running = RunningBot(app, app.handoff, channels)
            web = next((c for c in channels if c.name == "web"), None)
            if web is not None:
                running.url = f"http://127.0.0.1:{getattr(web, 'port', 0)}"
            yield running
        finally:
            for channel in reversed(channels):
                await channel.stop()


@dataclass
class EventReader:
    """An open Server-Sent Events response, read in the background."""

    response: aiohttp.ClientResponse
    events: list[tuple[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        name, data = "message", []
        async for raw in self.response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith(":"):
                event: tuple[str, Any] | None = (":", line[1:].strip())
            elif line == "":
                event = (name, json.loads("\n".join(data))) if data else None
                name, data = "message", []
            else:
                key, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if key == "event":
                    name = value
                elif key == "data":
                    data.append(value)
                event = None
            if event is not None:
                async with self.changed:
                    self.events.append(event)
                    self.changed.notify_all()

    async def wait_for(
        self, condition: Callable[[str, Any], bool], within: float = 20.0
    ) -> tuple[str, Any]:
        """The first event (seen so far or to come) for which `condition(name, data)` holds."""

        def found() -> tuple[str, Any] | None:
            return next((e for e in self.events if condition(*e)), None)

        async with asyncio.timeout(within):
            async with self.changed:
                await self.changed.wait_for(lambda: found() is not None)
        event = found()
        assert event is not None
        return event

    def named(self, name: str) -> list[Any]:
        return [data for event, data in self.events if event == name]


@asynccontextmanager
async def event_stream(
    session: aiohttp.ClientSession, url: str, token: str, first: Callable[[str, Any], bool]
) -> AsyncIterator[EventReader]:
    """GET an SSE endpoint; returns once `first` was seen (the stream is live)."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    response = await session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None))
    assert response.status == 200, await response.text()
    reader = EventReader(response)
    reader.task = asyncio.create_task(reader._read())
    try:
        await reader.wait_for(first)
        yield reader
    finally:
        reader.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await reader.task
        response.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_visitor(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(url + "/api/sessions") as response:
        assert response.status == 201
        return str((await response.json())["session"])


async def say(session: aiohttp.ClientSession, url: str, token: str, text: str) -> list[Any]:
    async with session.post(url + "/api/messages", json={"text": text}, headers=bearer(token)) as r:
        assert r.status == 200, await r.text()
        return list((await r.json())["replies"])


async def call(
    session: aiohttp.ClientSession, method: str, url: str, token: str | None, **kwargs: Any
) -> tuple[int, Any]:
    headers = bearer(token) if token is not None else {}
    async with session.request(method, url, headers=headers, **kwargs) as response:
        return response.status, await response.json()


def bot_answered(replies: list[Any]) -> bool:
    return len(replies) == 1 and replies[0]["type"] == "text" and replies[0].get("role") is None


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeBotApi]:
    fake = FakeBotApi(TG_TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def handoff_config(
    make_config: Callable[..., Config], api: FakeBotApi, monkeypatch: pytest.MonkeyPatch
) -> Config:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TG_TOKEN)
    monkeypatch.setenv("AIGC_BOT_OPERATOR_TOKENS", OPERATOR_TOKENS)
    return make_config(
        telegram={"enabled": True, "base_url": api.base_url},
        text={"greedy": True},
        limits={"messages_per_minute": 0},
    )


async def test_web_and_telegram_users_are_handed_over_answered_and_given_back(
    api: FakeBotApi, handoff_config: Config
) -> None:
    tg_user = 5501
    long_answer = "\n".join(f"Step {n}: " + " ".join(["details"] * 30) for n in range(1, 26))
    assert 4096 < len(long_answer) < 8000  # Telegram's limit is 4,096 characters
    async with handoff_bot(handoff_config) as bot, aiohttp.ClientSession() as http:
        base, ops = bot.url, bot.url + "/api/operator"
        await api.wait_until(lambda: api.called("getUpdates"))
        visitor, bystander = await new_visitor(http, base), await new_visitor(http, base)

        async with (
            event_stream(http, ops + "/events", ANNA, lambda n, d: n == "ready") as console,
            event_stream(http, base + "/api/events", visitor, lambda n, d: n == ":") as pushed,
        ):
            assert bot_answered(await say(http, base, bystander, "hello, what do you sell?"))
            assert bot_answered(await say(http, base, visitor, "hello"))

            # both ask for a person; each is told once what happens next
            [told] = await say(http, base, visitor, "I want to talk to a HUMAN please")
            assert told == {
                "type": "notice",
                "text": "A person will answer here soon; I've passed on our conversation.",
                "kind": "info",
            }
            api.private_message(tg_user, "my card was charged twice")
            await api.wait_until(lambda: len(api.texts(tg_user)) == 1)
            api.private_message(tg_user, "/human")
            await api.wait_until(lambda: len(api.texts(tg_user)) == 2)
            assert api.texts(tg_user)[1].startswith("A person will answer here soon")

            # listed, newest waiting first; the visitor's next message is not answered
            status, listing = await call(http, "GET", ops + "/conversations?state=waiting", ANNA)
            assert status == 200
            waiting = listing["conversations"]
            assert [(c["platform"], c["state"]) for c in waiting] == [
                ("telegram", "waiting"),
                ("web", "waiting"),
            ]
            tg_conv, web_conv = waiting[0], waiting[1]
            assert tg_conv["last_text"] == "my card was charged twice"
            assert tg_conv["user_name"] == f"User{tg_user}" and tg_conv["user_id"] == str(tg_user)
            assert set(web_conv) >= {"id", "chat_id", "user_id", "user_name", "since", "last_text"}
            assert await say(http, base, visitor, "are you there?") == []
            await console.wait_for(
                lambda n, d: n == "message" and d["message"]["text"] == "are you there?"
            )

            # tokens: none, a bad one, a visitor's session token -> 401
            for token in (None, "nope", visitor):
                status, body = await call(http, "GET", ops + "/conversations", token)
                assert status == 401 and "error" in body

            # Anna claims the visitor; Ben cannot; Anna answers on the web
            web_id, tg_id = web_conv["id"], tg_conv["id"]
            status, body = await call(http, "POST", f"{ops}/conversations/{web_id}/claim", ANNA)
            assert status == 200 and body["conversation"]["state"] == "claimed"
            assert body["conversation"]["operator"] == "anna"
            status, body = await call(http, "POST", f"{ops}/conversations/{web_id}/claim", BEN)
            assert status == 409 and "error" in body
            status, body = await call(http, "POST", f"{ops}/conversations/{web_id}/release", BEN)
            assert status == 409
            status, body = await call(
                http, "POST", f"{ops}/conversations/{web_id}/messages", ANNA,
                json={"text": "Hi, I'm Anna. Let me check that for you."},
            )  # fmt: skip
            assert status == 200 and body["delivered"] is True
            _, push = await pushed.wait_for(lambda n, d: n == "message" and d["role"] == "operator")
            assert push["text"] == "Hi, I'm Anna. Let me check that for you."
            assert push["author"] == "anna"
            assert await say(http, base, visitor, "thank you!") == []  # still with Anna

            # Ben takes the Telegram user and sends a long answer: split like any reply
            status, _ = await call(http, "POST", f"{ops}/conversations/{tg_id}/claim", BEN)
            assert status == 200
            status, body = await call(
                http, "POST", f"{ops}/conversations/{tg_id}/messages", BEN,
                json={"text": long_answer},
            )  # fmt: skip
            assert status == 200 and body["delivered"] is True
            # on Telegram the operator's name leads their reply ("ben: ...")
            words = ["ben:", *long_answer.split()]
            await api.wait_until(lambda: " ".join(api.texts(tg_user)[2:]).split() == words)
            parts = api.texts(tg_user)[2:]
            assert len(parts) == 2 and all(len(part) <= 4096 for part in parts)
            api.private_message(tg_user, "got it, thanks")
            await console.wait_for(
                lambda n, d: n == "message" and d["message"]["text"] == "got it, thanks"
            )

            # the transcripts tell the user, the bot and the operators apart
            status, transcript = await call(http, "GET", f"{ops}/conversations/{web_id}", ANNA)
            assert status == 200 and transcript["conversation"]["id"] == web_id
            assert [(m["role"], m.get("author")) for m in transcript["messages"]] == [
                ("user", None),
                ("bot", None),
                ("user", None),
                ("user", None),
                ("operator", "anna"),
                ("user", None),
            ]
            async with http.get(base + "/api/messages", headers=bearer(visitor)) as response:
                history = (await response.json())["messages"]
            assert [m["role"] for m in history][-2:] == ["operator", "user"]

            # released: the users are told, and the bot answers again
            for conversation, token in ((web_id, ANNA), (tg_id, BEN)):
                status, body = await call(
                    http, "POST", f"{ops}/conversations/{conversation}/release", token
                )
                assert status == 200 and body["conversation"]["state"] == "bot"
            await pushed.wait_for(lambda n, d: n == "message" and "back to me" in d["text"])
            await api.wait_until(lambda: len(api.texts(tg_user)) >= 5)
            assert "back to me" in api.texts(tg_user)[4]
            assert bot_answered(await say(http, base, visitor, "what are your opening hours?"))
            api.private_message(tg_user, "one more question")
            await api.wait_until(lambda: len(api.texts(tg_user)) >= 6)
            await console.wait_for(
                lambda n, d: n == "conversation" and d["conversation"]["id"] == tg_id
                and d["conversation"]["state"] == "bot"
            )  # fmt: skip

            # the bystander never asked and was answered every time
            for text in ("and your prices?", "ok, bye"):
                assert bot_answered(await say(http, base, bystander, text))
            status, listing = await call(http, "GET", ops + "/conversations?state=all", ANNA)
            states = {c["id"]: c["state"] for c in listing["conversations"]}
            assert set(states.values()) == {"bot"} and len(states) == 3

        async with http.get(base + "/metrics") as response:
            metrics = await response.text()
    assert 'aigc_bot_handoffs_total{trigger="phrase"} 1.0' in metrics
    assert 'aigc_bot_handoffs_total{trigger="command"} 1.0' in metrics
    assert "aigc_bot_handoff_waiting 0.0" in metrics
    assert "aigc_bot_handoff_time_to_claim_seconds_count 2.0" in metrics
    assert "aigc_bot_handoff_time_to_first_reply_seconds_count 2.0" in metrics


async def test_cancel_gives_the_conversation_back_and_bad_requests_are_json(
    api: FakeBotApi, handoff_config: Config
) -> None:
    team_chat = -100777
    config = handoff_config.model_copy(
        update={
            "handoff": handoff_config.handoff.model_copy(
                update={"telegram_chat_id": str(team_chat)}
            )
        }
    )
    async with handoff_bot(config) as bot, aiohttp.ClientSession() as http:
        base, ops = bot.url, bot.url + "/api/operator"
        visitor = await new_visitor(http, base)
        await say(http, base, visitor, "where is my refund?")
        [told] = await say(http, base, visitor, "/human")
        assert told["text"].startswith("A person will answer here soon")
        # the team's Telegram chat is told, with the visitor's last words
        await api.wait_until(lambda: bool(api.texts(team_chat)))
        [notice] = api.texts(team_chat)
        assert notice.startswith("web visitor on web is waiting for a person")
        assert "where is my refund?" in notice
        [again] = await say(http, base, visitor, "/human")
        assert "queue" in again["text"]
        [back] = await say(http, base, visitor, "/cancel")
        assert "back with me" in back["text"]
        assert bot_answered(await say(http, base, visitor, "so, hello bot"))

        _, listing = await call(http, "GET", ops + "/conversations", ANNA)
        [conversation] = listing["conversations"]
        assert conversation["state"] == "bot" and conversation["last_text"] == "so, hello bot"
        cid = conversation["id"]
        checks = [
            ("GET", "/conversations?state=nope", {}, 400),
            ("GET", "/conversations/999999", {}, 404),
            ("POST", "/conversations/999999/claim", {}, 404),
            ("POST", f"/conversations/{cid}/messages", {"data": b"not json"}, 400),
            ("POST", f"/conversations/{cid}/messages", {"json": {"text": "  "}}, 400),
            ("POST", f"/conversations/{cid}/messages", {"json": {"text": "x" * 20_001}}, 413),
        ]
        for method, path, kwargs, expected in checks:
            status, body = await call(http, method, ops + path, ANNA, **kwargs)
            assert (status, set(body)) == (expected, {"error"}), (path, body)
        status, me = await call(http, "GET", ops + "/me", BEN)
        assert (status, me) == (200, {"operator": "ben"})
        async with http.get(base + "/operator") as response:
            assert response.status == 200
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
            assert "Operator console" in await response.text()
        # an operator may step into a conversation the bot holds: answering claims it
        status, body = await call(
            http, "POST", f"{ops}/conversations/{cid}/messages", ANNA, json={"text": "Hello!"}
        )
        assert status == 200 and body["conversation"]["state"] == "claimed"
        assert await say(http, base, visitor, "oh, a person") == []

        # guessing tokens: after 20 bad ones an address waits, even with a good one
        for _ in range(20):
            status, _ = await call(http, "GET", ops + "/me", "guess")
            assert status == 401
        for token in ("guess", ANNA):
            async with http.get(ops + "/me", headers=bearer(token)) as response:
                assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
