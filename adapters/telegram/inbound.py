"""Which Telegram messages are for the bot, and what they say to it.

A private chat always is. In a group, a message is for the bot when it is a
command (`/cmd`, or `/cmd@thisbot` — never `/cmd@otherbot`), mentions the bot,
replies to one of its messages, or starts with one of `[telegram] keywords`
(e.g. "bot,"); with `[bot] group_messages = "all"` every text is. Bots and
service messages (joins, pins, new titles) never are.
"""

from __future__ import annotations

import re

from telegram import Message
from telegram.constants import ChatType, MessageEntityType

from adapters.keywords import strip_keyword
from bot.commands import parse_command
from bot.config import Config
from bot.messages import Incoming

PLATFORM = "telegram"


def mentions(message: Message, username: str) -> bool:
    """Whether the text or caption has an @mention of `username`."""
    wanted = "@" + username.lower()
    found = {
        **message.parse_entities([MessageEntityType.MENTION]),
        **message.parse_caption_entities([MessageEntityType.MENTION]),
    }
    return any(text.lower() == wanted for text in found.values())


def replies_to(message: Message, bot_id: int) -> bool:
    """Whether the message answers one of the bot's own messages."""
    original = message.reply_to_message
    if original is None or original.from_user is None:
        return False
    if message.is_topic_message and original.message_id == message.message_thread_id:
        return False  # every message in a forum topic "replies" to the topic's first message
    return original.from_user.id == bot_id


def strip_mention(text: str, username: str) -> str:
    """The text without `@username` (and a comma or colon right after it)."""
    pattern = re.compile(rf"[ \t]*(?<![\w@])@{re.escape(username)}\b[,:;]?[ \t]*", re.IGNORECASE)
    return pattern.sub(" ", text).strip()


class Reader:
    """Turns one Telegram message into an `Incoming`, or None when it is not for the bot."""

    def __init__(self, config: Config, username: str, bot_id: int) -> None:
        self.config = config
        self.username = username
        self.bot_id = bot_id

    def read(self, message: Message, *, edited: bool = False) -> Incoming | None:
        user = message.from_user
        if user is None or user.is_bot:
            return None
        if message.text is None and message.effective_attachment is None:
            return None  # a service message: someone joined, a pin, a new title...
        private = message.chat.type == ChatType.PRIVATE
        body = message.text or message.caption or ""
        command = parse_command(body)
        if (
            command is not None
            and command.addressed_to is not None
            and command.addressed_to.lower() != self.username.lower()
            and not private
        ):
            return None  # /cmd@another_bot
        text = strip_mention(message.text, self.username) if message.text else ""
        keyword_text = None
        if not private and message.text and command is None:
            keyword_text = strip_keyword(message.text, self.config.telegram.keywords)
        addressed = (
            private
            or command is not None
            or mentions(message, self.username)
            or replies_to(message, self.bot_id)
            or keyword_text is not None
        )
        if not addressed and self.config.bot.group_messages == "addressed":
            return None
        if keyword_text is not None:
            text = keyword_text
        message_id = str(message.message_id)
        if edited and message.edit_date is not None:
            # an edit answered like a new message is a message of its own
            message_id += f".e{int(message.edit_date.timestamp())}"
        return Incoming(
            platform=PLATFORM,
            chat_id=str(message.chat_id),
            user_id=str(user.id),
            user_name=user.full_name,
            text=text,
            message_id=message_id,
            is_private=private,
            addressed=addressed,
            thread_id=str(message.message_thread_id) if message.is_topic_message else "",
        )
