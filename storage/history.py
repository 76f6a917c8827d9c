"""The newest turns of the conversations this process serves, kept in memory.

Building a prompt needs a conversation's newest turns before every reply;
reading them back from the database was most of the store's work per
message. `RecentTurns` keeps them for the most recently used conversations
(LRU, `capacity` conversations) and is told of every message the store writes,
so the prompt is built without a read.

It never serves what the database would not: every write that changes a
conversation's messages moves `conversations.version` by one, in the same
transaction (storage.conversations, storage.people), and an entry is only
extended by a write that found the version the entry holds. A write that
found another version (another process wrote, a CLI `forget` deleted) drops
the entry, and the next read fills it again from the database. Where several
processes share conversations (PostgreSQL) the reader also checks the version
before it trusts an entry. Everything here runs on the event loop.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.conversations import StoredMessage

#: Conversations kept when nobody says otherwise (`[storage] history_cache`).
DEFAULT_CONVERSATIONS = 1000
#: People remembered per conversation (a big group chat's are forgotten past
#: this, which only means their users row is written again).
MAX_KNOWN_USERS = 256
#: Rows read beyond the asked-for limit when an entry is filled: room for the
#: messages that sort after the one being answered (queued ones, say).
FILL_SLACK = 16


def turn_key(message: StoredMessage, reply_to_id: int | None) -> tuple[int, int]:
    """Where a message sorts in history: a reply right after the message it answers."""
    return (reply_to_id if reply_to_id is not None else message.id, message.id)


@dataclass(slots=True)
class _Entry:
    #: The conversation's `version` these messages are as of.
    version: int
    #: The newest messages in turn order, with their sort keys.
    keys: list[tuple[int, int]] = field(default_factory=list)
    messages: list[StoredMessage] = field(default_factory=list)
    #: Nothing older than `messages[0]` exists (the conversation starts here).
    complete: bool = False
    #: How many messages to keep: the largest limit read, plus `FILL_SLACK`.
    keep: int = FILL_SLACK
    #: (user id, name) of the people whose `users` row this process wrote
    #: along with one of their messages here, since `version` was last ours
    #: alone: forgetting them would have deleted that message, moving the version.
    users: set[tuple[str, str]] = field(default_factory=set)

    def add(self, key: tuple[int, int], message: StoredMessage) -> None:
        at = bisect_left(self.keys, key)
        if at < len(self.keys) and self.keys[at] == key:
            return  # a fill read it already
        if at == 0 and self.keys and not self.complete:
            return  # sorts before the window, which stays whole without it
        self.keys.insert(at, key)
        self.messages.insert(at, message)
        self.trim()

    def trim(self) -> None:
        extra = len(self.messages) - self.keep
        if extra > 0:
            del self.keys[:extra]
            del self.messages[:extra]
            self.complete = False

    def window(self, before_id: int | None, limit: int) -> list[StoredMessage] | None:
        """What `Conversations.history(before_id=..., limit=...)` would read, or
        None when this entry does not hold all of it."""
        end = len(self.keys) if before_id is None else bisect_left(self.keys, (before_id, -1))
        if end >= limit:
            return self.messages[end - limit : end]
        if self.complete:
            return self.messages[:end]
        return None


class RecentTurns:
    """Per-conversation newest turns, LRU-bounded to `capacity` conversations (0 = off)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        #: conversation key -> the id of its active conversation, as last written
        self._ids: OrderedDict[Hashable, int] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._evict()

    def clear(self) -> None:
        self._entries.clear()
        self._ids.clear()

    def version(self, conversation_id: int) -> int | None:
        entry = self._entries.get(conversation_id)
        return entry.version if entry is not None else None

    def read(
        self, conversation_id: int, before_id: int | None, limit: int
    ) -> list[StoredMessage] | None:
        found = self.peek(conversation_id, before_id, limit)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(conversation_id)
        return found

    def peek(
        self, conversation_id: int, before_id: int | None, limit: int
    ) -> list[StoredMessage] | None:
        """`read` without counting it or touching the LRU order."""
        entry = self._entries.get(conversation_id)
        return entry.window(before_id, limit) if entry is not None else None

    def fill(
        self,
        conversation_id: int,
        version: int,
        rows: Sequence[tuple[tuple[int, int], StoredMessage]],
        *,
        asked: int,
    ) -> None:
        """Install what was read: the newest `asked` messages of the
        conversation (fewer: all of them), read after its `version`."""
        if not self.capacity:
            return
        rows = sorted(rows, key=lambda row: row[0])
        entry = _Entry(
            version,
            [key for key, _ in rows],
            [message for _, message in rows],
            complete=len(rows) < asked,
            keep=asked,
        )
        self._entries[conversation_id] = entry
        self._entries.move_to_end(conversation_id)
        self._evict()

    def wants(self, conversation_id: int, limit: int) -> None:
        """Keep at least `limit` messages (plus slack) of this conversation."""
        entry = self._entries.get(conversation_id)
        if entry is not None and entry.keep < limit + FILL_SLACK:
            entry.keep = limit + FILL_SLACK

    def started(self, key: Hashable, conversation_id: int, version: int) -> None:
        """A conversation was just created, with no messages, at `version`."""
        self._remember(key, conversation_id)
        if not self.capacity:
            return
        self._entries[conversation_id] = _Entry(version, complete=True)
        self._entries.move_to_end(conversation_id)
        self._evict()

    def wrote(
        self,
        conversation_id: int,
        before: int,
        after: int,
        added: StoredMessage | None = None,
        reply_to_id: int | None = None,
        *,
        key: Hashable | None = None,
        user: tuple[str, str] | None = None,
    ) -> None:
        """This process moved the conversation from version `before` to `after`,
        adding `added` (or nothing) from `user`, whose `users` row it wrote
        or knew. An entry that was not at `before` missed someone else's
        write and is dropped."""
        if key is not None:
            self._remember(key, conversation_id)
        entry = self._entries.get(conversation_id)
        if entry is None:
            return
        if entry.version == after:  # filled after this write: it has it already
            pass
        elif entry.version != before:
            del self._entries[conversation_id]
            return
        entry.version = after
        if added is not None:
            entry.add(turn_key(added, reply_to_id), added)
            if user is not None:
                if len(entry.users) >= MAX_KNOWN_USERS:
                    entry.users.clear()
                entry.users.add(user)
        self._entries.move_to_end(conversation_id)

    def known_user(self, key: Hashable, user: tuple[str, str]) -> tuple[int, int] | None:
        """(conversation id, version) as of which `user` (id, name) surely has
        their `users` row as written, for the conversation last written under
        `key`; None when that is not known."""
        conversation_id = self._ids.get(key)
        entry = self._entries.get(conversation_id) if conversation_id is not None else None
        if entry is None or user not in entry.users:
            return None
        assert conversation_id is not None
        return conversation_id, entry.version

    def drop(self, conversation_id: int) -> None:
        self._entries.pop(conversation_id, None)

    def drop_key(self, key: Hashable) -> None:
        """Forget the conversation last written under `key` (a write whose
        outcome is unknown: it failed, or was cancelled, mid-way)."""
        conversation_id = self._ids.pop(key, None)
        if conversation_id is not None:
            self._entries.pop(conversation_id, None)

    def _remember(self, key: Hashable, conversation_id: int) -> None:
        self._ids[key] = conversation_id
        self._ids.move_to_end(key)
        while len(self._ids) > max(self.capacity, 0):
            self._ids.popitem(last=False)

    def _evict(self) -> None:
        while len(self._entries) > max(self.capacity, 0):
            self._entries.popitem(last=False)
