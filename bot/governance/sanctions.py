"""Bans and muted chats: stored in the database, read from memory.

The message path asks `banned()` and `muted()` for every message, so both
answer from an in-memory copy: no database round trip. The copy is loaded at
start, changed at once by this process's own `/ban`, `/unban` and `/mute`,
and reloaded every `refresh_s` seconds, so a ban or mute made by another
process (on the same PostgreSQL) applies here within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from storage import StorageUnavailable
from storage.governance import GovernanceRecords

log = logging.getLogger(__name__)


class Sanctions:
    def __init__(
        self,
        records: GovernanceRecords,
        clock: Callable[[], datetime],
        *,
        refresh_s: float = 5.0,
    ) -> None:
        self.records = records
        self.clock = clock
        self.refresh_s = refresh_s
        self._bans: frozenset[tuple[str, str]] = frozenset()
        self._mutes: dict[tuple[str, str], datetime] = {}
        self._task: asyncio.Task[None] | None = None
        #: Bumped by every local change, so a reload that started before it
        #: does not overwrite it with older rows.
        self._version = 0

    async def start(self) -> None:
        await self.reload()
        if self.refresh_s > 0:
            self._task = asyncio.create_task(self._refresh(), name="governance-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> None:
        """Read bans and active mutes from the database."""
        version = self._version
        bans = await self.records.bans()
        mutes = await self.records.active_mutes(self.clock())
        if version != self._version:
            return  # changed meanwhile: the next reload picks it up
        self._bans = frozenset((ban.platform, ban.user_id) for ban in bans)
        self._mutes = {(mute.platform, mute.chat_id): mute.until for mute in mutes}

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.reload()
            except StorageUnavailable as exc:
                log.warning("could not reload bans and mutes (keeping the last ones): %s", exc)

    # -- the message path ------------------------------------------------------------

    def banned(self, platform: str, user_id: str) -> bool:
        return (platform, user_id) in self._bans

    def muted(self, platform: str, chat_id: str) -> datetime | None:
        """Until when the chat is muted, or None."""
        until = self._mutes.get((platform, chat_id))
        if until is None:
            return None
        if until <= self.clock():
            self._mutes.pop((platform, chat_id), None)
            return None
        return until

    @property
    def bans(self) -> frozenset[tuple[str, str]]:
        return self._bans

    # -- changes (admin commands) ------------------------------------------------------

    async def ban(self, platform: str, user_id: str, *, by: str, reason: str) -> bool:
        """False when they were banned already."""
        added = await self.records.add_ban(platform, user_id, by=by, reason=reason)
        self._version += 1
        self._bans = self._bans | {(platform, user_id)}
        return added

    async def unban(self, platform: str, user_id: str) -> bool:
        """False when they were not banned."""
        removed = await self.records.remove_ban(platform, user_id)
        self._version += 1
        self._bans = self._bans - {(platform, user_id)}
        return removed

    async def mute(self, platform: str, chat_id: str, *, until: datetime, by: str) -> None:
        await self.records.set_mute(platform, chat_id, until=until, by=by)
        self._version += 1
        self._mutes[(platform, chat_id)] = until

    async def unmute(self, platform: str, chat_id: str) -> bool:
        """False when the chat was not muted."""
        removed = await self.records.remove_mute(platform, chat_id)
        self._version += 1
        was_muted = self._mutes.pop((platform, chat_id), None) is not None
        return removed or was_muted
