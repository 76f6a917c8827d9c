"""Who may talk to the bot, and where (`[access]`): pure config, no storage.

A person is checked first (`users_deny`, then `users_allow` when it is not
empty), then the chat (`chats_deny`; then `groups` and `chats_allow`):

    groups = "all"      every chat, unless `chats_allow` is not empty: then
                        only the chats it names (private chats included)
    groups = "private"  private chats only
    groups = "listed"   private chats, and the group chats `chats_allow` names

Entries are "<platform>:<id>": a user id, or a chat id (a Telegram chat, a
Discord channel; on the web a visitor's chat id is their user id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bot.config.governance import AccessSection
    from bot.messages import Incoming


@dataclass(frozen=True, slots=True)
class Outside:
    """Why a message is from outside the bot's audience. `scope` says whom the
    refusal is about: the person ("user") or the whole chat ("chat")."""

    scope: Literal["user", "chat"]
    why: str


class AccessPolicy:
    def __init__(self, section: AccessSection) -> None:
        self.users_allow = frozenset(section.users_allow)
        self.users_deny = frozenset(section.users_deny)
        self.chats_allow = frozenset(section.chats_allow)
        self.chats_deny = frozenset(section.chats_deny)
        self.groups = section.groups

    @property
    def enabled(self) -> bool:
        return bool(
            self.users_allow
            or self.users_deny
            or self.chats_allow
            or self.chats_deny
            or self.groups != "all"
        )

    def check(self, incoming: Incoming) -> Outside | None:
        """None when the message may be answered; else why not."""
        sender = incoming.sender
        if sender in self.users_deny:
            return Outside("user", "in access.users_deny")
        if self.users_allow and sender not in self.users_allow:
            return Outside("user", "not in access.users_allow")
        chat = f"{incoming.platform}:{incoming.chat_id}"
        if chat in self.chats_deny:
            return Outside("chat", "chat in access.chats_deny")
        if incoming.is_private:
            if self.groups == "all" and self.chats_allow and chat not in self.chats_allow:
                return Outside("chat", "chat not in access.chats_allow")
            return None
        if self.groups == "private":
            return Outside("chat", 'group chat while access.groups = "private"')
        if (self.groups == "listed" or self.chats_allow) and chat not in self.chats_allow:
            return Outside("chat", "group chat not in access.chats_allow")
        return None
