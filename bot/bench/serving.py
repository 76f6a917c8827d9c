"""The default `aigc-bot bench`: the serving path against one `model.generate`
per message, side by side, then manager + storage overhead and int8.

* baseline — a bot that keeps each user's history as text and, for every
  message, calls `model.generate` on the whole (budget-trimmed) history, one
  message at a time;
* ours — the real path: `ConversationManager` + `Store` on a temporary SQLite
  database + the local engine (continuous batching, prefix KV reuse), with N
  simulated users chatting at once.

Both generate exactly `--new-tokens` tokens per reply, with the same sampling
settings, so tokens/s compare fairly. See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bot.bench.plan import Plan
from bot.bench.setup import (
    Progress,
    bench_config,
    describe_device,
    describe_model,
    load_average,
    resolve_model,
    user_scripts,
)
from bot.config import Config


async def run_bench(base: Config, plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """Run every workload of `plan`; the results as a JSON-ready dict."""
    started = time.perf_counter()
    load_start = load_average()
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    with tempfile.TemporaryDirectory(prefix="aigc-bench-") as tmp:
        workdir = Path(tmp)
        model, chosen = await asyncio.to_thread(resolve_model, plan.model, base, workdir)
        wanted = max(max(plan.users), plan.overhead_users, plan.int8_users, plan.heldout_dialogues)
        from bot.bench.workloads import heldout_dialogues

        dialogues, source = await asyncio.to_thread(heldout_dialogues, model, wanted)
        scripts = user_scripts(dialogues, wanted, max(plan.turns, plan.overhead_turns))
        new_tokens = plan.new_tokens or base.text.max_new_tokens
        total = sum(2 * n * plan.turns for n in plan.users) + 2 * plan.turn_repeats * plan.turns
        total += (
            plan.overhead_users * plan.overhead_turns * 2 + 2 * plan.int8_users * plan.int8_turns
        )
        bar = Progress(progress, total)
        try:
            result = await _serving(base, plan, model, workdir, scripts, new_tokens, bar)
            result["model"]["chosen"] = chosen
            bar.phase("manager + storage")
            result["overhead"] = await _overhead(base, plan, model, workdir, scripts, bar)
            bar.phase("int8")
            heldout = dialogues[: plan.heldout_dialogues]
            result["int8"] = await _int8(
                base, plan, model, workdir, scripts, new_tokens, heldout, source, bar
            )
            if plan.knowledge_entries:
                from bot.knowledge.bench import measure_overhead

                bar.phase("knowledge base")
                result["knowledge"] = await measure_overhead(
                    base, entries=plan.knowledge_entries, users=plan.overhead_users
                )
        finally:
            bar.close()
    result["device"]["load_average"] = {"start": load_start, "end": load_average()}
    result["targets"] = _targets(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


async def _serving(
    base: Config,
    plan: Plan,
    model: str,
    workdir: Path,
    scripts: list[list[str]],
    new_tokens: int,
    bar: Progress,
) -> dict[str, Any]:
    """Baseline and ours for every user count, back to back on one loaded model."""
    from bot.app import BotApp
    from bot.bench.workloads import GenerateBot, baseline_converse, converse, mask_eos
    from bot.engines.loading import load_causal_lm
    from bot.engines.settings import ModelSource

    config = bench_config(
        base, model, workdir / "serving.db", max_new_tokens=new_tokens, min_new_tokens=new_tokens
    )
    async with BotApp(config) as app:
        engine: Any = app.engine
        manager: Any = app.manager
        eos = engine.tokenizer.eos_token_id
        source = ModelSource(config.text.model, config.text.device)
        model_b, tokenizer_b, device = await asyncio.to_thread(load_causal_lm, source)
        mask_eos(model_b, eos)
        baseline = GenerateBot(model_b, tokenizer_b, device, config.text, engine.prompt_budget)
        # warm-up, not timed: first calls pay for lazy initialisation
        await converse(manager, [["hello there"]], "warmup", lambda: None)
        await asyncio.to_thread(baseline.reply, ["hello there"], 4)

        rows = []
        for users in plan.users:
            decoder = engine.decoder
            steps_mark = (decoder.steps, decoder.step_rows, decoder.joined)
            engine.batch_sizes.clear()
            cache = engine.prefix_cache
            cache_mark = (
                (cache.hits, cache.misses, cache.reused_tokens) if cache is not None else (0, 0, 0)
            )
            tokens_mark = _generated(engine)
            bar.phase(f"ours, {users} user{'s' * (users > 1)}")
            ours = await converse(
                manager, [s[: plan.turns] for s in scripts[:users]], f"n{users}", bar.tick
            )
            ours.tokens = int(_generated(engine) - tokens_mark)
            bar.phase(f"baseline, {users} user{'s' * (users > 1)}")
            base_run = await baseline_converse(
                baseline, [s[: plan.turns] for s in scripts[:users]], bar.tick
            )
            steps = decoder.steps - steps_mark[0]
            ours_row: dict[str, Any] = ours.summary()
            # rows per decode step: what batching achieved, latecomers included
            ours_row["mean_batch_size"] = (
                round((decoder.step_rows - steps_mark[1]) / steps, 2) if steps else 0
            )
            ours_row["max_batch_size"] = max(engine.batch_sizes, default=0)
            ours_row["joined_running_batch"] = decoder.joined - steps_mark[2]
            if cache is not None:
                ours_row["prefix_hits"] = cache.hits - cache_mark[0]
                ours_row["prefix_misses"] = cache.misses - cache_mark[1]
                ours_row["prefix_reused_tokens"] = cache.reused_tokens - cache_mark[2]
            rows.append(
                {
                    "users": users,
                    "baseline": base_run.summary(),
                    "ours": ours_row,
                    "speedup": round(ours.tokens_per_s / base_run.tokens_per_s, 2)
                    if base_run.tokens_per_s
                    else None,
                }
            )
        return {
            "model": describe_model(model, engine.model, engine.tokenizer),
            "device": describe_device(device, engine.model),
            "settings": _settings(config, plan, new_tokens, engine.prompt_budget),
            "users": rows,
            "turn_latency": await _turn_latency(manager, baseline, scripts, plan, bar),
        }


async def _turn_latency(
    manager: Any, baseline: Any, scripts: list[list[str]], plan: Plan, bar: Progress
) -> dict[str, Any]:
    """One user alone, `turns` messages, repeated with other users' messages for
    ours and the baseline in turn; the median latency of every turn."""
    from statistics import median

    from bot.bench.workloads import baseline_converse, converse

    ours, base = [], []
    bar.phase("turn latency")
    for repeat in range(plan.turn_repeats):
        script = [scripts[repeat % len(scripts)][: plan.turns]]
        ours.append((await converse(manager, script, f"turns{repeat}", bar.tick)).latencies[0])
        base.append((await baseline_converse(baseline, script, bar.tick)).latencies[0])

    def per_turn(runs: list[list[float | None]]) -> list[float]:
        medians = []
        for turn in range(plan.turns):
            answered = [value for run in runs if (value := run[turn]) is not None]
            medians.append(round(median(answered), 4) if answered else float("nan"))
        return medians

    ours_turns, base_turns = per_turn(ours), per_turn(base)
    return {
        "users": 1,
        "turns": plan.turns,
        "repeats": plan.turn_repeats,
        "ours": round(ours_turns[-1] / ours_turns[0], 3),
        "baseline": round(base_turns[-1] / base_turns[0], 3),
        "ours_latency_s": ours_turns,
        "baseline_latency_s": base_turns,
    }


async def _overhead(
    base: Config, plan: Plan, model: str, workdir: Path, scripts: list[list[str]], bar: Progress
) -> dict[str, Any]:
    """The manager + storage cost of a message, with an engine that answers at once:
    first one message at a time, then `overhead_users` users at once."""
    from bot.app import BotApp
    from bot.bench.workloads import InstantEngine, converse, percentile

    config = bench_config(base, model, workdir / "overhead.db")
    users, turns = plan.overhead_users, plan.overhead_turns
    async with BotApp(config, engine=InstantEngine()) as app:
        sequential = [
            await converse(app.manager, [scripts[index][:turns]], f"seq{index}", bar.tick)
            for index in range(users)
        ]
        loaded = await converse(app.manager, [s[:turns] for s in scripts[:users]], "load", bar.tick)
    one_at_a_time = [value for run in sequential for value in run.answered()]
    at_once = loaded.answered()
    return {
        "engine": "instant",
        "storage": "sqlite",
        "sequential": {
            "messages": len(one_at_a_time),
            "errors": sum(len(run.errors) for run in sequential),
            "p50_ms": round(percentile(one_at_a_time, 50) * 1000, 3),
            "p95_ms": round(percentile(one_at_a_time, 95) * 1000, 3),
            "messages_per_s": round(len(one_at_a_time) / sum(one_at_a_time), 1),
        },
        "concurrent": {
            "users": users,
            "messages": len(at_once),
            "errors": len(loaded.errors),
            "p50_ms": round(percentile(at_once, 50) * 1000, 3),
            "p95_ms": round(percentile(at_once, 95) * 1000, 3),
            "messages_per_s": round(len(at_once) / loaded.seconds, 1),
            **({"first_error": loaded.errors[0]} if loaded.errors else {}),
        },
    }


async def _int8(
    base: Config,
    plan: Plan,
    model: str,
    workdir: Path,
    scripts: list[list[str]],
    new_tokens: int,
    heldout: list[list[str]],
    source: str,
    bar: Progress,
) -> dict[str, Any]:
    """fp32 against `text.quantize = "int8"` on the CPU, through the real path."""
    from bot.app import BotApp
    from bot.bench.workloads import converse, perplexity_of

    users, turns = plan.int8_users, plan.int8_turns
    out: dict[str, Any] = {"device": "cpu", "users": users, "turns": turns}
    for quantize, label in (("none", "fp32"), ("int8", "int8"), ("bf16", "bf16")):
        config = bench_config(
            base,
            model,
            workdir / f"{label}.db",
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            device="cpu",
            quantize=quantize,
        )
        async with BotApp(config) as app:
            engine: Any = app.engine
            await converse(app.manager, [["hello there"]], f"warm-{label}", lambda: None)
            mark = _generated(engine)
            run = await converse(app.manager, [s[:turns] for s in scripts[:users]], label, bar.tick)
            run.tokens = int(_generated(engine) - mark)
            row: dict[str, Any] = {
                "tokens_per_s": round(run.tokens_per_s, 2),
                "errors": len(run.errors),
            }
            if heldout:
                ppl, count = await asyncio.to_thread(
                    perplexity_of, engine.model, engine.tokenizer, engine.device, heldout
                )
                row["perplexity"] = round(ppl, 3)
                out["heldout"] = {"source": source, "dialogues": len(heldout), "tokens": count}
            out[label] = row
    out["speedup"] = round(out["int8"]["tokens_per_s"] / out["fp32"]["tokens_per_s"], 2)
    out["bf16_speedup"] = round(out["bf16"]["tokens_per_s"] / out["fp32"]["tokens_per_s"], 2)
    if heldout:
        change = out["int8"]["perplexity"] / out["fp32"]["perplexity"] - 1
        out["perplexity_change_pct"] = round(100 * change, 2)
    else:
        out["heldout"] = {"source": source, "dialogues": 0, "tokens": 0}
    return out


def _generated(engine: Any) -> int:
    """Tokens the engine has generated so far."""
    return int(engine.generated_tokens)


def _settings(config: Config, plan: Plan, new_tokens: int, budget: int) -> dict[str, Any]:
    text = config.text
    sampling: dict[str, Any] = {
        "greedy": text.greedy,
        "repetition_penalty": text.repetition_penalty,
    }
    if not text.greedy:
        sampling.update(temperature=text.temperature, top_k=text.top_k, top_p=text.top_p)
    return {
        "turns": plan.turns,
        "new_tokens": new_tokens,
        "forced_length": "every reply is new_tokens long (text.min_new_tokens for ours, "
        "an EOS-masking hook for the baseline)",
        "sampling": sampling,
        "max_batch_size": text.max_batch_size,
        "batch_wait_ms": text.batch_wait_ms,
        "kv_cache_mb": text.kv_cache_mb,
        "prompt_budget": budget,
    }


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    widest = result["users"][-1]
    overhead = result["overhead"]
    targets = [
        (f"ours/baseline tokens/s at {widest['users']} users", ">=", 6.0, widest["speedup"]),
        (
            f"turn {result['turn_latency']['turns']} / turn 1 latency (ours)",
            "<=",
            1.3,
            result["turn_latency"]["ours"],
        ),
        ("manager + storage overhead p95, ms", "<=", 2.0, overhead["sequential"]["p95_ms"]),
        (
            "messages/s with an instant engine",
            ">=",
            1000.0,
            overhead["concurrent"]["messages_per_s"],
        ),
    ]
    return [
        {
            "name": name,
            "target": f"{op} {goal:g}",
            "value": value,
            "met": value is not None and (value >= goal if op == ">=" else value <= goal),
        }
        for name, op, goal, value in targets
    ]
