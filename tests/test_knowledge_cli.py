"""`aigc-bot faq check | eval | unanswered`, in-process through `bot.cli.main`.

`faq eval` runs the real shipped embedding model (about two seconds to load).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.cli import main
from bot.knowledge.cli import parse_since
from storage import Store

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    faq = REPO / "examples" / "faq.toml"
    path.write_text(
        f'[bot]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path / "bot.db"}"\n'
        f'[knowledge]\nfaq = "{faq}"\n'
    )
    return path


def test_check_accepts_the_example_and_names_the_problem_in_a_bad_file(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config_file), "faq", "check"]) == 0
    assert "faq.toml: ok, 27 entries" in capsys.readouterr().out

    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[faq]]\nid = "a"\nquestions = ["q"]\nanswer = "x"\n'
        '[[faq]]\nid = "returns"\nquestions = ["r"]\nanswer = ""\n'
    )
    assert main(["--config", str(config_file), "faq", "check", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f'aigc-bot: {bad}: entry 2 (id "returns"): answer is empty'


def test_eval_counts_right_wrong_and_abstained_answers(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = tmp_path / "q.jsonl"
    rows = [
        ("How do I return an item?", "returns"),
        ("Where is my order?", "order_status"),
        ("I forgot my password", "password_reset"),
        ("How do I cancel my order?", "refunds"),  # labelled wrong on purpose: a false answer
        ("What's the capital of Peru?", None),
        ("tell me a joke", None),
    ]
    questions.write_text("".join(json.dumps({"text": t, "faq": f}) + "\n" for t, f in rows))
    chart = tmp_path / "sweep.png"
    argv = ["--config", str(config_file), "faq", "eval", "--questions", str(questions)]
    assert main([*argv, "--json", "--plot", str(chart)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 6 and result["in_scope"] == 4
    assert result["accuracy"] == 0.75  # 3 of the 4 in-scope questions
    assert result["false_answer_rate"] == round(1 / 6, 4)
    assert result["abstain_rate"] == round(2 / 6, 4)
    assert result["answer_threshold"] == 0.65
    assert {"accuracy", "false_answer_rate", "abstain_rate"} <= set(result["baseline"])
    assert len(result["sweep"]) == 19
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "accuracy           0.750" in table
    assert "0.65" in table and "<- configured" in table


def test_eval_reports_a_bad_question_file_in_one_line(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"text": "hello", "faq": "nope"}\n')
    argv = ["--config", str(config_file), "faq", "eval", "--questions", str(questions)]
    assert main(argv) == 1
    assert "q.jsonl: line 1: faq 'nope' is not an entry" in capsys.readouterr().err


def test_unanswered_lists_the_most_frequent_first(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def record() -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
        try:
            for text, times in (("Do you gift wrap?", 1), ("do you  GIFT wrap?", 1), ("hi", 1)):
                for _ in range(times):
                    await store.unanswered.record(
                        platform="web",
                        chat_id="c",
                        user_id="u",
                        text=text,
                        best_id="gift_cards",
                        best_score=0.21,
                    )
            await store.unanswered.record(platform="web", chat_id="c", user_id="u", text="bye")
        finally:
            await store.close()

    asyncio.run(record())
    assert main(["--config", str(config_file), "faq", "unanswered"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["count", "last", "asked"]
    assert lines[1].split()[0] == "2" and "gift_cards (0.21)" in lines[1]
    assert lines[1].endswith("wrap?")
    assert len(lines) == 4

    assert main(["--config", str(config_file), "faq", "unanswered", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["count"] == 2 and first["best_id"] == "gift_cards"

    assert main(["--config", str(config_file), "faq", "unanswered", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.startswith("no unanswered questions since 2999-01-01")
    assert main(["--config", str(config_file), "faq", "unanswered", "--since", "yesterday"]) == 1
    assert "expected YYYY-MM-DD or Nd" in capsys.readouterr().err


def test_since_takes_a_date_or_a_number_of_days() -> None:
    now = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
    assert parse_since("7d", now) == datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
    assert parse_since("2025-03-01", now) == datetime(2025, 3, 1, tzinfo=UTC)
    assert parse_since(None, now) is None


async def test_measure_overhead_reports_latencies(tmp_path: Path) -> None:
    from bot.config import Config
    from bot.knowledge.bench import measure_overhead, synthetic_faq
    from bot.knowledge.faq import parse_faq

    assert len(parse_faq(synthetic_faq(100).encode(), Path("x.toml")).entries) == 100
    result = await measure_overhead(Config(), entries=6, users=3, rounds=2)
    assert result["entries"] == 6 and result["users"] == 3
    for key in ("alone_p50_ms", "alone_p95_ms", "batched_p50_ms", "batched_p95_ms"):
        assert result[key] > 0
    assert result["alone_p50_ms"] <= result["alone_p95_ms"]
