"""The contract between platform adapters and the conversation manager.

Adapters translate platform events into `Incoming` and render the `Reply`
values the manager yields; nothing else crosses that boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message as the bot sees it, whatever platform it came from."""

    platform: str
    chat_id: str
    user_id: str
    user_name: str
    text: str
    message_id: str | None = None
    is_private: bool = True
    addressed: bool = True


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Whose history a message joins: one person in one chat, or the whole chat.

    `user_id` is empty when the history is shared by the chat
    (`history_scope = "chat"`).
    """

    platform: str
    chat_id: str
    user_id: str = ""

    @classmethod
    def for_message(cls, incoming: Incoming, scope: Literal["user", "chat"]) -> ConversationKey:
        if scope == "chat" and not incoming.is_private:
            return cls(incoming.platform, incoming.chat_id, "")
        return cls(incoming.platform, incoming.chat_id, incoming.user_id)


@dataclass(frozen=True, slots=True)
class Typing:
    """The bot is working on an answer; adapters show a typing indicator."""


@dataclass(frozen=True, slots=True)
class Text:
    """Reply text. `final=False` marks a partial text while streaming; each
    partial holds the whole text so far, so an adapter may edit in place."""

    text: str
    final: bool = True


@dataclass(frozen=True, slots=True)
class Image:
    """A generated picture as PNG bytes; `path` is where it is stored on disk."""

    png: bytes
    caption: str
    seed: int
    path: str | None = None
    draw_id: str | None = None


class NoticeKind(StrEnum):
    """Why a notice was sent, so adapters can map it (e.g. to an HTTP status)."""

    INFO = "info"
    EMPTY = "empty"
    TOO_LONG = "too_long"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    QUEUED = "queued"
    PROGRESS = "progress"
    BUSY = "busy"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Notice:
    """Something a user should see that is not the bot's answer: queue
    position, limits, errors. `retry_after` is in seconds, when it applies.
    `ref` lets an adapter edit a previous notice of the same request in place."""

    text: str
    kind: NoticeKind = NoticeKind.INFO
    retry_after: float | None = None
    ref: str | None = field(default=None, compare=False)


Reply = Typing | Text | Image | Notice
