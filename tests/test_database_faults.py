"""The database goes away and comes back: users get a short "temporarily
unavailable" (web 503 with Retry-After) within a bounded time, `/healthz`
says 503, nothing crashes, and service resumes by itself.

SQLite: another process holds the write lock past the busy timeout.
PostgreSQL: the real local server is stopped mid-run and started again (the
test restarts it however it ends).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from conftest import postgres_unavailable_reason
from support.engine_doubles import ScriptedEngine
from support.eventually import eventually

from adapters.web import WebChannel
from bot.app import BotApp
from bot.config import Config


@asynccontextmanager
async def web_bot(config: Config) -> AsyncIterator[tuple[BotApp, aiohttp.ClientSession, str]]:
    async with BotApp(config, engine=ScriptedEngine()) as app:
        channel = WebChannel.create(app.services)
        assert channel is not None
        await channel.start()
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{channel.port}") as http:
                async with http.post("/api/sessions") as response:
                    assert response.status == 201
                    token = (await response.json())["session"]
                yield app, http, token
        finally:
            await channel.stop()


async def say(
    http: aiohttp.ClientSession, token: str, text: str
) -> tuple[int, dict[str, Any], str]:
    async with http.post(
        "/api/messages", json={"text": text}, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, dict(response.headers), await response.text()


async def health(http: aiohttp.ClientSession) -> int:
    async with http.get("/healthz") as response:
        return response.status


async def test_sqlite_held_by_another_writer_is_503_then_recovers(
    make_config: Callable[..., Config], tmp_path: Any
) -> None:
    config = make_config(storage={"busy_timeout_ms": 300})
    async with web_bot(config) as (_app, http, token):
        assert (await say(http, token, "before"))[0] == 200
        other = sqlite3.connect(tmp_path / "bot.db", isolation_level=None, timeout=5)
        other.execute("BEGIN IMMEDIATE")  # another process takes the write lock and keeps it
        try:
            started = time.monotonic()
            status, headers, body = await say(http, token, "while locked")
            waited = time.monotonic() - started
            assert status == 503, body
            assert int(headers["Retry-After"]) >= 1
            assert "try again" in body.lower()
            assert waited < 10  # bounded by the busy timeout, not hanging
            assert await health(http) == 503
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await health(http) == 200
        status, _, body = await say(http, token, "after")
        assert status == 200, body


def _pg_ctl(action: str) -> None:
    versions = sorted(os.listdir("/etc/postgresql"))
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action, "-m", "fast"]
        if action == "stop"
        else ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def stoppable_postgres(postgres_url: str) -> str:
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        pytest.skip("LOUD SKIP: pg_ctlcluster is not here, so the test cannot stop PostgreSQL")
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: stopping the local PostgreSQL needs root")
    return postgres_url


@pytest.mark.timeout(300)
async def test_postgresql_stopped_mid_run_is_503_and_service_resumes_by_itself(
    make_config: Callable[..., Config], stoppable_postgres: str, capsys: Any
) -> None:
    config = make_config(storage={"url": stoppable_postgres})
    async with web_bot(config) as (app, http, token):
        assert (await say(http, token, "before"))[0] == 200
        try:
            await asyncio.to_thread(_pg_ctl, "stop")
            started = time.monotonic()
            status, headers, body = await say(http, token, "while down")
            answered_in = time.monotonic() - started
            assert status == 503, body
            assert int(headers["Retry-After"]) >= 1
            assert answered_in < 10
            assert await health(http) == 503
        finally:
            await asyncio.to_thread(_pg_ctl, "start")
            back = time.monotonic()
        # no restart of the bot: the pool replaces its dead connections
        await eventually(lambda: _ok(http, token), within=60, every=0.2)
        recovery = time.monotonic() - back
        assert await health(http) == 200
        assert app.manager is not None and not app.manager.closing
    with capsys.disabled():
        print(
            f"\nPostgreSQL down: 503 after {answered_in:.2f} s; "
            f"serving again {recovery:.2f} s after the server came back"
        )
    assert postgres_unavailable_reason() is None


async def _ok(http: aiohttp.ClientSession, token: str) -> bool:
    try:
        return (await say(http, token, "after"))[0] == 200
    except aiohttp.ClientError:
        return False
