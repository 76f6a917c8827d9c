"""`aigc-bot bench`: the subcommand's options and what it prints."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from bot.bench.plan import BUNDLED_MODEL, Plan


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
        help="CPU threads of every engine (default: each engine's own, as the bot's "
        "text.threads = 0 gives them)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a small, fast configuration (users 1,4; 4 turns; 8 tokens)",
    )
    bench.add_argument(
        "--peers",
        action="store_true",
        help="compare with transformers' static batches and CTranslate2 float32/int8 "
        "(skipped with a note when ctranslate2 is not installed), in lockstep rounds "
        "and with closed-loop users",
    )
    bench.add_argument(
        "--ramp-s",
        type=float,
        help="--peers: closed-loop users' first messages spread over this many seconds (default 1)",
    )
    bench.add_argument(
        "--no-memory",
        action="store_true",
        help="--peers: skip the peak-memory run in a fresh process",
    )
    bench.add_argument(
        "--soak",
        action="store_true",
        help="soak test: simulated users over the web API with an instant engine (docs/SOAK.md)",
    )
    bench.add_argument(
        "--soak-minutes", type=float, default=10.0, help="--soak: how long (default 10)"
    )
    bench.add_argument(
        "--soak-users", type=_positive, default=1000, help="--soak: users at once (default 1000)"
    )
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.soak:
        from bot.bench.soak import cmd_soak

        return cmd_soak(args)
    from bot.config import load_config
    from bot.logging_setup import setup_logging

    config = load_config(args.config)
    setup_logging(args.log_level or "WARNING")
    from transformers.utils import logging as hf_logging

    # generate() warns that EOS-as-pad "may be padding" even with an attention mask given
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    overrides = {
        "users": args.users,
        "turns": args.turns,
        "new_tokens": args.new_tokens,
        "model": args.model,
        "threads": args.threads,
        "ramp_s": args.ramp_s,
    }
    if args.quick:
        plan = Plan.quick(**overrides)
    else:
        plan = Plan(**{key: value for key, value in overrides.items() if value is not None})
    if args.peers:
        from bot.bench.compare import run_peers
        from bot.bench.peer_report import format_peers, write_peers_plot

        result = asyncio.run(run_peers(config, plan, progress=True, memory=not args.no_memory))
        if args.plot:
            write_peers_plot(result, args.plot)
            result["plot"] = str(args.plot)
        text = format_peers(result)
    else:
        from bot.bench.report import format_report, write_plot
        from bot.bench.serving import run_bench

        result = asyncio.run(run_bench(config, plan, progress=True))
        if args.plot:
            write_plot(result, args.plot)
            result["plot"] = str(args.plot)
        text = format_report(result)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(text)
    return 0
