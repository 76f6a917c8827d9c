"""The OpenAI-compatible remote engine against a local fake completions server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.config import TextSection
from bot.engines import EngineUnavailable, create_text_engine
from bot.engines.remote import RemoteTextEngine


@pytest.fixture
async def completions_server() -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"requests": [], "status": 200, "pieces": [" Hello", " there", "!"]}

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state["requests"].append({"body": body, "auth": request.headers.get("Authorization")})
        if state["status"] != 200:
            return web.json_response({"error": "overloaded"}, status=state["status"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in state["pieces"]:
            chunk = {"choices": [{"text": piece, "index": 0}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state["url"] = f"http://127.0.0.1:{port}/v1"
    yield state
    await runner.cleanup()


async def test_streams_a_completion_in_the_dialogue_format(
    completions_server: dict[str, Any], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMOTE_KEY", "sk-remote-secret")
    config = TextSection(
        engine="remote",
        model=str(tiny_model_dir),
        remote_url=completions_server["url"],
        remote_model="gpt2",
        api_key_env="REMOTE_KEY",
        max_new_tokens=20,
    )
    engine = create_text_engine(config)
    assert isinstance(engine, RemoteTextEngine)
    await engine.start()
    try:
        parts = [part async for part in engine.stream(["hi", "hello", "how are you?"])]
    finally:
        await engine.close()
    assert [p.text for p in parts] == ["Hello", "Hello there", "Hello there!", "Hello there!"]
    assert parts[-1].final
    [request] = completions_server["requests"]
    assert request["body"]["prompt"] == "hi<|endoftext|>hello<|endoftext|>how are you?<|endoftext|>"
    assert request["body"]["stop"] == ["<|endoftext|>"] and request["body"]["model"] == "gpt2"
    assert request["auth"] == "Bearer sk-remote-secret"


async def test_server_errors_become_engine_unavailable(completions_server: dict[str, Any]) -> None:
    completions_server["status"] = 503
    engine = RemoteTextEngine(
        TextSection(engine="remote", model="gpt2", remote_url=completions_server["url"])
    )
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match="answered 503"):
            await engine.generate(["hi"])
    finally:
        await engine.close()


async def test_unreachable_server_is_engine_unavailable() -> None:
    engine = RemoteTextEngine(
        TextSection(engine="remote", model="gpt2", remote_url="http://127.0.0.1:1/v1")
    )
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match="failed"):
            await engine.generate(["hi"])
    finally:
        await engine.close()


async def test_empty_completion_gets_the_fallback(completions_server: dict[str, Any]) -> None:
    completions_server["pieces"] = ["  "]
    engine = RemoteTextEngine(
        TextSection(
            engine="remote",
            model="gpt2",
            remote_url=completions_server["url"],
            fallback_reply="Hm?",
        )
    )
    await engine.start()
    try:
        assert await engine.generate(["hi"]) == "Hm?"
    finally:
        await engine.close()
