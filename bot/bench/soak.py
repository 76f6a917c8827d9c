"""`aigc-bot bench --soak`: many web users, for minutes, against one bot process.

The flow of one soak:

1. A child process (spawned, so nothing of this one counts in its memory)
   runs the bot as `aigc-bot run` would for the web alone: `BotApp` with the
   instant engine (bot.bench.workloads), a fresh SQLite database in a
   temporary folder, no rate limits, and the real `WebChannel` on a free
   port of 127.0.0.1.
2. This process creates one session per simulated user, then runs every user
   as a closed loop with aiohttp: send a message (`POST /api/messages`), wait
   for the answer, think for 0.5-1.5 s, until the time is up. Every answer
   that is not a 200 with a text reply is an error.
3. Meanwhile the child's RSS is sampled; the figure after warm-up (the first
   tenth of the run, at most a minute) is the baseline for its growth.
4. At the end every user's history (`GET /api/messages`) is read back and
   compared with what that user sent: it must hold their messages, in order,
   and nobody else's.

Latency is wall time from sending a message to its whole answer, counted
after warm-up. See docs/SOAK.md for a run and its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from bot.bench.setup import cpu_name, load_average
from bot.bench.workloads import InstantEngine, percentile
from bot.config import Config

THINK_S = (0.5, 1.5)
#: `GET /api/messages` returns at most this many messages of a history.
HISTORY_LIMIT = 500
#: RSS is sampled this often, or 20 times a run when that is more often.
RSS_EVERY_S = 5.0
STARTUP_TIMEOUT_S = 120.0


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


def soak_config(base: Config, workdir: Path) -> Config:
    """`base` on a fresh SQLite database, web only on a free port, no limits,
    no drawing and no FAQ: what is measured is the web channel, the manager and
    the store."""
    limits = {name: 0 for name in type(base.limits).model_fields}
    return base.model_copy(
        update={
            "bot": base.bot.model_copy(update={"data_dir": workdir}),
            "storage": base.storage.model_copy(
                update={"url": f"sqlite+aiosqlite:///{workdir / 'soak.db'}", "redis_url": ""}
            ),
            "limits": base.limits.model_copy(update=limits),
            "web": base.web.model_copy(
                update={"enabled": True, "host": "127.0.0.1", "port": 0, "sessions_per_minute": 0}
            ),
            "draw": base.draw.model_copy(update={"enabled": False}),
            "knowledge": base.knowledge.model_copy(update={"faq": ""}),
        }
    )


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(config: Config, pipe: Connection, stop: Any) -> None:
    from bot.app import BotApp

    async with BotApp(config, engine=InstantEngine()) as app:
        channels = app.build_channels(only="web")
        if not channels:
            raise RuntimeError("the web channel is not installed (pip install -e .)")
        web = channels[0]
        await web.start()
        try:
            pipe.send(("port", getattr(web, "port", None)))
            await asyncio.to_thread(stop.wait)
        finally:
            await web.stop()


def _serve_child(config: Config, pipe: Connection, stop: Any) -> None:
    from bot.logging_setup import setup_logging

    setup_logging("WARNING")
    _raise_open_files_limit()
    try:
        asyncio.run(_serve(config, pipe, stop))
    except Exception as exc:  # reported across the process boundary, not raised
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))


def rss_of(pid: int) -> int | None:
    """Resident set size of a process in bytes (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU time a process has used (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the users ---------------------------------------------------------------------


def message_text(user: int, number: int) -> str:
    return f"soak user {user} message {number}"


async def _session(http: aiohttp.ClientSession) -> tuple[str, str]:
    async with http.post("/api/sessions") as response:
        if response.status != 201:
            raise RuntimeError(f"POST /api/sessions answered {response.status}")
        body = await response.json()
    return str(body["session"]), str(body["user_id"])


#: One user's messages and the answer each got (None: the request failed).
Sent = list[tuple[str, str | None]]


async def _user(
    http: aiohttp.ClientSession,
    index: int,
    token: str,
    sent: Sent,
    tally: Tally,
    warm_at: float,
    deadline: float,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    think = random.Random(index)
    await asyncio.sleep(think.uniform(0, THINK_S[1]))  # users do not all start at once
    number = 0
    while time.monotonic() < deadline:
        number += 1
        text = message_text(index, number)
        started = time.monotonic()
        reply: str | None = None
        try:
            async with http.post("/api/messages", json={"text": text}, headers=headers) as r:
                status, body = r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, body = 0, f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        tally.messages += 1
        if status == 200:
            replies = json.loads(body).get("replies") or [{}]
            if replies[0].get("type") == "text":
                reply = str(replies[0]["text"])
        sent.append((text, reply))
        if reply is None:
            kind = f"HTTP {status}" if status else body.split(":", 1)[0]
            tally.error(kind, f"user {index}, message {number}: {kind} {body[:200]}")
        elif started >= warm_at:
            tally.measured += 1
            tally.latencies.append(elapsed)
        await asyncio.sleep(think.uniform(*THINK_S))


async def _history_check(
    http: aiohttp.ClientSession, index: int, token: str, sent: Sent
) -> tuple[bool | None, int]:
    """(whether the history is exactly this user's messages and the answers
    they got, in order — None when some of their requests failed, so it cannot
    be known; how many messages in it are someone else's)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get("/api/messages", headers=headers) as response:
        messages = (await response.json())["messages"] if response.status == 200 else None
    if messages is None:
        return False, 0
    own = f"soak user {index} message "
    foreign = sum(1 for m in messages if m["role"] == "user" and not m["text"].startswith(own))
    if any(reply is None for _, reply in sent):
        return None, foreign
    expected = [pair for text, reply in sent for pair in (("user", text), ("bot", reply))]
    got = [(m["role"], m["text"]) for m in messages]
    return got == expected[-HISTORY_LIMIT:], foreign


async def _sample_rss(
    pid: int, samples: list[tuple[float, int]], started: float, every_s: float
) -> None:
    while True:
        rss = rss_of(pid)
        if rss is not None:
            samples.append((round(time.monotonic() - started, 2), rss))
        await asyncio.sleep(every_s)


async def _server_errors(http: aiohttp.ClientSession) -> float:
    """The bot's own error counter (`aigc_bot_errors_total`, every kind)."""
    async with http.get("/metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("aigc_bot_errors_total{")
    )


async def _drive(url: str, pid: int, plan: SoakPlan, progress: bool) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        sessions = await asyncio.gather(*(_session(http) for _ in range(plan.users)))
        sent: list[Sent] = [[] for _ in sessions]
        tally = Tally()
        started = time.monotonic()
        cpu_at_start = (cpu_seconds_of(pid), own_cpu_seconds())
        warm_at, deadline = started + plan.warmup_s, started + plan.seconds
        samples: list[tuple[float, int]] = []
        sampler = asyncio.create_task(_sample_rss(pid, samples, started, plan.rss_every_s))
        reporter = asyncio.create_task(_report_progress(tally, samples, started, progress))
        try:
            await asyncio.gather(
                *(
                    _user(http, index, token, sent[index], tally, warm_at, deadline)
                    for index, (token, _) in enumerate(sessions)
                )
            )
        finally:
            for task in (sampler, reporter):
                task.cancel()
        seconds = time.monotonic() - started
        end_rss = rss_of(pid)
        bot_cpu, client_cpu = cpu_seconds_of(pid), own_cpu_seconds()
        bot_start = cpu_at_start[0]
        cpu = {
            "bot_cores": None if bot_cpu is None or bot_start is None else bot_cpu - bot_start,
            "clients_cores": client_cpu - cpu_at_start[1],
        }
        checks = await asyncio.gather(
            *(
                _history_check(http, index, token, sent[index])
                for index, (token, _) in enumerate(sessions)
            )
        )
        server_errors = await _server_errors(http)
    result = _result(plan, tally, seconds, samples, end_rss, checks, server_errors)
    # CPU seconds per second of the run: how many cores each side kept busy
    result["cpu"] = {
        side: None if used is None else round(used / seconds, 2) for side, used in cpu.items()
    }
    return result


async def _report_progress(
    tally: Tally, samples: list[tuple[float, int]], started: float, progress: bool
) -> None:
    while progress:
        await asyncio.sleep(30)
        rss = f", RSS {samples[-1][1] / 2**20:.0f} MB" if samples else ""
        print(
            f"soak: {time.monotonic() - started:.0f} s, {tally.messages:,} messages, "
            f"{sum(tally.errors.values())} errors{rss}",
            file=sys.stderr,
            flush=True,
        )


def _result(
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


def _wait_for_port(pipe: Connection, process: Any) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if pipe.poll(0.2):
            kind, value = pipe.recv()
            if kind == "port" and isinstance(value, int):
                return value
            raise RuntimeError(f"the soak's bot process failed: {value}")
        if not process.is_alive():
            raise RuntimeError(f"the soak's bot process exited ({process.exitcode})")
    raise RuntimeError(f"the soak's bot process did not start in {STARTUP_TIMEOUT_S:.0f} s")


async def run_soak(config: Config, plan: SoakPlan, *, progress: bool = False) -> dict[str, Any]:
    """Start the bot in a child process, run the users against it, stop it."""
    _raise_open_files_limit()
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="aigc-soak-") as workdir:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        stop = context.Event()
        process = context.Process(
            target=_serve_child, args=(soak_config(config, Path(workdir)), theirs, stop)
        )
        process.start()
        try:
            port = await asyncio.to_thread(_wait_for_port, ours, process)
            if progress:
                print(f"soak: {plan.users} users for {plan.minutes:g} min", file=sys.stderr)
            result = await _drive(f"http://127.0.0.1:{port}", process.pid or 0, plan, progress)
        finally:
            stop.set()
            await asyncio.to_thread(process.join, 60)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 10)
    result["machine"]["load_average"] = {"start": load_start, "end": load_average()}
    return result


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


def cmd_soak(args: argparse.Namespace) -> int:
    """`aigc-bot bench --soak`: exit 1 when any request failed or a history was wrong."""
    from bot.config import load_config
    from bot.logging_setup import setup_logging

    config = load_config(args.config)
    setup_logging(args.log_level or "WARNING")
    plan = SoakPlan(users=args.soak_users, minutes=args.soak_minutes)
    result = asyncio.run(run_soak(config, plan, progress=not args.json))
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_soak(result))
    histories = result["histories"]
    isolated = histories["isolated"] == histories["checked"] == result["users"]
    return 0 if not result["errors"] and isolated else 1
