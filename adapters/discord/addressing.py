"""Which Discord messages are for the bot, and what they say to it.

A DM always is. In a guild channel — if `[discord] channels` lists it, or its
parent channel for a thread, or the list is empty — a message is for the bot
when it mentions the bot or the bot's role, replies to one of the bot's
messages, starts with one of `[discord] keywords`, or the channel's
`respond_to` (from `channel_respond_to`, else `respond_to`) is "all". Bots
(this one included) and system messages never are; `@everyone` alone does not
count as a mention.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import discord

from adapters.keywords import strip_keyword
from bot.config import DiscordSection

ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def channel_ids(channel: Any) -> set[str]:
    """The channel and, for a thread, its parent: either one counts for config."""
    ids = {str(channel.id)} if channel is not None else set()
    parent = getattr(channel, "parent_id", None)
    if parent:
        ids.add(str(parent))
    return ids


class Addressing:
    def __init__(self, settings: DiscordSection) -> None:
        self.settings = settings
        self.listed = set(settings.channels)

    def allowed(self, channel: Any) -> bool:
        """May the bot answer in this guild channel at all?"""
        return not self.listed or bool(channel_ids(channel) & self.listed)

    def respond_to(self, channel: Any) -> str:
        overrides = self.settings.channel_respond_to
        for key in (str(channel.id), str(getattr(channel, "parent_id", "") or "")):
            if key in overrides:
                return overrides[key]
        return self.settings.respond_to

    def text_for_bot(self, message: discord.Message, my_id: int) -> str | None:
        """What the message says to the bot, or None when it is not for the bot."""
        if message.author.bot or message.author.id == my_id:
            return None
        if message.type not in ANSWERED_TYPES:
            return None
        self_role = message.guild.self_role if message.guild is not None else None
        if message.guild is not None:
            if not self.allowed(message.channel):
                return None
            mentioned = any(user.id == my_id for user in message.mentions) or (
                self_role is not None and self_role in message.role_mentions
            )
            if not (
                mentioned or replies_to(message, my_id) or self.respond_to(message.channel) == "all"
            ):
                after_keyword = strip_keyword(message.content, self.settings.keywords)
                if after_keyword is None:
                    return None
                return clean_text(message, my_id, None, after_keyword)
        return clean_text(message, my_id, self_role.id if self_role else None)


def replies_to(message: discord.Message, my_id: int) -> bool:
    reference = message.reference
    if reference is None:
        return False
    replied = reference.resolved or reference.cached_message
    return isinstance(replied, discord.Message) and replied.author.id == my_id


def clean_text(
    message: discord.Message, my_id: int, my_role_id: int | None = None, text: str | None = None
) -> str:
    """The message (or `text`) without the bot's mention; other people's mentions as @names."""
    # Only the gap a removed mention leaves closes: indentation elsewhere
    # (code a user pastes) stays as it was.
    text = re.sub(rf"[ \t]*<@!?{my_id}>[ \t]*", " ", message.content if text is None else text)
    if my_role_id is not None:
        text = re.sub(rf"[ \t]*<@&{my_role_id}>[ \t]*", " ", text)
    for user in message.mentions:
        if user.id != my_id:
            # a function, so that a name with backslashes is not read as a template
            text = re.sub(rf"<@!?{user.id}>", _literal("@" + user.display_name), text)
    return text.strip()


def _literal(replacement: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: replacement
