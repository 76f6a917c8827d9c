"""The web channel's HTTP API against a real server on a free port.

Each test starts `BotApp` (store, engine, manager) and the `WebChannel` on port
0 and talks to it over HTTP with aiohttp: sessions, messages (JSON and
Server-Sent Events), history, every documented error status, CORS, /healthz,
/metrics and the widget's files. The tiny GPT-2 answers unless a test needs an
engine double (a model that is down, or a scripted stream).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.engine_doubles import ScriptedEngine
from support.eventually import eventually
from support.web_support import PictureDrawer, parse_sse

from adapters.web import WebChannel
from bot.app import BotApp
from bot.config import Config

SSE = {"Accept": "text/event-stream"}


@dataclass
class Server:
    app: BotApp
    channel: WebChannel
    http: aiohttp.ClientSession
    url: str

    async def session(self) -> str:
        async with self.http.post("/api/sessions") as response:
            assert response.status == 201, await response.text()
            body = await response.json()
        assert isinstance(body["session"], str) and len(body["session"]) >= 32
        return body["session"]

    async def post(
        self, token: str | None, payload: Any, headers: dict[str, str] | None = None
    ) -> Any:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.post(
            "/api/messages", json=payload, headers={**auth, **(headers or {})}
        ) as r:
            return r.status, dict(r.headers), await r.text()

    async def history(self, token: str) -> list[dict[str, str]]:
        async with self.http.get(
            "/api/messages", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["messages"]


@pytest.fixture
def serve(make_config: Callable[..., Config]) -> Callable[..., Any]:
    """`async with serve(engine=..., limits={...}) as server:` — a running bot with its web API."""

    @contextlib.asynccontextmanager
    async def factory(engine: Any = None, **sections: dict[str, Any]) -> AsyncIterator[Server]:
        config = make_config(**{"text": {"greedy": True}, **sections})
        async with BotApp(config, engine=engine) as app:
            channel = WebChannel.create(app.services)
            assert channel is not None
            await channel.start()
            url = f"http://127.0.0.1:{channel.port}"
            try:
                async with aiohttp.ClientSession(base_url=url) as http:
                    yield Server(app, channel, http, url)
            finally:
                await channel.stop()

    return factory


def error_of(body: str) -> str:
    document = json.loads(body)
    assert set(document) == {"error"}, document
    assert document["error"]
    return document["error"]


# -- the happy path ------------------------------------------------------------------


async def test_session_message_and_history_on_the_tiny_model(serve: Any) -> None:
    async with serve() as server:
        token = await server.session()
        status, headers, body = await server.post(token, {"text": "hello there"})
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/json")
        replies = json.loads(body)["replies"]
        assert [reply["type"] for reply in replies] == ["text"]
        assert replies[0]["text"].strip()

        history = await server.history(token)
        assert [(m["role"], m["text"]) for m in history] == [
            ("user", "hello there"),
            ("bot", replies[0]["text"]),
        ]
        assert all(m["at"].endswith("Z") for m in history)

        # another visitor sees only their own conversation
        other = await server.session()
        assert other != token
        assert await server.history(other) == []


async def test_the_database_holds_only_the_hash_of_a_session_token(
    serve: Any, tmp_path: Path
) -> None:
    async with serve() as server:
        token = await server.session()
        status, _, _ = await server.post(token, {"text": "remember me"})
        assert status == 200
    with sqlite3.connect(tmp_path / "bot.db") as db:
        rows = db.execute("SELECT token_hash, user_id FROM web_sessions").fetchall()
    assert [row[0] for row in rows] == [hashlib.sha256(token.encode()).hexdigest()]
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("bot.db*"))  # noqa: ASYNC240
    assert token.encode() not in stored


async def test_event_stream_sends_partials_then_the_final_text(serve: Any) -> None:
    engine = ScriptedEngine(lambda turns: "Hello there, friend!")
    async with serve(engine=engine) as server:
        token = await server.session()
        status, headers, body = await server.post(token, {"text": "hi"}, SSE)
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        assert headers["Cache-Control"].startswith("no-cache")
        final = {"type": "text", "text": "Hello there, friend!", "source": {"kind": "model"}}
        assert parse_sse(body) == [
            ("typing", {}),
            ("partial", {"text": "Hello"}),
            ("partial", {"text": "Hello there,"}),
            ("text", final),
            ("done", {"replies": [final]}),
        ]
        # the JSON form of the same exchange
        status, _, body = await server.post(token, {"text": "hi again"})
        assert status == 200
        assert json.loads(body) == {"replies": [final]}
        texts = [m["text"] for m in await server.history(token)]
        assert texts == ["hi", final["text"], "hi again", final["text"]]


async def test_event_stream_on_the_tiny_model(serve: Any) -> None:
    async with serve() as server:
        token = await server.session()
        _, _, body = await server.post(token, {"text": "I like pizza"}, SSE)
        events = parse_sse(body)
        names = [name for name, _ in events]
        assert names[0] == "typing" and names[-2:] == ["text", "done"], names
        assert set(names[1:-2]) <= {"partial"}
        final = events[-2][1]["text"]
        assert final.strip()
        model = {"kind": "model"}
        assert events[-1][1] == {"replies": [{"type": "text", "text": final, "source": model}]}
        assert [(m["role"], m["text"]) for m in await server.history(token)] == [
            ("user", "I like pizza"),
            ("bot", final),
        ]


async def test_a_visitor_who_leaves_mid_stream_still_gets_the_reply_stored(serve: Any) -> None:
    engine = ScriptedEngine(lambda turns: "one two three four", delay=lambda: 0.3)
    async with serve(engine=engine) as server:
        server.channel.heartbeat_s = 0.05
        token = await server.session()
        headers = {"Authorization": f"Bearer {token}", **SSE}
        async with server.http.post("/api/messages", json={"text": "count"}, headers=headers) as r:
            first = (await r.content.readuntil(b": keep-alive\n\n")).decode()
        assert first.startswith("event: typing")  # quiet for longer than heartbeat_s
        assert engine.streams_closed == 0  # the reply was still being made when we left

        async def stored() -> list[Any]:
            history = await server.history(token)
            return history if len(history) == 2 else []

        history = await eventually(stored)
        assert [m["text"] for m in history] == ["count", "one two three four"]


async def test_draw_pictures_come_back_as_image_replies_with_a_media_url(
    serve: Any, tmp_path: Path
) -> None:
    async with serve(web={"public_url": ""}) as server:
        assert server.app.manager is not None
        server.app.manager.drawer = PictureDrawer(server.app.store, tmp_path / "pictures")
        token = await server.session()
        status, _, body = await server.post(token, {"text": "/draw a red fox"})
        assert status == 200, body
        [image] = json.loads(body)["replies"]
        assert (
            image["type"] == "image" and image["seed"] == 1234 and image["caption"] == "a red fox"
        )
        assert image["url"].startswith("/media/") and image["url"].endswith(".png")
        async with server.http.get(image["url"]) as response:
            assert response.status == 200
            assert (await response.read()).startswith(b"\x89PNG")

        _, _, body = await server.post(token, {"text": "/draw a blue fox"}, SSE)
        names = [name for name, _ in parse_sse(body)]
        assert names == ["progress", "image", "done"]
        async with server.http.get("/media/doesnotexist.png") as response:
            assert response.status == 404
            error_of(await response.text())


# -- errors ------------------------------------------------------------------------------


async def test_bad_json_and_empty_text_are_400(serve: Any) -> None:
    async with serve() as server:
        token = await server.session()
        auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        for raw in (b"{not json", b"[1, 2]", b'{"txt": "hi"}', b'{"text": 5}', b"\xff\xfe"):
            async with server.http.post("/api/messages", data=raw, headers=auth) as response:
                assert response.status == 400, raw
                error_of(await response.text())
        for text in ("", "   \n "):
            status, _, body = await server.post(token, {"text": text})
            assert status == 400
            assert "empty" in error_of(body)
        assert await server.history(token) == []


async def test_a_missing_or_unknown_session_is_401(serve: Any) -> None:
    async with serve() as server:
        await server.session()
        for headers in (
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Basic abc"},
            {"Authorization": "Bearer not-a-real-token"},
        ):
            async with server.http.post("/api/messages", json={"text": "hi"}, headers=headers) as r:
                assert r.status == 401
                assert "session" in error_of(await r.text())
            async with server.http.get("/api/messages", headers=headers) as r:
                assert r.status == 401
                error_of(await r.text())


async def test_too_long_text_and_too_large_body_are_413(serve: Any) -> None:
    async with serve(bot={"max_input_chars": 50}, web={"max_body_bytes": 1024}) as server:
        token = await server.session()
        status, _, body = await server.post(token, {"text": "x" * 51})
        assert status == 413
        assert "50" in error_of(body)
        status, _, body = await server.post(token, {"text": "y" * 51}, SSE)
        assert status == 413
        # over the body limit, though the text itself would be short enough once trimmed
        status, _, body = await server.post(token, {"text": "z" + " " * 2000})
        assert status == 413
        assert "1024 bytes" in error_of(body)
        assert await server.history(token) == []
        status, _, _ = await server.post(token, {"text": "x" * 50})
        assert status == 200


async def test_rate_limited_messages_are_429_with_retry_after(serve: Any) -> None:
    async with serve(limits={"messages_per_minute": 2}) as server:
        token = await server.session()
        for _ in range(2):
            status, _, _ = await server.post(token, {"text": "hello"})
            assert status == 200
        status, headers, body = await server.post(token, {"text": "hello"})
        assert status == 429
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert "wait" in error_of(body)
        # the stream form answers the same way before any event is sent
        status, headers, body = await server.post(token, {"text": "hello"}, SSE)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        error_of(body)
        # another session has its own allowance
        status, _, _ = await server.post(await server.session(), {"text": "hello"})
        assert status == 200


async def test_session_creation_is_rate_limited_per_client_address(serve: Any) -> None:
    async with serve(web={"sessions_per_minute": 2}) as server:
        await server.session()
        await server.session()
        async with server.http.post("/api/sessions") as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) >= 1
            error_of(await response.text())
        # a different client address is counted on its own
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(base_url=server.url, connector=connector) as other:
            async with other.post("/api/sessions") as response:
                assert response.status == 201


async def test_behind_a_trusted_proxy_sessions_are_limited_per_visitor(serve: Any) -> None:
    """Every request comes from the proxy (127.0.0.1 here); the limit counts
    the visitor it names in X-Forwarded-For instead."""
    web_settings = {"sessions_per_minute": 1, "trusted_proxies": ["127.0.0.1"]}
    async with serve(web=web_settings) as server:

        async def create(forwarded_for: str) -> int:
            headers = {"X-Forwarded-For": forwarded_for}
            async with server.http.post("/api/sessions", headers=headers) as response:
                return response.status

        assert await create("203.0.113.5") == 201
        assert await create("203.0.113.5") == 429
        assert await create("203.0.113.6") == 201
        # a visitor's forged entry stays left of the address the proxy saw
        assert await create("198.51.100.1, 203.0.113.5") == 429


async def test_forwarded_for_is_ignored_from_an_untrusted_peer(serve: Any) -> None:
    async with serve(web={"sessions_per_minute": 1}) as server:
        statuses = []
        for forged in ("203.0.113.5", "203.0.113.6"):
            headers = {"X-Forwarded-For": forged}
            async with server.http.post("/api/sessions", headers=headers) as response:
                statuses.append(response.status)
        assert statuses == [201, 429]


async def test_an_unavailable_engine_is_503(serve: Any) -> None:
    async with serve(engine=ScriptedEngine(fail=True)) as server:
        token = await server.session()
        status, headers, body = await server.post(token, {"text": "anyone there?"})
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert "unavailable" in error_of(body)
        # streaming had already started (the typing event), so the error is an event
        status, _, body = await server.post(token, {"text": "still there?"}, SSE)
        assert status == 200
        events = parse_sse(body)
        assert [name for name, _ in events] == ["typing", "error", "done"]
        assert events[1][1]["status"] == 503 and events[1][1]["retry_after"] >= 1
        # the message was kept, so nothing is lost
        assert [m["role"] for m in await server.history(token)] == ["user", "user"]


async def test_healthz(serve: Any) -> None:
    async with serve() as server:
        async with server.http.get("/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
    async with serve(engine=ScriptedEngine(fail=True)) as server:
        async with server.http.get("/healthz") as response:
            assert response.status == 503
            assert "text engine not ready" in (await response.json())["problems"]


async def test_unknown_routes_and_methods_are_json_errors(serve: Any) -> None:
    async with serve() as server:
        async with server.http.get("/api/nothing") as response:
            assert response.status == 404
            error_of(await response.text())
        async with server.http.delete("/api/messages") as response:
            assert response.status == 405
            error_of(await response.text())


# -- metrics --------------------------------------------------------------------------------


async def test_metrics_show_the_traffic(serve: Any) -> None:
    async with serve(limits={"messages_per_minute": 2}) as server:
        token = await server.session()
        for _ in range(3):
            await server.post(token, {"text": "hello"})
        await server.post(token, {"text": "/help"})
        async with server.http.get("/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['aigc_bot_messages_total{platform="web"}'] == 4
    assert values['aigc_bot_reply_latency_seconds_count{platform="web"}'] == 4
    assert 'aigc_bot_reply_latency_seconds_bucket{le="+Inf",platform="web"}' in values
    assert values['aigc_bot_engine_queue_depth{engine="text"}'] == 0
    assert values["aigc_bot_engine_batch_size_count"] >= 2
    assert values['aigc_bot_errors_total{kind="rate_limited"}'] == 1
    for family in (
        "aigc_bot_messages_total",
        "aigc_bot_reply_latency_seconds",
        "aigc_bot_engine_queue_depth",
        "aigc_bot_engine_batch_size",
        "aigc_bot_errors_total",
    ):
        assert f"# TYPE {family} " in text


# -- CORS and the widget's files ---------------------------------------------------------------


async def test_cross_origin_api_calls_are_refused_by_default(serve: Any) -> None:
    async with serve() as server:
        evil = {"Origin": "https://elsewhere.example"}
        async with server.http.post("/api/sessions", headers=evil) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
            error_of(await response.text())
        preflight = {
            **evil,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with server.http.options("/api/messages", headers=preflight) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
        # the page's own origin (browsers send Origin on same-origin POSTs)
        async with server.http.post("/api/sessions", headers={"Origin": server.url}) as response:
            assert response.status == 201
        # the widget script and pictures are plain static files for any page
        async with server.http.get("/widget.js", headers=evil) as response:
            assert response.status == 200


async def test_allowed_origins_get_cors_headers_and_preflights(serve: Any) -> None:
    shop = "https://shop.example"
    async with serve(web={"allowed_origins": [shop + "/"]}) as server:
        preflight = {
            "Origin": shop,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with server.http.options("/api/messages", headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == shop
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            allowed = response.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed and "content-type" in allowed
            assert response.headers["Vary"] == "Origin"
        async with server.http.post("/api/sessions", headers={"Origin": shop}) as response:
            assert response.status == 201
            assert response.headers["Access-Control-Allow-Origin"] == shop
            token = (await response.json())["session"]
        # errors carry the headers too, so the widget can read them (and Retry-After)
        async with server.http.post(
            "/api/messages", json={"text": "hi"}, headers={"Origin": shop}
        ) as response:
            assert response.status == 401
            assert response.headers["Access-Control-Allow-Origin"] == shop
            assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]
        headers = {"Origin": shop, "Authorization": f"Bearer {token}"}
        async with server.http.get("/api/messages", headers=headers) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == shop
        # a streamed reply sends its headers early: they must be there too
        stream = {**headers, **SSE}
        async with server.http.post("/api/messages", json={"text": "hi"}, headers=stream) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["Access-Control-Allow-Origin"] == shop
            assert "event: done" in await r.text()
        async with server.http.post(
            "/api/sessions", headers={"Origin": "https://other.example"}
        ) as response:
            assert response.status == 403
    async with serve(web={"allowed_origins": ["*"]}) as server:
        async with server.http.post(
            "/api/sessions", headers={"Origin": "https://any.example"}
        ) as response:
            assert response.status == 201
            assert response.headers["Access-Control-Allow-Origin"] == "https://any.example"


async def test_the_demo_page_can_be_turned_off(serve: Any) -> None:
    async with serve(web={"demo_page": False}) as server:
        async with server.http.get("/") as response:
            assert response.status == 404
            error_of(await response.text())
        async with server.http.get("/widget.js") as response:
            assert response.status == 200


async def test_the_demo_page_and_widget_files_are_served(serve: Any) -> None:
    async with serve() as server:
        async with server.http.get("/") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/html")
            page = await response.text()
        assert '<script src="/widget.js" data-title="Help"' in page
        async with server.http.get("/widget.js") as response:
            assert response.status == 200
            assert "javascript" in response.headers["Content-Type"]
            script = await response.text()
        assert "textContent" in script and "innerHTML" not in script
        async with server.http.get("/widget.css") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/css")
