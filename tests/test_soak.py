"""`aigc-bot bench --soak`, shortened: the command runs, every request is
answered, every history is its user's own, and the report has its figures.
The real soak (1,000 users, 10 minutes) is a command, not a test: docs/SOAK.md."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from support.process import AIGC_BOT

from bot.bench.soak import format_soak


def test_a_short_soak_reports_no_errors(tmp_path: Path) -> None:
    # the defaults (no config file in the working dir): the soak brings its own
    # database, engine and port
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIGC_BOT")}
    result = subprocess.run(
        [AIGC_BOT, "bench", "--soak", "--soak-minutes", "0.05", "--soak-users", "20", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["users"] == 20 and report["errors"] == 0, report
    assert report["server_errors"] == 0
    assert report["requests"]["messages"] >= 20  # every user sent at least one
    assert report["requests"]["sessions"] == report["requests"]["history_reads"] == 20
    assert report["histories"] == {
        "checked": 20,
        "isolated": 20,
        "unknown": 0,
        "foreign_messages": 0,
    }
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "max"}
    rss = report["rss_bytes"]
    assert rss["after_warmup"] and rss["end"] and rss["peak"] >= rss["end"] > 0
    assert report["messages_per_s"] > 0
    table = format_soak(report)
    for label in ("requests", "latency", "memory", "history", "machine"):
        assert label in table
    assert not list(tmp_path.iterdir()), "the soak left files behind"
