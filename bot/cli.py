"""`aigc-bot` command line: run, chat, export, forget, doctor, train, eval, bench.

Errors an operator can fix (a bad config, a missing model, a database that is
down) print one line to stderr and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bot.config import Config, ConfigError, load_config
from bot.logging_setup import redact, setup_logging

EXIT_CONFIG = 2


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    setup_logging(args.log_level or config.bot.log_level)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from bot.app import serve

    asyncio.run(serve(_load(args)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from bot.app import chat

    config = _load(args)
    if args.log_level is None:
        logging.getLogger().setLevel(logging.WARNING)
    return asyncio.run(chat(config, user=args.user))


async def _with_store(config: Config, action: Callable[[Any], Any]) -> Any:
    from storage import Store

    store = await Store.open(config.storage.url, busy_timeout_ms=config.storage.busy_timeout_ms)
    try:
        return await action(store)
    finally:
        await store.close()


def cmd_export(args: argparse.Namespace) -> int:
    config = _load(args)

    async def export(store: Any) -> dict[str, Any]:
        conversations = await store.people.export(args.platform, args.user)
        document: dict[str, Any] = {
            "platform": args.platform,
            "user_id": args.user,
            "conversations": [conversation.as_dict() for conversation in conversations],
        }
        draws = await store.draws.export(args.platform, args.user)
        if draws:
            document["draws"] = draws
        return document

    document = asyncio.run(_with_store(config, export))
    json.dump(document, sys.stdout, ensure_ascii=False, indent=2 if args.pretty else None)
    sys.stdout.write("\n")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from pathlib import Path

    config = _load(args)
    result = asyncio.run(
        _with_store(config, lambda store: store.people.forget(args.platform, args.user))
    )
    for path in result.image_paths:
        Path(path).unlink(missing_ok=True)
    print(
        f"deleted {result.messages} messages, {result.conversations} conversations "
        f"and {result.draws} pictures of {args.platform} user {args.user}"
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from bot.doctor import run_checks

    return asyncio.run(run_checks(_load(args), args.config))


class _Parser(argparse.ArgumentParser):
    """Every parser, subcommands included, takes the global options, so both
    `aigc-bot --config PATH run` and `aigc-bot run --config PATH` work. Their
    defaults are set once, on the top parser; a value given after the
    subcommand wins."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--config",
            default=argparse.SUPPRESS,
            help="config file (default: $AIGC_BOT_CONFIG or ./config.toml)",
        )
        self.add_argument(
            "--log-level",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            default=argparse.SUPPRESS,
            help="log level (default: [bot] log_level)",
        )

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", _Parser)
        return super().add_subparsers(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aigc-bot", description=__doc__.splitlines()[0])
    parser.set_defaults(config=None, log_level=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="run every enabled channel until SIGINT/SIGTERM").set_defaults(
        func=cmd_run
    )
    chat = sub.add_parser("chat", help="talk to the bot on stdin/stdout")
    chat.add_argument("--user", default="local", help="the console user's id (default: local)")
    chat.set_defaults(func=cmd_chat)
    for name, func, verb in (
        ("export", cmd_export, "print as JSON"),
        ("forget", cmd_forget, "delete"),
    ):
        command = sub.add_parser(name, help=f"{verb} everything stored about one user")
        command.add_argument("--platform", required=True, help="console, web, telegram or discord")
        command.add_argument("--user", required=True, help="the user's id on that platform")
        if name == "export":
            command.add_argument("--pretty", action="store_true", help="indent the JSON")
        command.set_defaults(func=func)
    sub.add_parser("doctor", help="check config, database, model, GPU and tokens").set_defaults(
        func=cmd_doctor
    )
    _add_optional(sub, "bot.training.cli", "add_subcommands")
    _add_optional(sub, "bot.bench", "add_subcommand")
    _add_optional(sub, "bot.knowledge.cli", "add_subcommands")
    _add_optional(sub, "bot.governance.cli", "add_subcommands")
    return parser


def _add_optional(sub: Any, module: str, function: str) -> None:
    """Subcommands whose modules pull in heavy dependencies register themselves."""
    import importlib

    try:
        register = getattr(importlib.import_module(module), function)
    except ImportError:
        return
    register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from bot.app import StartupError
    from bot.engines import EngineUnavailable
    from storage import StorageUnavailable

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"aigc-bot: config error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except (StartupError, EngineUnavailable) as exc:
        print(f"aigc-bot: {redact(str(exc))}", file=sys.stderr)
        return 1
    except StorageUnavailable as exc:
        print(f"aigc-bot: storage.url: the database cannot be reached ({exc})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
