"""The contract between platform adapters and the conversation manager.

Adapters translate platform events into `Incoming` and render the `Reply`
values the manager yields (on the request path, or pushed later to an
`Address`); nothing else crosses that boundary.
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
    #: Telegram forum topic (or another platform's sub-thread) the message came from.
    thread_id: str = ""
    #: A second copy of this message (same `message_id`) gets the first one's
    #: answer again: a client's retry (web `Idempotency-Key`). Platforms that
    #: redeliver after a crash leave it False: what was sent is not sent twice.
    answer_duplicates: bool = False

    @property
    def address(self) -> Address:
        """Where replies to this message go on its platform."""
        return Address(self.platform, self.chat_id, self.user_id, self.thread_id)

    @property
    def sender(self) -> str:
        """`<platform>:<user id>`, the form config lists use."""
        return f"{self.platform}:{self.user_id}"


@dataclass(frozen=True, slots=True)
class Address:
    """A place on a platform that replies can be pushed to at any time:
    the chat (Telegram chat id, Discord channel id, web session user id), the
    person, and a sub-thread. Stored with each conversation."""

    platform: str
    chat_id: str
    user_id: str = ""
    thread_id: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"chat_id": self.chat_id, "user_id": self.user_id, "thread_id": self.thread_id}

    @classmethod
    def from_dict(cls, platform: str, data: dict[str, str]) -> Address:
        return cls(
            platform,
            str(data.get("chat_id", "")),
            str(data.get("user_id", "")),
            str(data.get("thread_id", "")),
        )


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
class Source:
    """Where a reply came from: the dialogue `model`, an `faq` entry (`id`),
    a `suggestion` of FAQ entries (`ids`), or an `operator`."""

    kind: Literal["model", "faq", "suggestion", "operator"]
    id: str = ""
    ids: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        if self.kind == "faq":
            return {"kind": "faq", "id": self.id}
        if self.kind == "suggestion":
            return {"kind": "suggestion", "ids": list(self.ids)}
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, object] | None) -> Source | None:
        if not data or data.get("kind") not in ("model", "faq", "suggestion", "operator"):
            return None
        ids = data.get("ids")
        return cls(
            kind=data["kind"],  # type: ignore[arg-type]
            id=str(data.get("id", "")),
            ids=tuple(str(i) for i in ids) if isinstance(ids, list) else (),
        )


MODEL = Source("model")


@dataclass(frozen=True, slots=True)
class Text:
    """Reply text. `final=False` marks a partial text while streaming; each
    partial holds the whole text so far, so an adapter may edit in place.
    `role` is "bot" or "operator" (then `author` names the person)."""

    text: str
    final: bool = True
    source: Source | None = None
    role: Literal["bot", "operator"] = "bot"
    author: str = ""


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
    FORBIDDEN = "forbidden"
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
