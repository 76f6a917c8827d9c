"""The admin commands: /ban, /unban, /mute and /usage.

They are registered with `admin=True`, so the registry refuses them politely
to everyone but `[bot] admins` and /help shows them to admins only. Every
change is written to the audit log with the admin who made it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING

from bot.commands import CommandCall, CommandRegistry, CommandSpec
from bot.governance.errors import GovernanceError
from bot.governance.periods import duration, parse_since
from bot.messages import Reply, Text

if TYPE_CHECKING:
    from bot.governance.service import GovernanceService

_TARGET = re.compile(r"^(?P<platform>[A-Za-z][A-Za-z0-9_-]*):(?P<user>\S+)$")
#: The longest /mute: a year.
MAX_MUTE_MINUTES = 525_600
BAN_USAGE = "/ban <platform>:<user id> [reason]"
UNBAN_USAGE = "/unban <platform>:<user id>"
MUTE_USAGE = "/mute <minutes>"
USAGE_USAGE = "/usage [today | Nd | YYYY-MM-DD]"


def _target(args: str) -> tuple[str, str, str] | None:
    """`platform:user [reason]` -> (platform, user id, reason)."""
    first, _, reason = args.strip().partition(" ")
    match = _TARGET.match(first)
    if match is None:
        return None
    return match["platform"].lower(), match["user"], reason.strip()


def register_admin_commands(service: GovernanceService, commands: CommandRegistry) -> None:
    handlers = AdminCommands(service)
    for name, usage, summary, handler in (
        ("ban", BAN_USAGE, "stop someone using the bot", handlers.ban),
        ("unban", UNBAN_USAGE, "lift a ban", handlers.unban),
        ("mute", MUTE_USAGE, "keep the bot quiet in this chat (/mute 0 lifts it)", handlers.mute),
        ("usage", USAGE_USAGE, "messages and tokens per person and chat", handlers.usage),
    ):
        commands.register(CommandSpec(name, usage, summary, handler, admin=True, takes_args=True))


class AdminCommands:
    def __init__(self, service: GovernanceService) -> None:
        self.service = service

    async def ban(self, call: CommandCall) -> AsyncIterator[Reply]:
        target = _target(call.args)
        if target is None:
            yield Text(f"Usage: {BAN_USAGE}, e.g. /ban telegram:123456 spam")
            return
        platform, user_id, reason = target
        who = f"{platform}:{user_id}"
        if who in self.service.admins:
            yield Text(f"{who} is one of the bot's admins ([bot] admins), so they can't be banned.")
            return
        added = await self.service.ban(platform, user_id, by=call.incoming.sender, reason=reason)
        if not added:
            yield Text(f"{who} is banned already.")
            return
        yield Text(f"Banned {who}. They get one short answer, then silence. /unban {who} lifts it.")

    async def unban(self, call: CommandCall) -> AsyncIterator[Reply]:
        target = _target(call.args)
        if target is None:
            yield Text(f"Usage: {UNBAN_USAGE}")
            return
        platform, user_id, _ = target
        who = f"{platform}:{user_id}"
        if await self.service.unban(platform, user_id, by=call.incoming.sender):
            yield Text(f"Unbanned {who}: they can use the bot again.")
        else:
            yield Text(f"{who} was not banned.")

    async def mute(self, call: CommandCall) -> AsyncIterator[Reply]:
        words = call.args.split()
        if len(words) != 1 or not words[0].isdigit() or int(words[0]) > MAX_MUTE_MINUTES:
            yield Text(f"Usage: {MUTE_USAGE} (0 to {MAX_MUTE_MINUTES:,}; /mute 0 lifts a mute)")
            return
        minutes = int(words[0])
        incoming = call.incoming
        if minutes == 0:
            lifted = await self.service.unmute(incoming, by=incoming.sender)
            yield Text("I'll answer here again." if lifted else "This chat was not muted.")
            return
        until = await self.service.mute(incoming, timedelta(minutes=minutes), by=incoming.sender)
        yield Text(
            f"Muted this chat for {duration(minutes * 60)} (until {until:%Y-%m-%d %H:%M} UTC): "
            "I won't answer anyone here but admins. /mute 0 lifts it."
        )

    async def usage(self, call: CommandCall) -> AsyncIterator[Reply]:
        now = self.service.clock()
        try:
            since = parse_since(call.args or "today", now)
        except GovernanceError as exc:
            yield Text(f"{exc}. Usage: {USAGE_USAGE}")
            return
        totals = await self.service.store.governance.totals(since, limit=10)
        lines = [
            f"Since {since:%Y-%m-%d %H:%M} UTC: {totals.messages:,} messages, "
            f"{totals.tokens:,} tokens."
        ]
        for title, rows in (("People", totals.users), ("Chats", totals.chats)):
            if not rows:
                continue
            lines.append(f"{title}:")
            for row in rows:
                name = f" ({row.name})" if row.name else ""
                lines.append(
                    f"{row.platform}:{row.id}{name} — {row.messages:,} messages, "
                    f"{row.tokens:,} tokens"
                )
        yield Text("\n".join(lines))
