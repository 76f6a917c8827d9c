"""`aigc-bot bench`: the serving path against one `model.generate` per message, side by side.

In one process, on the same model and the same user messages:

* baseline — a bot that keeps each user's history as text and, for every
  message, calls `model.generate` on the whole (budget-trimmed) history, one
  message at a time;
* ours — the real path: `ConversationManager` + `Store` on a temporary SQLite
  database + `LocalTextEngine` (dynamic batching, prefix KV reuse), with N
  simulated users chatting at once.

Both generate exactly `--new-tokens` tokens per reply (EOS is masked in both),
with the same sampling settings, so tokens/s compare fairly. Then: the
manager + storage overhead with an instant engine, and int8 against fp32 on
the CPU (tokens/s and held-out perplexity). See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Config

DEFAULT_USERS = (1, 8, 32)
QUICK_USERS = (1, 4)
BUNDLED_MODEL = "models/chitchat-gpt2"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run. `new_tokens` None: the config's text.max_new_tokens."""

    users: tuple[int, ...] = DEFAULT_USERS
    turns: int = 20
    new_tokens: int | None = None
    model: str | None = None
    overhead_users: int = 32
    overhead_turns: int = 40
    int8_users: int = 8
    int8_turns: int = 5
    heldout_dialogues: int = 40
    turn_repeats: int = 3
    threads: int | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> Plan:
        values: dict[str, Any] = {
            "users": QUICK_USERS,
            "turns": 4,
            "new_tokens": 8,
            "overhead_users": 8,
            "overhead_turns": 5,
            "int8_users": 2,
            "int8_turns": 2,
            "turn_repeats": 1,
            "heldout_dialogues": 4,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


# -- the command -------------------------------------------------------------------------


def _user_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("user counts must be at least 1")
    return counts


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_subcommand(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure serving speed against one model.generate per message",
        description="Times the real path (manager + SQLite store + batched engine) with N users "
        "chatting at once against one model.generate per message, on the same model and messages, "
        "then the manager + storage overhead and int8 against fp32. See docs/PERFORMANCE.md.",
    )
    bench.add_argument(
        "--model",
        help="model directory or hub id (default: text.model; when that is the missing "
        f"{BUNDLED_MODEL}, a tiny test model built on the spot)",
    )
    bench.add_argument(
        "--users", type=_user_counts, help="simulated users at once, e.g. 1,8,32 (the default)"
    )
    bench.add_argument("--turns", type=_positive, help="messages per user (default 20)")
    bench.add_argument(
        "--new-tokens",
        type=_positive,
        help="tokens per reply in both paths (default text.max_new_tokens)",
    )
    bench.add_argument("--json", action="store_true", help="print the results as one JSON object")
    bench.add_argument("--plot", metavar="FILE", help="write a PNG of tokens/s against users")
    bench.add_argument(
        "--threads",
        type=_positive,
        help="torch CPU threads for both paths (default: torch's own, one per core)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a small, fast configuration (users 1,4; 4 turns; 8 tokens)",
    )
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from bot.bench.report import format_report, write_plot
    from bot.config import load_config
    from bot.logging_setup import setup_logging

    config = load_config(args.config)
    setup_logging(args.log_level or "WARNING")
    from transformers.utils import logging as hf_logging

    # generate() warns that EOS-as-pad "may be padding" even with an attention mask given
    hf_logging.set_verbosity_error()
    overrides = {
        "users": args.users,
        "turns": args.turns,
        "new_tokens": args.new_tokens,
        "model": args.model,
        "threads": args.threads,
    }
    if args.quick:
        plan = Plan.quick(**overrides)
    else:
        plan = Plan(**{key: value for key, value in overrides.items() if value is not None})
    result = asyncio.run(run_bench(config, plan, progress=True))
    if args.plot:
        write_plot(result, args.plot)
        result["plot"] = str(args.plot)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_report(result))
    return 0


# -- the run -------------------------------------------------------------------------------


def bench_config(base: Config, model: str, db_path: Path, **text: Any) -> Config:
    """`base` with the model, a temporary SQLite database, the local engine, no
    rate limit (a bench user sends 20 messages a minute and more) and no draw."""
    return base.model_copy(
        update={
            "bot": base.bot.model_copy(update={"data_dir": db_path.parent}),
            "storage": base.storage.model_copy(update={"url": f"sqlite+aiosqlite:///{db_path}"}),
            "text": base.text.model_copy(update={"model": model, "engine": "local", **text}),
            "limits": base.limits.model_copy(update={"messages_per_minute": 0}),
            "draw": base.draw.model_copy(update={"enabled": False}),
        }
    )


def resolve_model(requested: str | None, config: Config, workdir: Path) -> tuple[str, str]:
    """(model to load, how it was chosen)."""
    from bot.engines.loading import looks_local

    if requested:
        return requested, "--model"
    name = config.text.model
    if looks_local(name) and not Path(name).expanduser().is_dir():
        from bot.testing.tiny_models import build_tiny_gpt2

        path = build_tiny_gpt2(workdir / "tiny-gpt2")
        return str(path), f"tiny test model ({name} is missing)"
    return name, "text.model"


