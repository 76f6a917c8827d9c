"""`aigc-bot bench --peers` on the tiny model: every engine gets the same work
(the same users' messages, every reply the same number of tokens), a missing
optional peer is skipped with a note, and the dynamic batcher in front of a
peer takes whatever is waiting. Behaviour only: no timing is asserted."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bot.bench import compare, peers
from bot.bench.compare import ratios, run_peers
from bot.bench.peer_report import format_peers, write_peers_plot
from bot.bench.peer_run import OURS_CT2, OURS_HYBRID
from bot.bench.peers import PeerServer
from bot.bench.plan import Plan
from bot.cli import main
from bot.config import Config, TextSection
from bot.engine_settings import resolved_engine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan(model: Path) -> Plan:
    return Plan.quick(users=(1, 3), turns=3, new_tokens=5, model=str(model), ramp_s=0.01)


def _config(tmp_path: Path) -> Config:
    return Config.model_validate(
        {
            "bot": {"data_dir": str(tmp_path / "data")},
            "draw": {"enabled": False},
            "text": {"device": "cpu"},
        }
    )


def test_every_engine_gets_the_same_messages_and_token_counts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tiny_model_dir)
    assert plan.threads is None  # each engine's own default, as the bot gives it
    opened: list[int] = []  # every CTranslate2 generator's threads: the peers' and ours
    if peers.ctranslate2_missing() is None:
        import ctranslate2

        real = ctranslate2.Generator

        def generator(*args: Any, **kwargs: Any) -> Any:
            opened.append(kwargs["intra_threads"])
            return real(*args, **kwargs)

        monkeypatch.setattr(ctranslate2, "Generator", generator)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # a small machine: one thread each
    result = asyncio.run(run_peers(_config(tmp_path), plan, memory=False))
    assert result["device"]["ctranslate2_threads"] == 1
    if peers.ctranslate2_missing() is None:
        assert opened and set(opened) == {1}

    runs = result["runs"]
    engines = {run["engine"] for run in runs}
    assert {"ours (bot)", "ours (engine)", "transformers generate"} <= engines
    if peers.ctranslate2_missing() is None:
        assert {"CTranslate2 float32", "CTranslate2 int8", "ours (bot, ctranslate2)"} <= engines
        assert all("ours (bot, ctranslate2)" in entry for entry in result["ratios"])
    for users in plan.users:
        for pattern in ("lockstep", "closed-loop"):
            group = [r for r in runs if r["users"] == users and r["pattern"] == pattern]
            assert {r["engine"] for r in group} == engines
            first = group[0]["messages"]
            assert len(first) == users and all(len(m) == plan.turns for m in first)
            for run in group:
                assert run["errors"] == 0, run.get("first_error")
                assert run["messages"] == first  # the same users sent the same messages
                assert run["reply_tokens"] == [[plan.new_tokens] * plan.turns] * users
                assert run["tokens"] == users * plan.turns * plan.new_tokens
            # prompts: the user's messages and the engine's own earlier replies,
            # fitted to the same budget
            bot_path = ("ours (bot)", OURS_CT2, OURS_HYBRID)  # prompts from the database
            assert all(r["prompt_tokens"] > 0 for r in group if r["engine"] not in bot_path)
    assert {(r["users"], r["pattern"]) for r in result["ratios"]} == {
        (u, p) for u in plan.users for p in ("lockstep", "closed-loop")
    }
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    # the targets are read on the bot with the engine text.engine = "auto" gives here
    from bot.engine_settings import HYBRID, resolved_engine

    auto = resolved_engine(_config(tmp_path).text)
    default = {"ctranslate2": OURS_CT2, HYBRID: OURS_HYBRID}.get(auto, "ours (bot)")
    assert (OURS_HYBRID in engines) == (auto == HYBRID)  # run only where "auto" picks it
    for run in result["runs"]:  # both engines: how many batches each answered
        routed = run.get("engine_batches")
        assert (routed is not None) == (run["engine"] == OURS_HYBRID)
        if routed is not None:
            assert set(routed) == {"local", "ctranslate2"} and sum(routed.values()) >= 1
    assert result["default_engine"] == default
    assert all(t["name"].startswith(default) for t in result["targets"][:2])
    text = format_peers(result)
    assert "transformers generate" in text and "targets" in text
    plot = write_peers_plot(result, tmp_path / "peers.png")
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_a_missing_optional_peer_is_skipped_with_a_note(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    note = "ctranslate2 is not installed (pip install 'aigc-bot[ctranslate2]')"
    monkeypatch.setattr(peers, "ctranslate2_missing", lambda: note)
    plan = Plan.quick(users=(1,), turns=1, new_tokens=3, model=str(tiny_model_dir))
    result = asyncio.run(run_peers(_config(tmp_path), plan, memory=False))

    assert result["skipped"] == [
        {"engine": "CTranslate2 float32", "note": note},
        {"engine": "CTranslate2 int8", "note": note},
    ]
    assert not any("CTranslate2" in run["engine"].title() for run in result["runs"])
    assert result["default_engine"] == "ours (bot)"
    assert f"skipped  CTranslate2 int8: {note}" in format_peers(result)


def test_the_command_prints_json_with_peers_and_memory(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[draw]\nenabled = false\n[text]\nkv_cache_mb = 64\n", encoding="utf-8")
    argv = ["--config", str(config), "bench", "--peers", "--quick", "--json"]
    argv += ["--model", str(tiny_model_dir), "--users", "2", "--turns", "2"]
    argv += ["--new-tokens", "3", "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    memory = result["memory"]
    assert "error" not in memory, memory
    assert memory["users"] == 2 and memory["errors"] == 0
    # the bot as configured: "auto" is what this machine serves with
    assert memory["engine"] == resolved_engine(TextSection(kv_cache_mb=64))
    assert 0 < memory["kv_bytes"] <= memory["kv_budget_bytes"] == 64 * 2**20
    assert memory["peak_rss_bytes"] > memory["kv_bytes"]
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


class _GatedPeer:
    """Blocks its first batch until released, so the next requests pile up."""

    name = "gated"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def generate(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        self.batches.append(len(prompts))
        self.entered.set()
        if len(self.batches) == 1:
            self.release.wait(30)
        return [[*prompt, 0] for prompt in prompts]


async def test_the_dynamic_batcher_takes_whatever_is_waiting() -> None:
    peer = _GatedPeer()
    with PeerServer(peer, max_batch=8, batch_wait_ms=0) as server:
        first = asyncio.ensure_future(server.reply([1]))
        await asyncio.to_thread(peer.entered.wait, 30)
        waiting = [asyncio.ensure_future(server.reply([n])) for n in (2, 3, 4)]
        await asyncio.sleep(0)  # one turn of the loop: the three are queued
        assert server._queue.qsize() == 3
        peer.release.set()
        assert await first == [1, 0]
        assert [await w for w in waiting] == [[2, 0], [3, 0], [4, 0]]
    assert peer.batches == [1, 3]


def test_ratios_compare_ours_with_the_best_peer() -> None:
    rows: list[dict[str, Any]] = [
        {"users": 32, "pattern": "lockstep", "engine": "ours (bot)", "tokens_per_s": 300.0},
        {"users": 32, "pattern": "lockstep", "engine": "ours (engine)", "tokens_per_s": 400.0},
        {
            "users": 32,
            "pattern": "lockstep",
            "engine": "ours (bot, ctranslate2)",
            "tokens_per_s": 250.0,
        },
        {"users": 32, "pattern": "lockstep", "engine": "a", "tokens_per_s": 100.0},
        {"users": 32, "pattern": "lockstep", "engine": "b", "tokens_per_s": 200.0},
    ]
    [entry] = ratios(rows)
    assert entry["best_peer"] == "b" and entry["ours (bot)"] == 1.5
    assert entry["ours (engine)"] == 2.0
    assert entry["ours (bot, ctranslate2)"] == 1.25  # ours, not the best peer
    assert compare.OURS == ("ours (bot)", "ours (engine)", OURS_CT2, OURS_HYBRID)
