"""`aigc-bot audit`: the audit log on the command line (in process, through
bot.cli.main, on a SQLite database the test fills)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.cli import main
from storage import Store


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"

    async def fill() -> None:
        store = await Store.open(url)
        try:
            records = store.governance
            await records.record(
                "ban", actor="telegram:1", platform="telegram", user_id="7", detail="spam"
            )
            await records.record(
                "moderation",
                actor="bot",
                platform="web",
                chat_id="w1",
                user_id="w1",
                detail='input: term "free crypto"',
            )
            await records.record("mute", actor="discord:2", platform="discord", chat_id="55")
        finally:
            await store.close()

    asyncio.run(fill())
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n')
    return path


def test_audit_prints_the_log_oldest_first(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config_file), "audit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["at", "(UTC)", "kind", "by", "about", "detail"]
    assert [line.split()[2] for line in lines[1:]] == ["ban", "moderation", "mute"]
    assert "telegram user 7" in lines[1] and lines[1].endswith("spam")
    assert "web chat w1 user w1" in lines[2] and lines[2].endswith('input: term "free crypto"')
    assert "discord chat 55" in lines[3]


def test_audit_json_kind_since_and_limit(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ["--config", str(config_file)]
    assert main([*config, "audit", "--json", "--since", "1d"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [entry["kind"] for entry in entries] == ["ban", "moderation", "mute"]
    assert set(entries[0]) == {
        "id", "at", "kind", "actor", "platform", "chat_id", "user_id", "detail"
    }  # fmt: skip
    assert entries[0]["at"].endswith("Z") and entries[0]["actor"] == "telegram:1"

    assert main([*config, "audit", "--json", "--kind", "moderation"]) == 0
    [only] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert only["detail"] == 'input: term "free crypto"'

    assert main([*config, "audit", "--json", "--limit", "1"]) == 0
    [newest] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert newest["kind"] == "mute"

    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    assert main([*config, "audit", "--since", tomorrow]) == 0
    assert capsys.readouterr().out.startswith("no audit entries since ")


def test_a_bad_since_is_one_line_on_stderr(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config_file), "audit", "--since", "last week"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("aigc-bot: --since: ") and captured.err.count("\n") == 1
