"""The OpenAI-compatible remote engine against a local fake completions server:
the dialogue format, errors, retries with backoff, and a slow server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.config import TextSection
from bot.engine_settings import build_text_engine, remote_engine_settings
from bot.engines import EngineUnavailable
from bot.engines.remote import RemoteTextEngine


@pytest.fixture
async def completions_server() -> AsyncIterator[dict[str, Any]]:
    """`fail_first` requests get `status`; `hang_first` requests wait for
    `release` (never set unless a test sets it); the rest stream `pieces`."""
    state: dict[str, Any] = {
        "requests": [],
        "status": 200,
        "fail_first": 0,
        "hang_first": 0,
        "pieces": [" Hello", " there", "!"],
        "release": asyncio.Event(),
    }

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state["requests"].append({"body": body, "auth": request.headers.get("Authorization")})
        number = len(state["requests"])
        if number <= state["hang_first"]:
            await state["release"].wait()
        if state["status"] != 200 and (not state["fail_first"] or number <= state["fail_first"]):
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
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state["url"] = f"http://127.0.0.1:{port}/v1"
    yield state
    state["release"].set()
    await runner.cleanup()


def remote(url: str, **values: Any) -> RemoteTextEngine:
    section = TextSection(engine="remote", model="gpt2", remote_url=url, **values)
    return RemoteTextEngine(remote_engine_settings(section))


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
    engine = build_text_engine(config)
    assert isinstance(engine, RemoteTextEngine)
    await engine.start()
    try:
        parts = [part async for part in engine.stream(["hi", "hello", "how are you?"])]
    finally:
        await engine.close()
    assert [p.text for p in parts] == ["Hello", "Hello there", "Hello there!", "Hello there!"]
    assert parts[-1].final and parts[-1].tokens > 0
    [request] = completions_server["requests"]
    assert request["body"]["prompt"] == "hi<|endoftext|>hello<|endoftext|>how are you?<|endoftext|>"
    assert request["body"]["stop"] == ["<|endoftext|>"] and request["body"]["model"] == "gpt2"
    assert request["auth"] == "Bearer sk-remote-secret"


def test_the_api_key_is_read_by_the_settings_not_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMOTE_KEY", "sk-1")
    settings = remote_engine_settings(TextSection(engine="remote", api_key_env="REMOTE_KEY"))
    assert settings.api_key == "sk-1" and "sk-1" not in repr(settings)


async def test_the_prompt_fits_the_budget_without_a_tokenizer(
    completions_server: dict[str, Any],
) -> None:
    engine = remote(completions_server["url"], max_history_tokens=30)
    await engine.start()
    try:
        turns = [f"turn number {index} of a long chat" for index in range(40)]
        prompt = engine.prompt(turns)
    finally:
        await engine.close()
    assert prompt.endswith("turn number 39 of a long chat<|endoftext|>")
    assert prompt.startswith("turn number ") and "turn number 30 " not in prompt


async def test_server_errors_are_retried_then_engine_unavailable(
    completions_server: dict[str, Any],
) -> None:
    completions_server["status"] = 503
    engine = remote(completions_server["url"], remote_retries=2, remote_backoff_s=0.001)
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match="answered 503"):
            await engine.generate(["hi"])
    finally:
        await engine.close()
    assert len(completions_server["requests"]) == 3  # the first try and two retries


async def test_a_server_that_fails_the_first_requests_is_retried_until_it_answers(
    completions_server: dict[str, Any],
) -> None:
    completions_server.update(status=502, fail_first=2)
    engine = remote(completions_server["url"], remote_retries=2, remote_backoff_s=0.001)
    await engine.start()
    try:
        assert await engine.generate(["hi"]) == "Hello there!"
    finally:
        await engine.close()
    assert engine.attempts == 3


async def test_a_client_error_is_not_retried(completions_server: dict[str, Any]) -> None:
    completions_server["status"] = 400
    engine = remote(completions_server["url"], remote_retries=3, remote_backoff_s=0.001)
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match="answered 400"):
            await engine.generate(["hi"])
    finally:
        await engine.close()
    assert engine.attempts == 1


async def test_a_slow_server_times_out_is_retried_and_then_answers(
    completions_server: dict[str, Any],
) -> None:
    completions_server["hang_first"] = 1  # the first request never gets an answer
    engine = remote(
        completions_server["url"],
        request_timeout_s=0.2,
        remote_retries=1,
        remote_backoff_s=0.001,
    )
    await engine.start()
    try:
        assert await engine.generate(["hi"]) == "Hello there!"
    finally:
        await engine.close()
    assert engine.attempts == 2


async def test_a_server_that_stays_slow_is_engine_unavailable(
    completions_server: dict[str, Any],
) -> None:
    completions_server["hang_first"] = 10
    engine = remote(
        completions_server["url"],
        request_timeout_s=0.1,
        remote_retries=1,
        remote_backoff_s=0.001,
    )
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match="TimeoutError"):
            await engine.generate(["hi"])
    finally:
        await engine.close()
    assert engine.attempts == 2


async def test_unreachable_server_is_engine_unavailable() -> None:
    engine = remote("http://127.0.0.1:1/v1", remote_retries=1, remote_backoff_s=0.001)
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match="failed"):
            await engine.generate(["hi"])
    finally:
        await engine.close()
    assert engine.attempts == 2


async def test_an_empty_completion_is_an_empty_final_chunk(
    completions_server: dict[str, Any],
) -> None:
    completions_server["pieces"] = ["  "]
    engine = remote(completions_server["url"])
    await engine.start()
    try:
        chunks = [chunk async for chunk in engine.stream(["hi"])]
    finally:
        await engine.close()
    assert chunks[-1].final and chunks[-1].text == ""
