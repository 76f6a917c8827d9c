"""`aigc-bot audit [--since YYYY-MM-DD|Nd] [--kind KIND] [--limit N] [--json]`
(registered by bot/cli.py): the moderation and admin actions in the audit log,
oldest first. A bad `--since` prints one line to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

from bot.governance.errors import GovernanceError
from bot.governance.periods import parse_since

KINDS = ("moderation", "access", "ban", "unban", "mute", "unmute")


def add_subcommands(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="moderation and admin actions (blocked texts, refusals, bans, mutes)",
        description="Prints the newest entries of the audit log, oldest first.",
    )
    audit.add_argument("--since", help="YYYY-MM-DD (UTC) or Nd (the last N days)")
    audit.add_argument("--kind", choices=KINDS, help="only entries of this kind")
    audit.add_argument(
        "--limit", type=int, default=1000, help="at most this many, the newest (default 1000)"
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.set_defaults(func=cmd_audit)


def _where(entry: dict[str, Any]) -> str:
    parts = [str(entry["platform"])] if entry["platform"] else []
    if entry["chat_id"]:
        parts.append(f"chat {entry['chat_id']}")
    if entry["user_id"]:
        parts.append(f"user {entry['user_id']}")
    return " ".join(parts) or "-"


def cmd_audit(args: argparse.Namespace) -> int:
    from bot.config import load_config
    from bot.logging_setup import setup_logging
    from storage import Store

    config = load_config(args.config)
    setup_logging(args.log_level or "WARNING")
    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    except GovernanceError as exc:
        print(f"aigc-bot: --since: {exc}", file=sys.stderr)
        return 1
    if args.limit < 1:
        print("aigc-bot: --limit must be at least 1", file=sys.stderr)
        return 1

    async def read() -> list[dict[str, Any]]:
        store = await Store.open(config.storage.url, busy_timeout_ms=config.storage.busy_timeout_ms)
        try:
            entries = await store.governance.entries(since=since, kind=args.kind, limit=args.limit)
        finally:
            await store.close()
        return [entry.as_dict() for entry in entries]

    entries = asyncio.run(read())
    if args.json:
        for entry in entries:
            print(json.dumps(entry, ensure_ascii=False))
        return 0
    if not entries:
        print("no audit entries" + (f" since {since:%Y-%m-%d %H:%M} UTC" if since else ""))
        return 0
    print(f"{'at (UTC)':19}  {'kind':10}  {'by':24}  {'about':32}  detail")
    for entry in entries:
        at = entry["at"].replace("T", " ")[:19]
        print(
            f"{at:19}  {entry['kind']:10}  {entry['actor']:24}  {_where(entry):32}  "
            f"{entry['detail']}"
        )
    return 0
