"""The command registry: every `/command` the bot understands, in one table.

Each entry says its name, usage, one-line help, whether it is personal (its
answer is for the sender only: Discord answers it ephemerally), whether only
admins may run it, and the handler that answers it. The manager dispatches
through it, `/help` is written from it, Telegram's command menu and Discord's
slash tree are built from it — so a new command is one `register` call.
Commands are parsed the same way on every channel (`parse_command`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from bot.messages import Incoming, Reply

_COMMAND = re.compile(
    r"^/(?P<name>[A-Za-z0-9_]+)(?:@(?P<bot>[A-Za-z0-9_]+))?(?:\s+(?P<args>.*))?$", re.S
)


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed `/name@bot args`."""

    name: str
    args: str
    addressed_to: str | None


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


@dataclass(frozen=True, slots=True)
class CommandCall:
    """What a handler gets: the message, the words after the command, and
    whether the sender is one of `[bot] admins`."""

    incoming: Incoming
    args: str
    is_admin: bool


Handler = Callable[[CommandCall], AsyncIterator[Reply]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    usage: str
    summary: str
    handler: Handler
    #: The answer is for the sender only (Discord: ephemeral).
    personal: bool = True
    #: Only `[bot] admins` may run it; others get a polite refusal, and /help hides it.
    admin: bool = False
    #: It takes free text after the name (Discord: one optional text option).
    takes_args: bool = False


class CommandRegistry:
    """Commands by name, in the order they were registered."""

    def __init__(self) -> None:
        self._specs: dict[str, CommandSpec] = {}

    def register(self, spec: CommandSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"/{spec.name} is registered twice")
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", spec.name):
            raise ValueError(f"/{spec.name}: names are 1-32 of a-z, 0-9 and _")
        self._specs[spec.name] = spec

    def get(self, name: str) -> CommandSpec | None:
        return self._specs.get(name)

    def __iter__(self) -> Iterator[CommandSpec]:
        return iter(self._specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def public(self) -> list[CommandSpec]:
        """What everyone may run: the menu and the slash tree show these."""
        return [spec for spec in self if not spec.admin]

    def help_text(self, bot_name: str, *, is_admin: bool = False) -> str:
        lines = [f"I'm {bot_name}. Just write to me and I'll answer. Commands:"]
        lines += [f"{spec.usage} — {spec.summary}" for spec in self if not spec.admin]
        admin = [spec for spec in self if spec.admin]
        if is_admin and admin:
            lines.append("Admin commands:")
            lines += [f"{spec.usage} — {spec.summary}" for spec in admin]
        return "\n".join(lines)
