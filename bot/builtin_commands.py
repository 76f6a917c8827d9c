"""The commands every channel has: /start, /help, /reset, /forget, /draw,
/stats and /cancel. Services register their own (/human, /ban, ...) in the
same registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from bot import texts
from bot.commands import CommandCall, CommandSpec
from bot.draw.options import USAGE as DRAW_USAGE
from bot.messages import Notice, NoticeKind, Reply, Text

if TYPE_CHECKING:
    from bot.manager import ConversationManager


def register_builtin_commands(manager: ConversationManager) -> None:
    handlers = BuiltinCommands(manager)
    for spec in (
        CommandSpec("start", "/start", "say hello and see what I can do", handlers.start),
        CommandSpec("help", "/help", "list the commands", handlers.help),
        CommandSpec(
            "reset",
            "/reset",
            "start a new conversation (the old one is kept for export)",
            handlers.reset,
        ),
        CommandSpec(
            "forget", "/forget", "delete everything I have stored about you", handlers.forget
        ),
        CommandSpec(
            "draw", DRAW_USAGE, "draw a picture", handlers.draw, personal=False, takes_args=True
        ),
        CommandSpec("stats", "/stats", "your usage", handlers.stats),
        CommandSpec("cancel", "/cancel", "drop your queued or running request", handlers.cancel),
    ):
        if spec.name not in manager.commands:
            manager.commands.register(spec)


class BuiltinCommands:
    def __init__(self, manager: ConversationManager) -> None:
        self.manager = manager
        self.config = manager.config
        self.store = manager.store

    async def start(self, call: CommandCall) -> AsyncIterator[Reply]:
        yield Text(self.config.bot.welcome)

    async def help(self, call: CommandCall) -> AsyncIterator[Reply]:
        yield Text(self.manager.commands.help_text(self.config.bot.name, is_admin=call.is_admin))

    async def cancel(self, call: CommandCall) -> AsyncIterator[Reply]:
        incoming = call.incoming
        manager = self.manager
        count = manager.tickets.cancel((incoming.platform, incoming.user_id))
        if manager.drawer is not None:
            count += manager.drawer.cancel(incoming.platform, incoming.user_id)
        if manager.handoff is not None:
            key = manager.conversation.key_for(incoming)
            conversation_id, state = await self.store.conversations.ensure_active(
                key.platform, key.chat_id, key.user_id, incoming.address.as_dict()
            )
            if state != "bot":
                for reply in await manager.handoff.give_back(incoming, conversation_id):
                    yield reply
                return
        if not count:
            yield Text(texts.NOTHING_TO_CANCEL)
        else:
            yield Text(f"Cancelled {count} request{'s' if count > 1 else ''}.")

    async def reset(self, call: CommandCall) -> AsyncIterator[Reply]:
        conversation = self.manager.conversation
        key = conversation.key_for(call.incoming)
        handoff = self.manager.handoff
        if handoff is not None:  # a conversation people hold goes back to the bot first
            conversation_id, state = await self.store.conversations.ensure_active(
                key.platform, key.chat_id, key.user_id
            )
            if state != "bot":
                await handoff.give_back(call.incoming, conversation_id)
        async with conversation.admit_locks.hold(key), conversation.turn_locks.hold(key):
            await self.store.conversations.reset(key.platform, key.chat_id, key.user_id)
        yield Text(
            "Started a new conversation. I won't remember what we said before "
            "(it's still stored; /forget deletes it)."
        )

    async def forget(self, call: CommandCall) -> AsyncIterator[Reply]:
        incoming = call.incoming
        self.manager.tickets.cancel((incoming.platform, incoming.user_id))
        if self.manager.drawer is not None:
            self.manager.drawer.cancel(incoming.platform, incoming.user_id)
        result = await self.store.people.forget(incoming.platform, incoming.user_id)
        if incoming.platform == "web":  # a web visitor's session is theirs alone
            await self.store.sessions.delete_for_user(incoming.user_id)
        await asyncio.to_thread(_remove_files, result.image_paths)
        yield Text(
            f"Done: I deleted everything I had stored about you "
            f"({result.messages} messages, {result.draws} pictures)."
        )

    async def stats(self, call: CommandCall) -> AsyncIterator[Reply]:
        incoming = call.incoming
        stats = await self.store.people.stats(incoming.platform, incoming.user_id)
        since = f" since {stats.first_seen:%Y-%m-%d}" if stats.first_seen else ""
        lines = [
            f"Your usage{since}: {stats.messages} messages, {stats.replies} replies, "
            f"{stats.conversations} conversations, {stats.draws} pictures."
        ]
        if self.manager.governance is not None:
            lines += await self.manager.governance.usage_lines(incoming)
        yield Text("\n".join(lines))

    async def draw(self, call: CommandCall) -> AsyncIterator[Reply]:
        manager = self.manager
        if manager.drawer is None:
            yield Notice(texts.DRAW_OFF, NoticeKind.UNAVAILABLE)
            return
        if manager.governance is not None and call.args:
            blocked = await manager.governance.moderate(call.incoming, call.args, "draw")
            if blocked is not None:
                yield Text(blocked)
                return
        async for reply in manager.drawer.handle(call.incoming, call.args):
            yield reply


def _remove_files(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
