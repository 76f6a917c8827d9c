"""What `aigc-bot bench --soak` measured, as one JSON-ready dict and as a table."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bot.bench.setup import cpu_name
from bot.bench.workloads import percentile

THINK_S = (0.5, 1.5)
#: RSS is sampled this often, or 20 times a run when that is more often.
RSS_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class SoakPlan:
    users: int = 1000
    minutes: float = 10.0

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def warmup_s(self) -> float:
        return min(60.0, self.seconds / 10)

    @property
    def rss_every_s(self) -> float:
        return max(0.1, min(RSS_EVERY_S, self.seconds / 20))


@dataclass(slots=True)
class Tally:
    """What the users saw. Latencies (seconds) only after warm-up."""

    messages: int = 0
    measured: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    first_error: str = ""

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.first_error = self.first_error or detail


# -- the bot, in a child process ---------------------------------------------------


def soak_result(
    plan: SoakPlan,
    tally: Tally,
    seconds: float,
    samples: list[tuple[float, int]],
    end_rss: int | None,
    checks: list[tuple[bool | None, int]],
    server_errors: float,
) -> dict[str, Any]:
    warm = next((rss for at, rss in samples if at >= plan.warmup_s), None)
    end = end_rss if end_rss is not None else (samples[-1][1] if samples else None)
    growth = round((end - warm) / warm * 100, 2) if warm and end else None
    # a leak keeps growing; caches level off: the second half of the run tells them apart
    middle = next((rss for at, rss in samples if at >= seconds / 2), None)
    late_growth = round((end - middle) / middle * 100, 2) if middle and end else None
    measured_s = max(seconds - plan.warmup_s, 1e-9)
    errors = sum(tally.errors.values())
    result: dict[str, Any] = {
        "users": plan.users,
        "minutes": plan.minutes,
        "warmup_s": round(plan.warmup_s, 1),
        "seconds": round(seconds, 1),
        "think_s": list(THINK_S),
        "requests": {
            "messages": tally.messages,
            "sessions": plan.users,
            "history_reads": len(checks),
        },
        "errors": errors,
        "error_kinds": dict(tally.errors),
        "server_errors": int(server_errors),
        "messages_per_s": round(tally.messages / seconds, 1) if seconds else 0.0,
        "messages_per_s_after_warmup": round(tally.measured / measured_s, 1),
        "latency_ms": {
            f"p{q}": round(percentile(tally.latencies, q) * 1000, 2) for q in (50, 95, 99)
        }
        | {"max": round(max(tally.latencies, default=float("nan")) * 1000, 2)},
        "rss_bytes": {
            "after_warmup": warm,
            "end": end,
            "peak": max([rss for _, rss in samples] + ([end] if end else []), default=None),
            "growth_pct": growth,
            "growth_under_10_pct": growth is not None and growth < 10,
            "growth_second_half_pct": late_growth,
            "samples": samples,
        },
        "histories": {
            "checked": sum(1 for ok, _ in checks if ok is not None),
            "isolated": sum(1 for ok, _ in checks if ok),
            "unknown": sum(1 for ok, _ in checks if ok is None),
            "foreign_messages": sum(foreign for _, foreign in checks),
        },
        "machine": {"cores": os.cpu_count(), "cpu": cpu_name()},
    }
    if tally.first_error:
        result["first_error"] = tally.first_error
    return result


# -- the run and its report ----------------------------------------------------------


def format_soak(result: dict[str, Any]) -> str:
    latency, rss, histories = result["latency_ms"], result["rss_bytes"], result["histories"]
    load = result["machine"]["load_average"]

    def mb(value: int | None) -> str:
        return "?" if value is None else f"{value / 2**20:.1f} MB"

    growth, late = rss["growth_pct"], rss.get("growth_second_half_pct")
    growth_text = "?" if growth is None else f"{growth:+.1f}%"
    late_text = "?" if late is None else f"{late:+.1f}%"
    errors = f"{result['errors']} errors"
    if result["errors"]:
        errors += f" {result['error_kinds']} (first: {result.get('first_error', '')})"
    lines = [
        f"soak      {result['users']:,} web users for {result['minutes']:g} min "
        f"(warm-up {result['warmup_s']:g} s), think time {THINK_S[0]:g}-{THINK_S[1]:g} s; "
        "instant engine, SQLite, one bot process",
        f"requests  {result['requests']['messages']:,} messages, "
        f"{result['requests']['sessions']:,} sessions, "
        f"{result['requests']['history_reads']:,} history reads; {errors}; "
        f"server-side errors {result['server_errors']}",
        f"rate      {result['messages_per_s']:,} messages/s "
        f"({result['messages_per_s_after_warmup']:,} after warm-up)",
        f"latency   p50 {latency['p50']} ms, p95 {latency['p95']} ms, p99 {latency['p99']} ms, "
        f"max {latency['max']} ms (after warm-up)",
        f"memory    RSS {mb(rss['after_warmup'])} after warm-up, {mb(rss['end'])} at the end "
        f"({growth_text}; target under +10%; second half {late_text}), peak {mb(rss['peak'])}",
        f"history   {histories['isolated']:,} of {histories['checked']:,} users hold exactly "
        f"their own messages ({histories['foreign_messages']} foreign)",
        f"cpu       the bot used {result['cpu']['bot_cores']} cores on average, "
        f"the simulated users {result['cpu']['clients_cores']}",
        f"machine   {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"load average {load['start']} at start, {load['end']} at end",
    ]
    return "\n".join(lines)
