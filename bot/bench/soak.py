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
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from bot.bench.setup import load_average
from bot.bench.soak_report import THINK_S, SoakPlan, Tally, format_soak, soak_result
from bot.bench.workloads import InstantEngine
from bot.config import Config

#: `GET /api/messages` returns at most this many messages of a history.
HISTORY_LIMIT = 500
STARTUP_TIMEOUT_S = 120.0


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
    result = soak_result(plan, tally, seconds, samples, end_rss, checks, server_errors)
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
