"""`aigc-bot bench` on the tiny model: it runs end to end and reports, batching
gives every user their own reply, and int8 leaves a working model. Behaviour
only: no timing is asserted."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.app import BotApp
from bot.bench.report import format_report
from bot.bench.workloads import converse
from bot.cli import main
from bot.config import Config
from bot.testing.tiny_models import sample_lines

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0 and math.isfinite(value)


def test_bench_runs_end_to_end_and_emits_json_and_a_png(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("", encoding="utf-8")
    plot = tmp_path / "plots" / "bench.png"
    argv = ["--config", str(config), "bench", "--model", str(tiny_model_dir)]
    argv += ["--users", "1,2", "--turns", "3", "--quick", "--json", "--plot", str(plot)]

    assert main(argv) == 0

    result = json.loads(capsys.readouterr().out)
    new_tokens = result["settings"]["new_tokens"]
    assert [row["users"] for row in result["users"]] == [1, 2]
    for row in result["users"]:
        for side in ("baseline", "ours"):
            run = row[side]
            assert run["errors"] == 0 and run["replies"] == row["users"] * 3
            assert run["tokens"] == run["replies"] * new_tokens  # EOS masked: equal lengths
            for key in ("tokens_per_s", "latency_p50_s", "latency_p95_s", "turn_ratio", "seconds"):
                assert _positive(run[key]), (side, key, run[key])
        assert _positive(row["speedup"])
        assert row["ours"]["mean_batch_size"] >= 1
    assert result["turn_latency"]["turns"] == 3
    assert _positive(result["turn_latency"]["ours"]) and _positive(
        result["turn_latency"]["baseline"]
    )
    overhead = result["overhead"]
    for phase in ("sequential", "concurrent"):
        assert overhead[phase]["messages"] > 0 and overhead[phase]["errors"] == 0
        for key in ("p50_ms", "p95_ms", "messages_per_s"):
            assert _positive(overhead[phase][key])
    int8 = result["int8"]
    assert _positive(int8["fp32"]["tokens_per_s"]) and _positive(int8["int8"]["tokens_per_s"])
    if int8["heldout"]["dialogues"]:
        assert _positive(int8["fp32"]["perplexity"]) and _positive(int8["int8"]["perplexity"])
    assert len(result["targets"]) == 4 and all(
        isinstance(t["met"], bool) for t in result["targets"]
    )
    assert result["model"]["path"] == str(tiny_model_dir) and result["device"]["type"] in (
        "cpu",
        "cuda",
    )
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert "targets" in format_report(result)


async def test_concurrent_users_get_their_own_replies(make_config: Callable[..., Config]) -> None:
    # a long batching window, so the users' messages are decoded together
    config = make_config(
        text={"greedy": True, "max_new_tokens": 8, "batch_wait_ms": 200},
        limits={"messages_per_minute": 0},
    )
    lines = sample_lines()
    scripts = [
        [lines[(user * 53 + turn * 17) % len(lines)] for turn in range(3)] for user in range(6)
    ]
    async with BotApp(config) as app:
        engine = app.engine
        assert app.manager is not None and app.store is not None and engine is not None
        await converse(app.manager, scripts, "u", lambda: None)
        assert max(engine.batch_sizes) > 1  # type: ignore[attr-defined]

        for user, script in enumerate(scripts):
            name = f"u-{user}"
            history = await app.store.conversations.active_history("bench", name, name)
            assert [m.role for m in history] == ["user", "bot"] * 3
            assert [m.text for m in history if m.role == "user"] == script
            # each stored reply is the one its own dialogue gets when decoded alone
            # (greedy, no cached prefix): nothing leaked between batch rows
            turns: list[str] = []
            for message in history:
                if message.role == "bot":
                    assert await engine.generate(turns) == message.text
                turns.append(message.text)


async def test_int8_quantization_leaves_a_working_model(make_config: Callable[..., Config]) -> None:
    from bot.engine_settings import local_engine_settings
    from bot.engines.linears import Int8Conv1D
    from bot.engines.text import LocalTextEngine

    config = make_config(
        text={"greedy": True, "quantize": "int8", "device": "cpu", "max_new_tokens": 12}
    )
    engine = LocalTextEngine(local_engine_settings(config.text))
    await engine.start()
    try:
        quantized = [m for m in engine.model.modules() if isinstance(m, Int8Conv1D)]
        assert len(quantized) == 4 * engine.model.config.n_layer
        reply = await engine.generate(
            ["I like pizza today.", "you love music every day!", "we watch cats a lot."]
        )
        assert reply  # the model said something
        assert reply.isprintable() and reply.strip() == reply and "\ufffd" not in reply
    finally:
        await engine.close()


def test_int8_keeps_held_out_perplexity_close(tiny_model_dir: Path) -> None:
    pytest.importorskip("bot.training.evaluate")
    from bot.bench.workloads import perplexity_of
    from bot.engines.linears import quantize_int8
    from bot.engines.loading import load_causal_lm
    from bot.engines.settings import ModelSource

    lines = sample_lines()
    dialogues = [lines[start : start + 6] for start in range(3, 300, 37)]
    source = ModelSource(str(tiny_model_dir), "cpu")
    fp32 = load_causal_lm(source)
    int8 = load_causal_lm(source)
    assert quantize_int8(int8[0]) > 0
    before, count = perplexity_of(*fp32, dialogues)
    after, count_after = perplexity_of(*int8, dialogues)
    assert count == count_after > 0
    assert math.isfinite(after) and abs(after / before - 1) < 0.1


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_the_parameter_count_survives_quantized_layers(tiny_model_dir: Path, kind: str) -> None:
    """The bench reports the model's size; a swapped layer keeps its weights in
    buffers, which must still count (it printed 1.1M for a 5.9M model)."""
    from transformers import GPT2LMHeadModel

    from bot.bench.setup import parameter_count
    from bot.engines.linears import quantize_linears

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    before = sum(p.numel() for p in model.parameters())
    assert parameter_count(model) == before
    assert quantize_linears(model, kind) > 0
    assert sum(p.numel() for p in model.parameters()) < before
    assert parameter_count(model) == before
