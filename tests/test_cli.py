"""The `aigc-bot` command line as a user runs it: a real subprocess each time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = [sys.executable, "-m", "bot.cli"]


def run(args: list[str], env: dict[str, str], stdin: str | None = None, timeout: float = 180):
    return subprocess.run(
        [*BIN, *args], input=stdin, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_chat_answers_each_line_and_exits_at_end_of_input(bot_env: dict[str, str]) -> None:
    result = run(["chat"], bot_env, stdin="hello\n/stats\n")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("bot> ")]
    assert len(lines) == 2
    assert lines[0] != "bot> " and "/stats" not in lines[0]
    assert lines[1].startswith("bot> Your usage") and "1 messages, 1 replies" in lines[1]


def test_export_and_forget(bot_env: dict[str, str]) -> None:
    run(["chat", "--user", "alice"], bot_env, stdin="I like cats\n")
    run(["chat", "--user", "bob"], bot_env, stdin="I like dogs\n")
    exported = run(["export", "--platform", "console", "--user", "alice"], bot_env)
    assert exported.returncode == 0, exported.stderr
    document = json.loads(exported.stdout)
    assert set(document) == {"platform", "user_id", "conversations"}
    assert document["platform"] == "console" and document["user_id"] == "alice"
    [conversation] = document["conversations"]
    assert conversation["chat_id"] == "console"
    assert [m["role"] for m in conversation["messages"]] == ["user", "bot"]
    assert conversation["messages"][0]["text"] == "I like cats"

    forgotten = run(["forget", "--platform", "console", "--user", "alice"], bot_env)
    assert forgotten.returncode == 0 and "deleted 2 messages" in forgotten.stdout
    after = json.loads(run(["export", "--platform", "console", "--user", "alice"], bot_env).stdout)
    assert after["conversations"] == []
    bob = json.loads(run(["export", "--platform", "console", "--user", "bob"], bot_env).stdout)
    assert bob["conversations"][0]["messages"][0]["text"] == "I like dogs"


def test_missing_model_is_one_line_saying_how_to_get_one(
    bot_env: dict[str, str], tmp_path: Path
) -> None:
    bot_env["AIGC_BOT__TEXT__MODEL"] = str(tmp_path / "models" / "chitchat-gpt2")
    for command in ("chat", "run"):
        result = run([command], bot_env, stdin="")
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert "text.model" in line and "aigc-bot train" in line


def test_doctor_reports_without_leaking_tokens(bot_env: dict[str, str]) -> None:
    bot_env["TELEGRAM_BOT_TOKEN"] = "123456:doctor-must-not-print-this"
    result = run(["doctor"], bot_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "database" in result.stdout and "text model" in result.stdout and "GPU" in result.stdout
    assert "$TELEGRAM_BOT_TOKEN set" in result.stdout
    assert "$DISCORD_BOT_TOKEN not set" in result.stdout
    assert "doctor-must-not-print-this" not in result.stdout + result.stderr


def test_doctor_fails_on_an_unreachable_database(bot_env: dict[str, str]) -> None:
    bot_env["AIGC_BOT__STORAGE__URL"] = "postgresql+asyncpg://nobody@127.0.0.1:1/none"
    result = run(["doctor"], bot_env)
    assert result.returncode == 1
    assert "FAIL] database" in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, json.loads(response.read())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_the_web_api_and_stops_cleanly(bot_env: dict[str, str], signum: int) -> None:
    port = _free_port()
    env = {
        **bot_env,
        "AIGC_BOT__WEB__PORT": str(port),
        "TELEGRAM_BOT_TOKEN": "",
        "DISCORD_BOT_TOKEN": "",
    }
    env.pop("AIGC_BOT__TELEGRAM__ENABLED")
    env.pop("AIGC_BOT__DISCORD__ENABLED")
    process = subprocess.Popen(
        [*BIN, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/healthz")
                break
            except OSError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "the web API never came up"
                time.sleep(0.2)
        assert status == 200 and body["status"] == "ok"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/sessions", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            token = json.loads(response.read())["session"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/messages",
            data=json.dumps({"text": "hello"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            replies = json.loads(response.read())["replies"]
        assert replies and replies[0]["type"] == "text" and replies[0]["text"]
        process.send_signal(signum)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "telegram" in output.lower() and "TELEGRAM_BOT_TOKEN" in output  # says why it is off
    assert os.path.exists(bot_env["AIGC_BOT__STORAGE__URL"].split("///", 1)[1])
