"""Handoff across two real `aigc-bot run` processes on one PostgreSQL.

An operator connected to one process sees the conversations and events of a
visitor served by the other (PostgreSQL LISTEN/NOTIFY carries them), a reply
posted to one reaches the visitor whose `GET /api/events` stream is open on
the other, and two operators claiming at once, one on each process, get one
200 and one 409.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text()[-chars:]


@contextlib.asynccontextmanager
async def bot_process(env: dict[str, str], port: int, log: Path) -> AsyncIterator[str]:
    """One `aigc-bot run` on `port`; its base URL once healthy."""
    command = [str(Path(sys.executable).parent / "aigc-bot"), "run"]
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
            winner, token = ("anna", ANNA) if status_a == 200 else ("ben", BEN)
            assert body_a["conversation"]["operator"] == winner
            assert body_b["conversation"]["operator"] == winner

            # answers posted to either process reach the visitor, whose stream is on one
            for base in (two, one):
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
