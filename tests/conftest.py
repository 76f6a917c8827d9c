"""Shared fixtures: a tiny GPT-2 built locally, databases, configs, a running bot.

Nothing here downloads anything. PostgreSQL tests start the local server if it
is down and skip loudly only when it truly cannot be had.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import Config, load_config
from bot.testing.tiny_models import build_tiny_gpt2
from storage import Store

# Tiny models on a small shared CPU run many times faster on one thread than
# with threads fighting over the cores; subprocesses get the same through env.
torch.set_num_threads(1)
SUBPROCESS_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

PG_ADMIN_DSN = os.environ.get("AIGC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-dim GPT-2 with a byte-level BPE trained on a few hundred lines."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


# -- databases -----------------------------------------------------------------


async def _pg_connect() -> Any:
    import asyncpg

    return await asyncpg.connect(PG_ADMIN_DSN, timeout=5)


def _start_postgres() -> None:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        return
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
        check=False,
        capture_output=True,
        timeout=60,
    )


_pg_state: dict[str, str | None] = {}


def postgres_unavailable_reason() -> str | None:
    """None when PostgreSQL answers (starting it if needed), else why not."""
    if "reason" in _pg_state:
        return _pg_state["reason"]

    async def probe() -> None:
        connection = await _pg_connect()
        await connection.close()

    reason: str | None = None
    for attempt in range(2):
        try:
            asyncio.run(probe())
            reason = None
            break
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if attempt == 0:
                _start_postgres()
    _pg_state["reason"] = reason
    return reason


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    reason = postgres_unavailable_reason()
    if reason is not None:
        pytest.skip(
            f"PostgreSQL at {PG_ADMIN_DSN} cannot be reached even after trying to start it: "
            f"{reason}"
        )
    name = f"aigc_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await _pg_connect()
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Run a test against SQLite and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A store on `db_url` (SQLite and PostgreSQL); a module may define its own."""
    opened = await Store.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


# -- configs -------------------------------------------------------------------


@pytest.fixture
def make_config(tmp_path: Path, tiny_model_dir: Path) -> Callable[..., Config]:
    """A config on a temp SQLite database and the tiny model; keyword
    arguments override sections, e.g. make_config(text={"greedy": True})."""

    def factory(**sections: dict[str, Any]) -> Config:
        data: dict[str, dict[str, Any]] = {
            "bot": {"data_dir": str(tmp_path / "data")},
            "storage": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"},
            "text": {
                # the local engine's tests; tests/test_engine_ct2.py has the other's
                "engine": "local",
                "model": str(tiny_model_dir),
                "max_new_tokens": 16,
                "batch_wait_ms": 5,
                "stream_interval_ms": 0,
            },
            "draw": {"enabled": False},
            "web": {"port": 0},
            "telegram": {"enabled": False},
            "discord": {"enabled": False},
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return Config.model_validate(data)

    return factory


@pytest.fixture
def bot_env(tmp_path: Path, tiny_model_dir: Path) -> dict[str, str]:
    """Environment for running `aigc-bot` as a subprocess on the tiny model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_BOT")}
    env.update(
        {
            "AIGC_BOT__STORAGE__URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
            "AIGC_BOT__TEXT__MODEL": str(tiny_model_dir),
            "AIGC_BOT__TEXT__MAX_NEW_TOKENS": "16",
            "AIGC_BOT__BOT__DATA_DIR": str(tmp_path / "data"),
            "AIGC_BOT__DRAW__ENABLED": "false",
            "AIGC_BOT__TELEGRAM__ENABLED": "false",
            "AIGC_BOT__DISCORD__ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
            **SUBPROCESS_THREADS,
        }
    )
    return env


@pytest.fixture
def unused_port() -> int:
    from support.net import free_port

    return free_port()


@pytest.fixture
async def running_app(make_config: Callable[..., Config]) -> AsyncIterator[Any]:
    """A started BotApp (store, engine, manager) on the tiny model."""
    from bot.app import BotApp

    async with BotApp(make_config(text={"greedy": True})) as app:
        yield app


__all__ = ["load_config", "postgres_unavailable_reason"]
