"""What the operator API and its events say about conversations and messages.

Events travel on the bus topic `handoff` (every `aigc-bot run` process's
consoles see them) and are JSON objects:

    {"type": "conversation", "conversation": {...}}          a state changed
    {"type": "message", "conversation": {...}, "message": {...}}
                                                             a user wrote while
                                                             held, or an operator
                                                             answered
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage import StoredMessage, iso
from storage.handoff import AuditEntry, HandoffSummary

TOPIC = "handoff"
STATES = ("waiting", "claimed", "bot")


@dataclass(frozen=True, slots=True)
class ConversationView:
    id: int
    platform: str
    chat_id: str
    user_id: str
    user_name: str
    state: str
    since: str
    last_text: str
    #: Who holds it (state "claimed"), else None.
    operator: str | None

    @classmethod
    def of(cls, summary: HandoffSummary) -> ConversationView:
        return cls(
            id=summary.id,
            platform=summary.platform,
            chat_id=summary.chat_id,
            user_id=summary.user_id,
            user_name=summary.user_name,
            state=summary.state,
            since=iso(summary.since),
            last_text=summary.last_text,
            operator=summary.operator,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "platform": self.platform,
            "chat_id": self.chat_id,
            "user_id": self.user_id,
            "user_name": self.user_name,
            "state": self.state,
            "since": self.since,
            "last_text": self.last_text,
            "operator": self.operator,
        }


@dataclass(frozen=True, slots=True)
class TranscriptEntry:
    role: str
    text: str
    at: str
    author: str | None = None

    @classmethod
    def of(cls, message: StoredMessage) -> TranscriptEntry:
        role = message.role if message.role in ("user", "operator") else "bot"
        return cls(role, message.text, iso(message.created_at), message.author)

    @classmethod
    def now(cls, role: str, text: str, at: datetime, author: str | None = None) -> TranscriptEntry:
        return cls(role, text, iso(at), author)

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"role": self.role, "text": self.text, "at": self.at}
        if self.author:
            entry["author"] = self.author
        return entry


@dataclass(frozen=True, slots=True)
class Transcript:
    conversation: ConversationView
    messages: list[TranscriptEntry]
    #: The handoff audit trail: who moved it where, when.
    audit: list[AuditEntry]

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversation": self.conversation.as_dict(),
            "messages": [message.as_dict() for message in self.messages],
            "handoff": [
                {
                    "state": entry.state,
                    "operator": entry.operator,
                    "reason": entry.reason,
                    "at": iso(entry.at),
                }
                for entry in self.audit
            ],
        }


def conversation_event(view: ConversationView) -> dict[str, Any]:
    return {"type": "conversation", "conversation": view.as_dict()}


def message_event(view: ConversationView, message: TranscriptEntry) -> dict[str, Any]:
    return {"type": "message", "conversation": view.as_dict(), "message": message.as_dict()}
