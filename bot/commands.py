"""The commands every channel understands, parsed the same way everywhere."""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMMAND = re.compile(
    r"^/(?P<name>[A-Za-z0-9_]+)(?:@(?P<bot>[A-Za-z0-9_]+))?(?:\s+(?P<args>.*))?$", re.S
)


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: str
    addressed_to: str | None


@dataclass(frozen=True, slots=True)
class CommandInfo:
    name: str
    usage: str
    summary: str


COMMANDS: tuple[CommandInfo, ...] = (
    CommandInfo("start", "/start", "say hello and see what I can do"),
    CommandInfo("help", "/help", "list the commands"),
    CommandInfo("reset", "/reset", "start a new conversation (the old one is kept for export)"),
    CommandInfo("forget", "/forget", "delete everything I have stored about you"),
    CommandInfo(
        "draw",
        "/draw <prompt> [--seed N] [--steps N] [--size WxH] [--negative TEXT] [--guidance X]",
        "draw a picture",
    ),
    CommandInfo("stats", "/stats", "your usage"),
    CommandInfo("cancel", "/cancel", "drop your queued or running request"),
)
KNOWN = {info.name for info in COMMANDS}


def parse_command(text: str) -> Command | None:
    """`/name@bot args` -> Command, or None when the text is not a command."""
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    return Command(
        name=match["name"].lower(),
        args=(match["args"] or "").strip(),
        addressed_to=match["bot"],
    )


def help_text(bot_name: str) -> str:
    lines = [f"I'm {bot_name}. Just write to me and I'll answer. Commands:"]
    lines += [f"{info.usage} — {info.summary}" for info in COMMANDS]
    return "\n".join(lines)
