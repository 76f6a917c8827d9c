"""`aigc-bot faq eval | unanswered | check` (registered by bot/cli.py).

Problems an operator can fix (a bad FAQ file, a bad question set, a missing
model) print one line to stderr and exit 1, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.knowledge.faq import KnowledgeError, load_faq

if TYPE_CHECKING:
    from bot.config import Config

_DAYS = re.compile(r"^(\d+)d$")


def add_subcommands(sub: Any) -> None:
    faq = sub.add_parser("faq", help="the knowledge base: evaluate, list unanswered, check a file")
    commands = faq.add_subparsers(dest="faq_command", required=True, metavar="FAQ_COMMAND")

    evaluate = commands.add_parser(
        "eval",
        help="accuracy, false answers and abstentions on labelled questions, with a sweep",
        description='Each line of --questions is {"text": ..., "faq": <entry id> | null}. '
        "Prints the rates at the configured thresholds, the nearest-neighbour baseline "
        "and a sweep over answer_threshold.",
    )
    evaluate.add_argument("--questions", required=True, type=Path, help="labelled JSONL file")
    evaluate.add_argument("--faq", type=Path, help="FAQ file (default: [knowledge] faq)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--plot", type=Path, help="write the sweep as a PNG chart")
    evaluate.set_defaults(func=cmd_eval)

    unanswered = commands.add_parser(
        "unanswered", help="recorded questions the FAQ could not answer, most frequent first"
    )
    unanswered.add_argument("--since", help="YYYY-MM-DD or Nd (the last N days)")
    unanswered.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    unanswered.add_argument("--json", action="store_true", help="one JSON object per line")
    unanswered.set_defaults(func=cmd_unanswered)

    check = commands.add_parser("check", help="validate an FAQ file (exit 1 with the problem)")
    check.add_argument("file", nargs="?", type=Path, help="default: [knowledge] faq")
    check.set_defaults(func=cmd_check)


def _config(args: argparse.Namespace) -> Config:
    from bot.config import load_config
    from bot.logging_setup import setup_logging

    config = load_config(args.config)
    setup_logging(args.log_level or "WARNING")
    return config


def _faq_path(config: Config, given: Path | None) -> Path:
    if given is not None:
        return given
    if not config.knowledge.faq.strip():
        raise KnowledgeError("knowledge.faq is empty: set it in the config or pass a file")
    return config.relative_to_config(config.knowledge.faq)


def _fail(exc: Exception) -> int:
    print(f"aigc-bot: {exc}", file=sys.stderr)
    return 1


def cmd_check(args: argparse.Namespace) -> int:
    try:
        path = _faq_path(_config(args), args.file)
        faq = load_faq(path)
    except KnowledgeError as exc:
        return _fail(exc)
    questions = sum(len(entry.questions) for entry in faq.entries)
    print(f"{path}: ok, {len(faq.entries)} entries, {questions} questions")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bot.knowledge.evaluation import evaluate, format_report, load_questions, plot
    from bot.knowledge.service import KnowledgeService

    config = _config(args)

    async def run() -> Any:
        path = _faq_path(config, args.faq)
        settings = config.knowledge.model_copy(update={"faq": str(path), "reload_interval_s": 0})
        service = KnowledgeService.create(
            config.model_copy(update={"knowledge": settings}), None, None
        )
        assert service is not None
        rows = load_questions(args.questions, service.faq)
        await service.start()
        try:
            return await evaluate(service, rows)
        finally:
            await service.close()

    try:
        result = asyncio.run(run())
    except KnowledgeError as exc:
        return _fail(exc)
    if args.plot is not None:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(format_report(result))
        if args.plot is not None:
            print(f"\nchart written to {args.plot}")
    return 0


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """`YYYY-MM-DD` (UTC midnight) or `Nd` (N days before now)."""
    if value is None:
        return None
    days = _DAYS.match(value.strip())
    if days:
        return (now or datetime.now(UTC)) - timedelta(days=int(days.group(1)))
    try:
        return datetime.strptime(value.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise KnowledgeError(f"--since {value!r}: expected YYYY-MM-DD or Nd, e.g. 7d") from None


def cmd_unanswered(args: argparse.Namespace) -> int:
    from storage import Store

    config = _config(args)
    try:
        since = parse_since(args.since)
    except KnowledgeError as exc:
        return _fail(exc)

    async def run() -> Any:
        store = await Store.open(config.storage.url, busy_timeout_ms=config.storage.busy_timeout_ms)
        try:
            return await store.unanswered.most_frequent(since=since, limit=args.limit)
        finally:
            await store.close()

    rows = asyncio.run(run())
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
        return 0
    if not rows:
        print("no unanswered questions" + (f" since {since:%Y-%m-%d}" if since else ""))
        return 0
    print(f"{'count':>5}  {'last asked':16}  {'closest entry':24}  question")
    for row in rows:
        closest = row.best_id or "-"
        if row.best_id and row.best_score is not None:
            closest = f"{row.best_id} ({row.best_score:.2f})"
        print(f"{row.count:>5}  {row.last_at:%Y-%m-%d %H:%M}  {closest:24}  {row.text}")
    return 0