def user_scripts(dialogues: list[list[str]], users: int, turns: int) -> list[list[str]]:
    """`turns` messages for each user: the first speaker's turns of one held-out
    dialogue each, cycled, at most 160 characters (cut at a word)."""
    if not dialogues:
        from bot.testing.tiny_models import sample_lines

        lines = sample_lines()
        return [
            [lines[(user * 37 + turn * 11) % len(lines)] for turn in range(turns)]
            for user in range(users)
        ]
    scripts = []
    for user in range(users):
        own = dialogues[user % len(dialogues)][0::2]
        scripts.append([_shorten(own[turn % len(own)]) for turn in range(turns)])
    return scripts


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] or text[:limit]


class _Progress:
    """A tqdm bar on stderr when wanted, else nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="msg", file=sys.stderr, dynamic_ncols=True, mininterval=0.5
            )

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(name)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_bench(base: Config, plan: Plan, *, progress: bool = False) -> dict[str, Any]:
    """Run every workload of `plan`; the results as a JSON-ready dict."""
    started = time.perf_counter()
    load_start = _load_average()
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
        bar = _Progress(progress, total)
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
        finally:
            bar.close()
    result["device"]["load_average"] = {"start": load_start, "end": _load_average()}
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
    bar: _Progress,
) -> dict[str, Any]:
    """Baseline and ours for every user count, back to back on one loaded model."""
    from bot.app import BotApp
    from bot.bench.workloads import GenerateBot, baseline_converse, converse, mask_eos
    from bot.engines.loading import load_causal_lm

    config = bench_config(base, model, workdir / "serving.db", max_new_tokens=new_tokens)
    async with BotApp(config) as app:
        engine: Any = app.engine
        manager: Any = app.manager
        eos = engine.tokenizer.eos_token_id
        mask_eos(engine.model, eos)
        model_b, tokenizer_b, device = await asyncio.to_thread(load_causal_lm, config.text)
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
            tokens_mark = _generated(app)
            bar.phase(f"ours, {users} user{'s' * (users > 1)}")
            ours = await converse(
                manager, [s[: plan.turns] for s in scripts[:users]], f"n{users}", bar.tick
            )
            ours.tokens = int(_generated(app) - tokens_mark)
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
            "model": _describe_model(model, engine.model, engine.tokenizer),
            "device": _describe_device(device, engine.model),
            "settings": _settings(config, plan, new_tokens, engine.prompt_budget),
            "users": rows,
            "turn_latency": await _turn_latency(manager, baseline, scripts, plan, bar),
        }


async def _turn_latency(
    manager: Any, baseline: Any, scripts: list[list[str]], plan: Plan, bar: _Progress
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
    base: Config, plan: Plan, model: str, workdir: Path, scripts: list[list[str]], bar: _Progress
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
    bar: _Progress,
) -> dict[str, Any]:
    """fp32 against `text.quantize = "int8"` on the CPU, through the real path."""
    import torch

    from bot.app import BotApp
    from bot.bench.workloads import converse, mask_eos, perplexity_of

    if "fbgemm" not in torch.backends.quantized.supported_engines and (
        "x86" not in torch.backends.quantized.supported_engines
    ):
        return {"skipped": "this torch build has no x86 quantized kernels"}
    users, turns = plan.int8_users, plan.int8_turns
    out: dict[str, Any] = {"device": "cpu", "users": users, "turns": turns}
    for quantize, label in (("none", "fp32"), ("int8", "int8")):
        config = bench_config(
            base,
            model,
            workdir / f"{label}.db",
            max_new_tokens=new_tokens,
            device="cpu",
            quantize=quantize,
        )
        async with BotApp(config) as app:
            engine: Any = app.engine
            hook = mask_eos(engine.model, engine.tokenizer.eos_token_id)
            await converse(app.manager, [["hello there"]], f"warm-{label}", lambda: None)
            mark = _generated(app)
            run = await converse(app.manager, [s[:turns] for s in scripts[:users]], label, bar.tick)
            run.tokens = int(_generated(app) - mark)
            hook.remove()
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
    if heldout:
        change = out["int8"]["perplexity"] / out["fp32"]["perplexity"] - 1
        out["perplexity_change_pct"] = round(100 * change, 2)
    else:
        out["heldout"] = {"source": source, "dialogues": 0, "tokens": 0}
    return out


# -- descriptions and targets ----------------------------------------------------------------


def _generated(app: Any) -> float:
    value = app.metrics.registry.get_sample_value("aigc_bot_generated_tokens_total")
    return float(value or 0.0)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _describe_model(name: str, model: Any, tokenizer: Any) -> dict[str, Any]:
    config = model.config
    return {
        "path": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": getattr(config, "n_layer", None),
        "embedding": getattr(config, "n_embd", None),
        "vocab": len(tokenizer),
        "context": getattr(config, "n_positions", None),
    }


def _describe_device(device: Any, model: Any) -> dict[str, Any]:
    import torch

    described: dict[str, Any] = {
        "type": device.type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


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
        "forced_length": "EOS logit masked in both paths: every reply is new_tokens long",
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
        ("manager + storage overhead p95, ms", "<=", 5.0, overhead["sequential"]["p95_ms"]),
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


__all__ = ["Plan", "add_subcommand", "run_bench"]
