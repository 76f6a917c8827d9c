"""`aigc-bot bench --peers`: ours against the engines a user would pick instead.

In one process, on one model, for every user count and both arrival patterns
(`peer_run`), one engine right after the other:

* ours (bot) — the real path: manager + SQLite store + our engine;
* ours (bot, ctranslate2) — the same with `text.engine = "ctranslate2"`, and
  ours (bot, local + ctranslate2) with both, where "auto" picks them;
* ours (engine) — our engine alone, on the same harness as the peers;
* transformers `generate`, CTranslate2 float32 and int8 (`peers`), each
  behind a dynamic batcher.

Every engine gets the same users, messages, sampling settings and prompt
budget, and every reply is exactly `--new-tokens` long. Then the bot's peak
memory at the largest user count, in a fresh process (`memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from bot.bench import peers as peers_module
from bot.bench.peer_run import (
    CLOSED_LOOP,
    LOCKSTEP,
    OURS,
    OURS_CT2,
    OURS_HYBRID,
    PatternRun,
    engine_ask,
    peer_ask,
    run_bot,
    run_pattern,
)
from bot.bench.peers import Peer, PeerServer, Skipped, build_peers
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

PATTERNS = (LOCKSTEP, CLOSED_LOOP)


def workload(base: Config, plan: Plan, new_tokens: int) -> dict[str, Any]:
    """What every engine is asked to do (the JSON's `workload`)."""
    text = base.text
    return {
        "turns": plan.turns,
        "new_tokens": new_tokens,
        "forced_length": "EOS impossible before new_tokens: text.min_new_tokens (ours), "
        "min_new_tokens (transformers), min_length (CTranslate2)",
        "sampling": {
            "greedy": text.greedy,
            "temperature": text.temperature,
            "top_k": text.top_k,
            "top_p": text.top_p,
            "repetition_penalty": text.repetition_penalty,
        },
        "max_batch_size": text.max_batch_size,
        "batch_wait_ms": text.batch_wait_ms,
        "closed_loop_ramp_s": plan.ramp_s,
    }


async def run_peers(
    base: Config, plan: Plan, *, progress: bool = False, memory: bool = True
) -> dict[str, Any]:
    """Every engine in both patterns at every user count; a JSON-ready dict."""
    import torch

    from bot.app import BotApp
    from bot.bench.workloads import heldout_dialogues
    from bot.engines.ct2 import intra_threads
    from bot.engines.loading import load_causal_lm
    from bot.engines.settings import ModelSource

    started = time.perf_counter()
    load_start = load_average()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    # without --threads every engine gets what the bot would give it: PyTorch's
    # default, and CTranslate2's rule (`intra_threads`) for the peers and our bots alike
    ct2_threads = plan.threads or intra_threads(0)
    new_tokens = plan.new_tokens or base.text.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="aigc-peers-") as tmp:
        workdir = Path(tmp)
        model, chosen = await asyncio.to_thread(resolve_model, plan.model, base, workdir)
        dialogues, _ = await asyncio.to_thread(heldout_dialogues, model, max(plan.users))
        scripts = user_scripts(dialogues, max(plan.users), plan.turns)
        config = bench_config(
            base, model, workdir / "peers.db", max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
        source = ModelSource(config.text.model, config.text.device)
        hf_model, tokenizer, device = await asyncio.to_thread(load_causal_lm, source)
        sampling = _sampling(config)
        peers, skipped = await asyncio.to_thread(
            build_peers,
            model,
            hf_model,
            tokenizer,
            device,
            workdir,
            sampling=sampling,
            new_tokens=new_tokens,
            threads=ct2_threads,
        )
        with_ct2 = peers_module.ctranslate2_missing() is None
        default = _default_row(base, with_ct2)
        engines = 2 + (1 if with_ct2 else 0) + (default == OURS_HYBRID) + len(peers)
        bar = Progress(progress, engines * len(PATTERNS) * sum(plan.users) * plan.turns)
        try:
            async with contextlib.AsyncExitStack() as stack:
                app = await stack.enter_async_context(BotApp(config))

                async def bot_with(engine: str, folder: str) -> Any:
                    """The same bot with another `text.engine`, its own database and
                    the peers' threads (`--threads`, or each engine's default)."""
                    (workdir / folder).mkdir()
                    other = bench_config(
                        base,
                        model,
                        workdir / folder / "peers.db",
                        engine=engine,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        threads=plan.threads or 0,
                    )
                    return await stack.enter_async_context(BotApp(other))

                others = {OURS_CT2: await bot_with("ctranslate2", "ct2")} if with_ct2 else {}
                if default == OURS_HYBRID:  # "auto" here: both engines
                    hybrid = await bot_with("auto", "hybrid")
                    both = (getattr(hybrid.engine, name, None) for name in ("local", "small"))
                    if not all(both):  # one of its engines did not load: it serves as the other
                        note = "one of its engines did not load (see the log)"
                        skipped.append(Skipped(OURS_HYBRID, note))
                        default = "ours (bot)"
                    else:
                        others[OURS_HYBRID] = hybrid
                tuned: dict[str, int] = {}
                rows = await _all_runs(app, others, peers, tokenizer, scripts, plan, bar, tuned)
                engine: Any = app.engine
                described = {
                    "model": {**describe_model(model, hf_model, tokenizer), "chosen": chosen},
                    "device": {
                        **describe_device(device, hf_model),
                        "ctranslate2_threads": ct2_threads,
                        "linears": getattr(engine, "quantized", "none"),
                    },
                    "prompt_budget": engine.prompt_budget,
                }
                # the targets are read on what `text.engine` gives this machine
                turn_latency = await _turn_latency(others.get(default, app), scripts, plan, bar)
        finally:
            bar.close()
        measured: dict[str, Any] | None = None
        if memory:
            from bot.bench.memory import measure_memory

            probe = bench_config(  # the bot as configured: "auto" is this machine's default
                base,
                model,
                workdir / "memory.db",
                engine=base.text.engine,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                threads=plan.threads or 0,
            )
            users, turns = max(plan.users), min(plan.turns, 8)
            measured = await asyncio.to_thread(measure_memory, probe, scripts, users, turns)
    result: dict[str, Any] = {
        **described,
        "workload": workload(config, plan, new_tokens),
        "skipped": [{"engine": s.name, "note": s.note} for s in skipped],
        "peer_batching": {name: size or "one batch" for name, size in tuned.items()},
        "runs": rows,
        "turn_latency": turn_latency,
        "default_engine": default,
    }
    result["ratios"] = ratios(rows)
    if measured is not None:
        result["memory"] = measured
    result["device"]["load_average"] = {"start": load_start, "end": load_average()}
    result["targets"] = targets(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _sampling(config: Config) -> Any:
    from bot.engine_settings import sampling_settings

    return sampling_settings(config.text)


def _sample_prompts(tokenizer: Any, scripts: list[list[str]], budget: int) -> list[list[int]]:
    """Prompts shaped like a conversation's later turns (for tuning, not timed)."""
    from bot.engines.prompt import encode_dialogue

    filler = "that sounds nice, tell me more about it please"
    prompts = []
    for script in scripts:
        turns = [turn for text in script[:6] for turn in (text, filler)]
        prompts.append(encode_dialogue(tokenizer, turns[:-1], budget))
    return prompts


async def _all_runs(
    app: Any,
    others: dict[str, Any],
    peers: list[Peer],
    tokenizer: Any,
    scripts: list[list[str]],
    plan: Plan,
    bar: Progress,
    tuned: dict[str, int],
) -> list[dict[str, Any]]:
    engine, manager = app.engine, app.manager
    text = app.config.text
    # warm-up, not timed: first calls pay for lazy initialisation
    await engine.generate(["hello there"])
    for other in others.values():
        await other.engine.generate(["hello there"])
    for peer in peers:
        await asyncio.to_thread(peer.generate, [tokenizer("hello there")["input_ids"]])
    sample = _sample_prompts(tokenizer, scripts[: max(plan.users)], engine.prompt_budget)
    for peer in peers:
        tune = getattr(peer, "tune", None)
        if tune is not None:
            tuned[peer.name] = await asyncio.to_thread(tune, sample)
    rows: list[dict[str, Any]] = []
    for users in plan.users:
        chosen = [script[: plan.turns] for script in scripts[:users]]
        for pattern in PATTERNS:
            ramp = plan.ramp_s if pattern == CLOSED_LOOP else 0.0
            tag = f"{pattern}-{users}"
            bar.phase(f"{pattern}, {users} users: ours")
            runs: list[PatternRun] = [
                await run_bot(
                    manager, engine, pattern, chosen, f"bot-{tag}", ramp_s=ramp, tick=bar.tick
                )
            ]
            routed: dict[int, dict[str, int]] = {}  # run index: batches per engine
            for index, (name, other) in enumerate(others.items()):
                bar.phase(f"{pattern}, {users} users: {name}")
                before = dict(getattr(other.engine, "batches", {}))
                runs.append(
                    await run_bot(
                        other.manager,
                        other.engine,
                        pattern,
                        chosen,
                        f"other{index}-{tag}",
                        ramp_s=ramp,
                        tick=bar.tick,
                        name=name,
                    )
                )
                if before:  # both engines: which answered how many batches
                    after = other.engine.batches
                    routed[len(runs) - 1] = {key: after[key] - before[key] for key in after}
            ask = engine_ask(engine, f"engine-{tag}")
            runs.append(
                await run_pattern("ours (engine)", pattern, ask, chosen, ramp_s=ramp, tick=bar.tick)
            )
            for peer in peers:
                bar.phase(f"{pattern}, {users} users: {peer.name}")
                server = PeerServer(
                    peer, max_batch=text.max_batch_size, batch_wait_ms=text.batch_wait_ms
                )
                with server:
                    ask = peer_ask(server, tokenizer, engine.prompt_budget)
                    run = await run_pattern(
                        peer.name, pattern, ask, chosen, ramp_s=ramp, tick=bar.tick
                    )
                summary = run.summary()
                summary["mean_batch"] = round(sum(server.batches) / max(1, len(server.batches)), 2)
                rows.append({**summary, "messages": run.messages, "reply_tokens": run.reply_tokens})
            for index, run in enumerate(runs):
                row = {**run.summary(), "messages": run.messages, "reply_tokens": run.reply_tokens}
                if index in routed:
                    row["engine_batches"] = routed[index]
                rows.append(row)
    return rows


async def _turn_latency(
    app: Any, scripts: list[list[str]], plan: Plan, bar: Progress
) -> dict[str, Any]:
    """One user alone through the real path, `turns` messages, `turn_repeats`
    times; the ratio of the last turn's median latency to the first's."""
    from statistics import median

    per_run = []
    bar.phase("turn latency")
    for repeat in range(plan.turn_repeats):
        script = [scripts[repeat % len(scripts)][: plan.turns]]
        run = await run_bot(
            app.manager,
            app.engine,
            CLOSED_LOOP,
            script,
            f"alone{repeat}",
            ramp_s=0,
            tick=lambda: None,
        )
        per_run.append(run.latencies[0])
    medians = [round(median(run[turn] for run in per_run), 4) for turn in range(plan.turns)]
    return {
        "users": 1,
        "turns": plan.turns,
        "repeats": plan.turn_repeats,
        "ours": round(medians[-1] / medians[0], 3),
        "ours_latency_s": medians,
    }


def _default_row(base: Config, with_ct2: bool) -> str:
    """The row of the bot with the engine `text.engine` resolves to here ("ours
    (bot)" for the local engine, the remote one or CTranslate2 not installed)."""
    from bot.engine_settings import HYBRID, resolved_engine

    if not with_ct2:
        return "ours (bot)"
    engine = resolved_engine(base.text)
    return {"ctranslate2": OURS_CT2, HYBRID: OURS_HYBRID}.get(engine, "ours (bot)")


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each user count and pattern: ours against the best peer."""
    out = []
    keys = sorted({(row["users"], row["pattern"]) for row in rows})
    for users, pattern in keys:
        group = [row for row in rows if row["users"] == users and row["pattern"] == pattern]
        peers = [row for row in group if row["engine"] not in OURS]
        if not peers:
            continue
        best = max(peers, key=lambda row: row["tokens_per_s"])
        entry: dict[str, Any] = {
            "users": users,
            "pattern": pattern,
            "best_peer": best["engine"],
            "best_peer_tokens_per_s": best["tokens_per_s"],
        }
        for row in group:
            if row["engine"] in OURS and best["tokens_per_s"]:
                entry[row["engine"]] = round(row["tokens_per_s"] / best["tokens_per_s"], 2)
        out.append(entry)
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    widest = max(row["users"] for row in result["runs"])
    goals = {LOCKSTEP: 1.0, CLOSED_LOOP: 1.5}
    found = []
    ours = result.get("default_engine", "ours (bot)")
    for entry in result["ratios"]:
        if entry["users"] == widest:
            goal = goals[entry["pattern"]]
            value = entry.get(ours)
            found.append(
                {
                    "name": f"{ours} / best peer ({entry['best_peer']}), {entry['pattern']}, "
                    f"{widest} users",
                    "target": f">= {goal:g}",
                    "value": value,
                    "met": value is not None and value >= goal,
                }
            )
    ratio = result["turn_latency"]["ours"]
    found.append(
        {
            "name": f"turn {result['turn_latency']['turns']} / turn 1 latency ({ours}, 1 user)",
            "target": "<= 1.3",
            "value": ratio,
            "met": ratio <= 1.3,
        }
    )
    memory = result.get("memory")
    if memory and "kv_bytes" in memory and memory["kv_budget_bytes"]:  # 0: no limit
        found.append(
            {
                "name": "KV cache within text.kv_cache_mb",
                "target": f"<= {memory['kv_budget_bytes']:,} bytes",
                "value": memory["kv_bytes"],
                "met": memory["kv_bytes"] <= memory["kv_budget_bytes"],
            }
        )
    return found


__all__ = ["Skipped", "ratios", "run_peers", "targets", "workload"]
