"""SIGTERM under load: replies in flight finish within `shutdown_grace_s`,
messages that arrive meanwhile are told the bot is restarting, the process
exits 0, and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.eventually import eventually
from support.fakes.completions_server import FakeCompletions
from support.net import free_port
from support.process import BotProcess

from storage import Store


async def _post(http: aiohttp.ClientSession, url: str, token: str, text: str) -> tuple[int, Any]:
    async with http.post(
        url + "/api/messages", json={"text": text}, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, json.loads(await response.text())


@pytest.mark.timeout(300)
async def test_sigterm_finishes_replies_in_flight_and_refuses_new_ones(
    bot_env: dict[str, str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    completions = await FakeCompletions().start()
    completions.gate.clear()  # every answer waits until the test lets it go
    port = free_port()
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    env = {
        **bot_env,
        "AIGC_BOT__STORAGE__URL": url,
        "AIGC_BOT__WEB__PORT": str(port),
        "AIGC_BOT__TEXT__ENGINE": "remote",
        "AIGC_BOT__TEXT__MODEL": str(tiny_model_dir),
        "AIGC_BOT__TEXT__REMOTE_URL": completions.url,
        "AIGC_BOT__BOT__SHUTDOWN_GRACE_S": "30",
        "AIGC_BOT__LIMITS__MESSAGES_PER_MINUTE": "0",
    }
    bot = BotProcess(env, tmp_path, tmp_path / "run.log", port)
    try:
        await bot.start()
        async with aiohttp.ClientSession() as http:
            tokens = []
            for _ in range(4):
                async with http.post(bot.url + "/api/sessions") as response:
                    tokens.append((await response.json())["session"])
            in_flight = [
                asyncio.create_task(_post(http, bot.url, token, f"question {i}"))
                for i, token in enumerate(tokens)
            ]
            await asyncio.wait_for(completions.wait_for_waiting(4), 60)
            assert bot.process is not None
            bot.process.send_signal(signal.SIGTERM)

            async def restarting() -> Any:
                status, body = await _post(http, bot.url, tokens[0], "anyone?")
                return body if status == 503 else None

            refused = await eventually(restarting, within=30, every=0.1)
            assert "restarting" in refused["error"]
            completions.gate.set()
            answers = await asyncio.gather(*in_flight)
        returncode = await asyncio.wait_for(bot.process.wait(), 60)
    finally:
        await completions.close()
        if bot.process is not None and bot.process.returncode is None:
            await bot.kill()
    assert returncode == 0, bot.tail()
    assert [status for status, _ in answers] == [200] * 4, answers
    assert [body["replies"][0]["text"] for _, body in answers] == [
        f"answer: question {i}" for i in range(4)
    ]
    store = await Store.open(url)
    try:
        from sqlalchemy import text

        async with store.engine.connect() as connection:
            rows = list(await connection.execute(text("SELECT role, text FROM messages")))
    finally:
        await store.close()
    assert sorted(t for role, t in rows if role == "user") == [f"question {i}" for i in range(4)]
    assert sum(1 for role, _ in rows if role == "bot") == 4
