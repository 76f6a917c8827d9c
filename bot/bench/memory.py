"""The bot's memory at load: a fresh process runs the real path (manager +
SQLite store + the engine `text.engine` gives this machine) with N
closed-loop users and reports its peak RSS and how much of it is key/value
cache (the local engine's slots and prefix cache, the most a CTranslate2
sub-batch held), against the `text.kv_cache_mb` budget."""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
from typing import Any

from bot.config import Config


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    """This process's peak RSS. `VmHWM` belongs to the address space, so unlike
    `ru_maxrss` (kept across exec) it does not count the parent we were forked
    from."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def _probe(config: Config, scripts: list[list[str]]) -> dict[str, Any]:
    from bot.app import BotApp
    from bot.bench.peer_run import CLOSED_LOOP, run_bot
    from bot.engine_settings import resolved_engine

    before = _rss_bytes()
    async with BotApp(config) as app:
        engine: Any = app.engine
        loaded = _rss_bytes()
        run = await run_bot(
            app.manager, engine, CLOSED_LOOP, scripts, "memory", ramp_s=0.0, tick=lambda: None
        )
        kv = engine.kv_use()
        result = {
            "engine": resolved_engine(config.text),
            "users": len(scripts),
            "turns": len(scripts[0]) if scripts else 0,
            "errors": len(run.errors),
            "rss_before_start_bytes": before,
            "rss_after_load_bytes": loaded,
            "peak_rss_bytes": _peak_rss_bytes(),
            "kv_bytes": kv.total,
            "kv_batch_bytes": kv.batch_bytes,
            "kv_prefix_bytes": kv.prefix_bytes,
            "kv_prefix_entries": kv.prefix_entries,
            "kv_budget_bytes": config.text.kv_cache_mb * 2**20,
            "batch_rows": kv.batch_rows,
        }
    result["kv_share_of_peak_rss"] = round(kv.total / result["peak_rss_bytes"], 3)
    return result


def _child(config: Config, scripts: list[list[str]], out: Any) -> None:
    try:
        out.put(asyncio.run(_probe(config, scripts)))
    except Exception as exc:  # reported, not raised, across the process boundary
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_memory(
    config: Config, scripts: list[list[str]], users: int, turns: int
) -> dict[str, Any]:
    """`_probe` in a fresh (spawned) process, so nothing else this bench loaded counts."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    chosen = [script[:turns] for script in scripts[:users]]
    process = context.Process(target=_child, args=(config, chosen, out), daemon=True)
    process.start()
    try:
        result: dict[str, Any] = out.get(timeout=1800)
    finally:
        process.join(timeout=60)
    return result
