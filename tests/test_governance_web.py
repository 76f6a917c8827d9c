"""Governance end to end on the web API: `BotApp` and the `WebChannel` on a
free port, driven over HTTP. A banned or shut-out visitor gets 403 on every
request; a daily quota gets 429 with Retry-After until midnight UTC; blocked
input and output are replaced by the configured answer (and nothing is
streamed); /stats shows what is left; an admin bans over the API itself."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.engine_doubles import ScriptedEngine
from support.web_support import parse_sse

from adapters.web import WebChannel
from adapters.web.http import token_hash
from bot.app import BotApp
from bot.config import Config
from bot.governance import GovernanceService
from bot.governance.periods import until_reset
from storage import Store

ADMIN_TOKEN = "admin-session-token-for-governance-tests-0123456789"
ADMIN_ID = "wadmin"


@contextlib.asynccontextmanager
async def governed(app: BotApp) -> AsyncIterator[GovernanceService]:
    """The app's governance service: the one bot.app wires in, or (until it
    does) one made here and handed to the manager."""
    assert app.manager is not None and app.store is not None
    if isinstance(app.manager.governance, GovernanceService):
        yield app.manager.governance
        return
    service = GovernanceService.create(app.config, app.store, app.commands, app.metrics)
    await service.start()
    app.manager.governance = service
    try:
        yield service
    finally:
        await service.close()


@dataclass
class Web:
    app: BotApp
    service: GovernanceService
    http: aiohttp.ClientSession

    async def session(self) -> tuple[str, str]:
        async with self.http.post("/api/sessions") as response:
            assert response.status == 201
            body = await response.json()
        return body["session"], body["user_id"]

    async def post(
        self, token: str, text: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], str]:
        auth = {"Authorization": f"Bearer {token}", **(headers or {})}
        async with self.http.post("/api/messages", json={"text": text}, headers=auth) as r:
            return r.status, dict(r.headers), await r.text()

    async def texts(self, token: str, text: str) -> list[str]:
        status, _, body = await self.post(token, text)
        assert status == 200, body
        return [reply["text"] for reply in json.loads(body)["replies"]]


@pytest.fixture
def serve(tmp_path: Path) -> Any:
    @contextlib.asynccontextmanager
    async def factory(engine: Any = None, **sections: dict[str, Any]) -> AsyncIterator[Web]:
        data: dict[str, dict[str, Any]] = {
            "bot": {"data_dir": str(tmp_path / "data"), "admins": [f"web:{ADMIN_ID}"]},
            "storage": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"},
            "limits": {"messages_per_minute": 0},
            "draw": {"enabled": False},
            "web": {"port": 0},
            "telegram": {"enabled": False},
            "discord": {"enabled": False},
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        config = Config.model_validate(data)
        store = await Store.open(config.storage.url)  # the admin's session, made beforehand
        await store.sessions.create(token_hash(ADMIN_TOKEN), ADMIN_ID)
        await store.close()
        async with BotApp(config, engine=engine or ScriptedEngine()) as app, governed(app) as gov:
            channel = WebChannel.create(app.services)
            assert channel is not None
            await channel.start()
            try:
                url = f"http://127.0.0.1:{channel.port}"
                async with aiohttp.ClientSession(base_url=url) as http:
                    yield Web(app, gov, http)
            finally:
                await channel.stop()

    return factory


def error_of(body: str) -> str:
    document = json.loads(body)
    assert set(document) == {"error"}, document
    return str(document["error"])


async def test_an_admin_bans_a_visitor_who_then_gets_403_on_every_request(serve: Any) -> None:
    async with serve() as web:
        token, user_id = await web.session()
        assert await web.texts(token, "hello") == ["echo: hello"]
        other, _ = await web.session()
        status, _, body = await web.post(other, f"/ban web:{user_id}")
        assert status == 200 and "only the bot's admins" in body
        [answer] = await web.texts(ADMIN_TOKEN, f"/ban web:{user_id} abuse")
        assert answer.startswith(f"Banned web:{user_id}")
        for text in ("hello?", "/start", "anyone"):
            status, headers, body = await web.post(token, text)
            assert status == 403
            assert headers["Content-Type"].startswith("application/json")
            assert error_of(body) == "You can't use this bot."
        for path in ("/api/messages", "/api/events"):  # nor read what is stored
            async with web.http.get(path, headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 403 and error_of(await r.text()) == "You can't use this bot."
        assert await web.texts(other, "still here") == ["echo: still here"]
        [answer] = await web.texts(ADMIN_TOKEN, f"/unban web:{user_id}")
        assert answer.startswith("Unbanned")
        assert await web.texts(token, "back") == ["echo: back"]
        engine = web.app.engine
        assert isinstance(engine, ScriptedEngine)
        assert [prompt[-1] for prompt in engine.prompts] == ["hello", "still here", "back"]


async def test_the_daily_quota_answers_429_with_retry_after_until_midnight_utc(
    serve: Any,
) -> None:
    async with serve(limits={"messages_per_minute": 0, "messages_per_day": 2}) as web:
        token, _ = await web.session()
        for text in ("one", "two"):
            assert await web.texts(token, text) == [f"echo: {text}"]
        for text in ("three", "four"):  # every request is answered on the web
            status, headers, body = await web.post(token, text)
            assert status == 429, body
            expected = until_reset(datetime.now(UTC))
            assert abs(int(headers["Retry-After"]) - expected) <= 5
            assert "today's limit of 2 messages" in error_of(body)
        status, headers, body = await web.post(
            token, "five", headers={"Accept": "text/event-stream"}
        )
        assert status == 429 and int(headers["Retry-After"]) > 0
        [stats] = await web.texts(token, "/stats")
        assert "Today: 2 of 2 messages." in stats
        assert "Left: 0 messages; resets at midnight UTC, in " in stats
        other, _ = await web.session()
        assert await web.texts(other, "one") == ["echo: one"]
        assert web.app.metrics.refused.labels("quota")._value.get() == 3


async def test_visitors_outside_the_allow_list_get_403(serve: Any) -> None:
    async with serve(access={"users_allow": [f"web:{ADMIN_ID}"], "refusal": ""}) as web:
        token, _ = await web.session()
        for _ in range(2):
            status, _, body = await web.post(token, "hello")
            assert status == 403 and error_of(body) == "You can't use this bot."
        assert await web.texts(ADMIN_TOKEN, "hello") == ["echo: hello"]
        [entry] = await web.service.records.entries(kind="access")
        assert entry.platform == "web" and "not in access.users_allow" in entry.detail


async def test_blocked_input_and_output_are_replaced_and_nothing_is_streamed(serve: Any) -> None:
    engine = ScriptedEngine(
        lambda turns: "here is a Free  Crypto tip for you" if "tip" in turns[-1] else "fine words"
    )
    moderation = {
        "blocked_terms": ["free crypto"],
        "blocked_answer": "Let's talk about something else.",
    }
    async with serve(engine, moderation=moderation) as web:
        token, _ = await web.session()
        assert await web.texts(token, "FRÉE CRYPTO now") == ["Let's talk about something else."]
        assert await web.texts(token, "any tip?") == ["Let's talk about something else."]
        status, _, body = await web.post(token, "any tip today?", {"Accept": "text/event-stream"})
        assert status == 200
        events = [name for name, _ in parse_sse(body) if name != ":"]
        assert "partial" not in events and events[-1] == "done"
        assert await web.texts(token, "hello") == ["fine words"]
        history = [(m["role"], m["text"]) async for m in _history(web, token)]
        assert ("bot", "here is a Free  Crypto tip for you") not in history
        entries = await web.service.records.entries(kind="moderation")
        assert [entry.detail for entry in entries] == [
            'input: term "free crypto"',
            'output: term "free crypto"',
            'output: term "free crypto"',
        ]


async def _history(web: Web, token: str) -> AsyncIterator[dict[str, str]]:
    async with web.http.get("/api/messages", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        for message in (await r.json())["messages"]:
            yield message
