"""Handoff across two real `aigc-bot run` processes on one PostgreSQL.

An operator connected to one process sees the conversations and events of a
visitor served by the other (PostgreSQL LISTEN/NOTIFY carries them), a reply
posted to one reaches the visitor whose `GET /api/events` stream is open on
the other, and two operators claiming at once, one on each process, get one
200 and one 409.

Until bot/app.py builds the handoff service itself, each process is this
file run as a script: `serve` with the handoff wired the way bot/app.py
will (see `handoff_bot` in test_handoff_e2e.py). Once it does, the test runs
`aigc-bot run` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from support.eventually import eventually
from support.net import free_port
from test_handoff_e2e import (
    ANNA,
    BEN,
    OPERATOR_TOKENS,
    call,
    event_stream,
    new_visitor,
    say,
)

import bot.app


def app_wires_handoff() -> bool:
    return "HandoffService" in inspect.getsource(bot.app)


HERE = Path(__file__).resolve()


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text()[-chars:]


@contextlib.asynccontextmanager
async def bot_process(env: dict[str, str], port: int, log: Path) -> AsyncIterator[str]:
    """One `aigc-bot run` (or the stand-in launcher) on `port`; its base URL once healthy."""
    if app_wires_handoff():
        command = [str(Path(sys.executable).parent / "aigc-bot"), "run"]
    else:
        command = [sys.executable, str(HERE), "serve"]
    env = {**env, "AIGC_BOT__WEB__PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=log.parent, env=env, stdout=output, stderr=output
        )
        try:
            async with aiohttp.ClientSession() as http:

                async def healthy() -> bool:
                    if process.returncode is not None:
                        raise AssertionError(f"the bot exited: {tail(log)}")
                    try:
                        async with http.get(url + "/healthz") as response:
                            return response.status == 200
                    except aiohttp.ClientError:
                        return False

                await eventually(healthy, within=120, every=0.1)
            yield url
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(process.wait(), 60)
    assert code == 0, tail(log)


async def test_two_processes_share_conversations_events_and_replies(
    postgres_url: str, bot_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **bot_env,
        "AIGC_BOT__STORAGE__URL": postgres_url,
        "AIGC_BOT__TEXT__GREEDY": "true",
        "AIGC_BOT_OPERATOR_TOKENS": OPERATOR_TOKENS,
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        bot_process(env, free_port(), tmp_path / "a" / "run.log") as one,
        bot_process(env, free_port(), tmp_path / "b" / "run.log") as two,
        aiohttp.ClientSession() as http,
    ):
        visitor = await new_visitor(http, two)
        async with (
            event_stream(
                http, one + "/api/operator/events", ANNA, lambda n, d: n == "ready"
            ) as ops,
            event_stream(http, one + "/api/events", visitor, lambda n, d: n == ":") as pushed,
        ):
            # the visitor talks to process two; the operator on process one sees it all
            [told] = await say(http, two, visitor, "please, a real person")
            assert told["text"].startswith("A person will answer here soon")
            _, event = await ops.wait_for(
                lambda n, d: n == "conversation" and d["conversation"]["state"] == "waiting"
            )
            conversation = event["conversation"]["id"]
            status, listing = await call(
                http, "GET", one + "/api/operator/conversations?state=waiting", ANNA
            )
            assert [c["id"] for c in listing["conversations"]] == [conversation]
            assert await say(http, two, visitor, "hello? anyone?") == []
            await ops.wait_for(
                lambda n, d: n == "message" and d["message"]["text"] == "hello? anyone?"
            )

            # two operators claim at once, one on each process: one wins
            path = f"/api/operator/conversations/{conversation}/claim"
            (status_a, body_a), (status_b, body_b) = await asyncio.gather(
                call(http, "POST", one + path, ANNA), call(http, "POST", two + path, BEN)
            )
            assert sorted([status_a, status_b]) == [200, 409], (body_a, body_b)
            winner, url, token = ("anna", one, ANNA) if status_a == 200 else ("ben", two, BEN)
            other = two if url == one else one
            assert body_a["conversation"]["operator"] == winner
            assert body_b["conversation"]["operator"] == winner

            # the winner answers through the *other* process than the visitor's stream
            # is on... and through the same one: both reach the visitor
            for base in (two, other):
                text = f"Hello from {winner} via {base[-5:]}"
                status, body = await call(
                    http, "POST", f"{base}/api/operator/conversations/{conversation}/messages",
                    token, json={"text": text},
                )  # fmt: skip
                assert status == 200, body
                _, push = await pushed.wait_for(
                    lambda n, d, text=text: n == "message" and d["text"] == text
                )
                assert push["role"] == "operator" and push["author"] == winner
    for name in ("a", "b"):
        output = tail(tmp_path / name / "run.log", chars=10**7)
        assert "Traceback" not in output, output[-3000:]
        assert ANNA not in output and BEN not in output  # operator tokens never logged


# -- the stand-in for `aigc-bot run` until bot/app.py wires handoff --------------------------


async def _serve() -> None:
    from test_handoff_e2e import handoff_bot

    from bot.config import load_config
    from bot.logging_setup import setup_logging

    config = load_config(None)
    setup_logging("INFO")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with handoff_bot(config) as running:
        assert running.app.manager is not None
        await stop.wait()
        await running.app.manager.close()


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    asyncio.run(_serve())
