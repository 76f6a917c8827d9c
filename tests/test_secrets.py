"""Secrets (#16.7): no token reaches any output, even while everything fails.

Every secret the bot knows is set to a marker value — the Telegram and
Discord tokens, the Telegram webhook secret, the remote engine's API key, the
operator tokens, and a PostgreSQL password inside `[storage] url` (an env
override) — and the log is at DEBUG (python-telegram-bot and discord.py log
their requests there). Then a real `aigc-bot run` meets every failure, in
three runs on one database: neither Telegram nor Discord can be reached; both
reject their tokens (the fakes); Telegram works in webhook mode with the
secret while wrong secrets knock. The remote engine is down throughout, so
messages fail with 503; clients send bad sessions, bad JSON, oversized bodies
and wrong operator tokens (some of them other markers). `aigc-bot doctor` runs
in each situation, `aigc-bot export` after. One test collects all of it —
process logs (tracebacks included), HTTP bodies and headers, /healthz,
/metrics, what Telegram users were sent, doctor, export — and greps for the
markers: zero hits.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.engine import make_url
from support.eventually import eventually
from support.fakes.discord_server import FakeDiscord
from support.fakes.telegram_server import FakeBotApi
from support.net import free_port
from support.process import AIGC_BOT, BotProcess

MARKERS = {
    "telegram token": "4242424242:SECRETMARKERtgA1b2C3d4E5f6G7h8",
    "discord token": "SECRETMARKERdcQ9w8E7r6T5y4U3i2",
    "webhook secret": "SECRETMARKERwhZ1x2C3v4B5n6M7",
    "text api key": "sk-SECRETMARKERkeyP0o9I8u7Y6",
    "operator token": "SECRETMARKERopL1k2J3h4G5f6",
    "postgres password": "SECRETMARKERpgN7b6V5c4X3z2",
}
GATHERED = dict[str, str]


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """PostgreSQL with the marker as its password (the local server trusts
    127.0.0.1, so any password connects); SQLite when there is no server."""
    try:
        url = request.getfixturevalue("postgres_url")
    except pytest.skip.Exception:
        return f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    marked = make_url(url).set(password=MARKERS["postgres password"])
    return marked.render_as_string(hide_password=False)


def closed_port() -> int:
    return free_port()  # nothing listens there


def base_env(bot_env: dict[str, str], database_url: str, web_port: int) -> dict[str, str]:
    env = {key: value for key, value in bot_env.items() if key not in SECRET_ENV}
    env.update(
        {
            "TELEGRAM_BOT_TOKEN": MARKERS["telegram token"],
            "DISCORD_BOT_TOKEN": MARKERS["discord token"],
            "TELEGRAM_WEBHOOK_SECRET": MARKERS["webhook secret"],
            "AIGC_BOT_TEXT_API_KEY": MARKERS["text api key"],
            "AIGC_BOT_OPERATOR_TOKENS": f"alice:{MARKERS['operator token']}",
            "AIGC_BOT__STORAGE__URL": database_url,
            "AIGC_BOT__BOT__LOG_LEVEL": "DEBUG",
            "AIGC_BOT__BOT__SHUTDOWN_GRACE_S": "2",
            "AIGC_BOT__WEB__PORT": str(web_port),
            "AIGC_BOT__WEB__MAX_BODY_BYTES": "4096",
            # the remote engine is down: every message fails (after one quick retry)
            "AIGC_BOT__TEXT__ENGINE": "remote",
            "AIGC_BOT__TEXT__REMOTE_URL": f"http://127.0.0.1:{closed_port()}/v1",
            "AIGC_BOT__TEXT__REMOTE_RETRIES": "1",
            "AIGC_BOT__TEXT__REMOTE_BACKOFF_S": "0.05",
            "AIGC_BOT__TEXT__REQUEST_TIMEOUT_S": "3",
            "AIGC_BOT__TELEGRAM__ENABLED": "true",
            "AIGC_BOT__DISCORD__ENABLED": "true",
        }
    )
    return env


SECRET_ENV = {
    "TELEGRAM_BOT_TOKEN",
    "DISCORD_BOT_TOKEN",
    "TELEGRAM_WEBHOOK_SECRET",
    "AIGC_BOT_TEXT_API_KEY",
    "AIGC_BOT_OPERATOR_TOKENS",
}


def telegram_at(url: str) -> dict[str, str]:
    return {"AIGC_BOT__TELEGRAM__BASE_URL": url}


def discord_at(api_base: str, gateway: str) -> dict[str, str]:
    return {"AIGC_BOT__DISCORD__API_BASE_URL": api_base, "AIGC_BOT__DISCORD__GATEWAY_URL": gateway}


async def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """`aigc-bot ARGS`: its exit status, stdout and stderr as one text."""
    process = await asyncio.create_subprocess_exec(
        AIGC_BOT,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return (
        f"exit {process.returncode}\n{out.decode(errors='replace')}\n{err.decode(errors='replace')}"
    )


async def exercise_web(url: str, gathered: GATHERED, tag: str) -> str:
    """Requests that fail every way the API can fail; every answer is kept.
    Returns the web user id of the session it made."""

    async def keep(name: str, response: aiohttp.ClientResponse) -> Any:
        body = await response.text()
        gathered[f"{tag} {name} ({response.status})"] = f"{dict(response.headers)}\n{body}"
        return response.status, body

    async with aiohttp.ClientSession(base_url=url) as http:
        async with http.post("/api/sessions") as response:
            status, body = await keep("POST /api/sessions", response)
            assert status == 201, body
            session = json.loads(body)
        auth = {"Authorization": f"Bearer {session['session']}"}
        async with http.post("/api/messages", json={"text": "hello?"}, headers=auth) as response:
            status, body = await keep("message, engine down", response)
            assert status == 503, body
        sse = {**auth, "Accept": "text/event-stream"}
        async with http.post("/api/messages", json={"text": "still?"}, headers=sse) as response:
            await keep("message, engine down (SSE)", response)
        async with http.post("/api/messages", data=b"{nope", headers=auth) as response:
            await keep("bad JSON", response)
        async with http.post("/api/messages", data=b"x" * 10_000, headers=auth) as response:
            await keep("body too large", response)
        # a body in a charset nobody knows (it once made a 500 and a traceback)
        odd = {**auth, "Content-Type": "application/json; charset=nonsense"}
        async with http.post("/api/messages", data=b'{"text": "x"}', headers=odd) as response:
            await keep("unknown charset", response)
        for token in (MARKERS["operator token"], MARKERS["telegram token"], "wrong"):
            bad = {"Authorization": f"Bearer {token}"}
            async with http.post("/api/messages", json={"text": "hi"}, headers=bad) as response:
                status, body = await keep(f"message as {token[:6]}", response)
                assert status == 401, body
            async with http.get("/api/operator/conversations", headers=bad) as response:
                await keep(f"operator list as {token[:6]}", response)
        async with http.get("/api/nothing-here") as response:
            await keep("404", response)
        async with http.get("/healthz") as response:
            await keep("healthz", response)
        async with http.get("/metrics") as response:
            status, body = await keep("metrics", response)
            assert status == 200
        return str(session["user_id"])


async def web_answers(url: str) -> bool:
    """/healthz answers at all (503 is fine: a channel that is down says so there)."""
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/healthz", timeout=aiohttp.ClientTimeout(2)) as response:
                return response.status in (200, 503)
    except (aiohttp.ClientError, TimeoutError):
        return False


async def start(bot: BotProcess, env: dict[str, str]) -> None:
    bot.env = env
    bot.web_port = None  # /healthz is 503 while a platform is down: wait for any answer
    await bot.start()
    bot.web_port = int(env["AIGC_BOT__WEB__PORT"])

    async def up() -> bool:
        assert bot.process is not None
        if bot.process.returncode is not None:
            raise AssertionError(f"aigc-bot run exited {bot.process.returncode}:\n{bot.tail()}")
        return await web_answers(bot.url)

    await eventually(up, within=120, every=0.1)


def this_run(bot: BotProcess) -> str:
    return bot.tail(1_000_000).split(f"===== start {bot.starts} =====")[-1]


async def test_no_secret_reaches_any_output(
    bot_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    gathered: GATHERED = {}
    web_port = free_port()
    env = base_env(bot_env, database_url, web_port)
    rejecting_telegram = FakeBotApi("4242424242:another-token")
    telegram = FakeBotApi(MARKERS["telegram token"])
    rejecting_discord = FakeDiscord(token="another-discord-token")
    for fake in (rejecting_telegram, telegram):
        await fake.start()
    await rejecting_discord.start()
    unreachable_telegram = telegram_at(f"http://127.0.0.1:{closed_port()}/bot")
    nowhere = closed_port()
    unreachable_discord = discord_at(
        f"http://127.0.0.1:{nowhere}/api/v10", f"ws://127.0.0.1:{nowhere}"
    )
    rejected_discord = discord_at(rejecting_discord.api_base, rejecting_discord.gateway_url)
    log = tmp_path / "bot.log"
    bot = BotProcess(env, tmp_path, log, web_port)
    try:
        # -- run 1: neither Telegram nor Discord can be reached -------------------------
        await start(bot, {**env, **unreachable_telegram, **unreachable_discord})
        web_user = await exercise_web(bot.url, gathered, "run 1")
        # python-telegram-bot retries getMe at DEBUG (its URLs hold the token), and
        # Discord's reconnects are logged with their errors
        await eventually(lambda: this_run(bot).count("endpoint `getMe`") >= 2, within=30)
        await eventually(lambda: "cannot reach Discord" in this_run(bot), within=30)
        # SIGTERM would be honoured only once Discord's 60-s connect wait is over
        # (reported separately); the log so far is what this run is for.
        await bot.kill()

        # -- run 2: both platforms reject their tokens ------------------------------------
        await start(bot, {**env, **telegram_at(rejecting_telegram.base_url), **rejected_discord})
        await eventually(lambda: "rejected the token" in this_run(bot), within=30)
        await eventually(lambda: "DISCORD_BOT_TOKEN was rejected" in this_run(bot), within=30)
        await exercise_web(bot.url, gathered, "run 2")
        assert await bot.terminate() == 0, bot.tail()

        # -- run 3: Telegram in webhook mode with the secret; Discord off --------------------
        hook_port = free_port()
        await start(
            bot,
            {
                **env,
                **telegram_at(telegram.base_url),
                "AIGC_BOT__DISCORD__ENABLED": "false",
                "AIGC_BOT__TELEGRAM__MODE": "webhook",
                "AIGC_BOT__TELEGRAM__WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/tg-hook",
                "AIGC_BOT__TELEGRAM__WEBHOOK_LISTEN": "127.0.0.1",
                "AIGC_BOT__TELEGRAM__WEBHOOK_PORT": str(hook_port),
            },
        )
        await telegram.wait_until(lambda: bool(telegram.webhook_url), within=30)
        assert telegram.webhook_secret == MARKERS["webhook secret"]
        telegram.private_message(5151, "hello from telegram")
        await telegram.wait_until(lambda: bool(telegram.texts(5151)), within=30)
        async with aiohttp.ClientSession() as http:
            update = {"update_id": 99, "message": {"message_id": 1}}
            for secret in ("wrong", ""):
                headers = {"X-Telegram-Bot-Api-Secret-Token": secret}
                async with http.post(telegram.webhook_url, json=update, headers=headers) as r:
                    gathered[f"run 3 webhook, secret {secret!r} ({r.status})"] = await r.text()
                    assert r.status == 403
        await exercise_web(bot.url, gathered, "run 3")
        assert await bot.terminate() == 0, bot.tail()
        gathered["process logs"] = log.read_text(errors="replace")
        # what Telegram users were sent (setWebhook carries the secret to Telegram, as it must)
        gathered["messages sent on Telegram"] = json.dumps(
            [call.params for call in telegram.calls if call.method.startswith("send")]
        )

        # -- doctor in each situation, export afterwards ---------------------------------
        situations = {
            "both rejected": {**telegram_at(rejecting_telegram.base_url), **rejected_discord},
            "telegram ok": {**telegram_at(telegram.base_url), **rejected_discord},
            "both unreachable": {**unreachable_telegram, **unreachable_discord},
        }
        for name, where in situations.items():
            gathered[f"doctor, {name}"] = await run_cli(["doctor"], {**env, **where}, tmp_path)
        for platform, user in (("web", web_user), ("telegram", "5151")):
            output = await run_cli(
                ["export", "--platform", platform, "--user", user], env, tmp_path
            )
            assert output.startswith("exit 0"), output
            assert "hello" in output, output
            gathered[f"export {platform}"] = output
    finally:
        if bot.process is not None and bot.process.returncode is None:
            await bot.kill()
        for fake in (rejecting_telegram, telegram):
            await fake.close()
        await rejecting_discord.close()

    logs = gathered["process logs"]
    assert "DEBUG" in logs  # the log really was at DEBUG
    assert "/bot[REDACTED]" in logs  # and PTB did log a Bot API URL, redacted
    assert "telegram" in gathered["doctor, both rejected"].lower()
    markers = dict(MARKERS)
    if not database_url.startswith("postgresql"):
        del markers["postgres password"]  # no PostgreSQL here: SQLite has no password
    hits = [
        f"{what} in {where}"
        for where, text in gathered.items()
        for what, marker in markers.items()
        if marker in text
    ]
    assert hits == [], "\n".join(hits)
