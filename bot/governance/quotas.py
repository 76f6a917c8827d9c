"""Daily quotas and flood control (`[limits]`), counted in the database.

    messages_per_day          a person's messages since midnight UTC
    tokens_per_day            tokens the model generated for a person since midnight UTC
    chat_messages_per_minute  messages in one group chat in the last minute (flood control)
    global_tokens_per_day     tokens the model generated for everyone since midnight UTC

Counts come from the stored messages, so several processes on one database
and a restarted bot agree. A person's and a chat's counts are read in one
transaction per message, and only for the limits that are set; the global
count (a sum over the whole day's replies) is cached for `global_ttl_s`
seconds. A quota's refusal carries `retry_after`: the seconds until the day
resets, or until the chat's oldest message leaves the minute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from bot.governance.periods import day_start, duration, until_reset
from storage.governance import GovernanceRecords, UsageCounts

if TYPE_CHECKING:
    from bot.config import LimitsSection
    from bot.messages import Incoming

FLOOD_WINDOW = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class QuotaHit:
    """A quota the message is over. `reason` is the metrics label ("quota" or
    "flood"); `kind` names the limit; `scope` is whom a notice is about."""

    reason: str
    kind: str
    text: str
    retry_after: float
    scope: tuple[str, str, str]


class Quotas:
    def __init__(
        self,
        limits: LimitsSection,
        records: GovernanceRecords,
        clock: Callable[[], datetime],
        *,
        global_ttl_s: float = 2.0,
    ) -> None:
        self.limits = limits
        self.records = records
        self.clock = clock
        self.global_ttl_s = global_ttl_s
        #: (day it counts, tokens, time.monotonic() when read)
        self._global: tuple[datetime, int, float] | None = None
        self._global_lock = asyncio.Lock()

    @property
    def daily(self) -> bool:
        return bool(self.limits.messages_per_day or self.limits.tokens_per_day)

    @property
    def enabled(self) -> bool:
        limits = self.limits
        return bool(self.daily or limits.chat_messages_per_minute or limits.global_tokens_per_day)

    async def check(self, incoming: Incoming) -> QuotaHit | None:
        """The first quota this message is over, or None."""
        limits, now = self.limits, self.clock()
        flood = bool(limits.chat_messages_per_minute) and not incoming.is_private
        if self.daily or flood:
            counts = await self.records.counts(
                incoming.platform,
                incoming.user_id,
                incoming.chat_id,
                day=day_start(now) if self.daily else None,
                window=now - FLOOD_WINDOW if flood else None,
            )
            hit = self._over(incoming, counts, now, flood)
            if hit is not None:
                return hit
        if limits.global_tokens_per_day:
            used = await self.global_tokens(now)
            if used >= limits.global_tokens_per_day:
                wait = until_reset(now)
                return QuotaHit(
                    "quota",
                    "global_tokens",
                    "I've given all the answers I can for today. I'll be back at "
                    f"midnight UTC, in {duration(wait)}.",
                    wait,
                    ("global", incoming.platform, incoming.user_id),
                )
        return None

    def _over(
        self, incoming: Incoming, counts: UsageCounts, now: datetime, flood: bool
    ) -> QuotaHit | None:
        limits = self.limits
        person = (incoming.platform, incoming.chat_id, incoming.user_id)
        if flood and counts.chat_messages >= limits.chat_messages_per_minute:
            oldest = counts.chat_oldest or now
            wait = max(1.0, (oldest + FLOOD_WINDOW - now).total_seconds())
            return QuotaHit(
                "flood",
                "chat_messages",
                f"This chat is sending me more than {limits.chat_messages_per_minute} "
                f"messages a minute. I'll answer again in {duration(wait)}.",
                wait,
                ("chat", incoming.platform, incoming.chat_id),
            )
        wait = until_reset(now)
        if limits.messages_per_day and counts.messages >= limits.messages_per_day:
            return QuotaHit(
                "quota",
                "messages",
                f"You've reached today's limit of {limits.messages_per_day:,} messages. "
                f"It resets at midnight UTC, in {duration(wait)}.",
                wait,
                person,
            )
        if limits.tokens_per_day and counts.tokens >= limits.tokens_per_day:
            return QuotaHit(
                "quota",
                "tokens",
                f"You've used today's {limits.tokens_per_day:,} tokens of answers. "
                f"They renew at midnight UTC, in {duration(wait)}.",
                wait,
                person,
            )
        return None

    async def global_tokens(self, now: datetime) -> int:
        """Everyone's tokens today, read at most every `global_ttl_s` seconds."""
        day = day_start(now)
        async with self._global_lock:  # one read at a time; the others use its result
            cached = self._global
            if (
                cached is not None
                and cached[0] == day
                and time.monotonic() - cached[2] < self.global_ttl_s
            ):
                return cached[1]
            used = await self.records.tokens_since(day)
            self._global = (day, used, time.monotonic())
            return used

    # -- /stats ----------------------------------------------------------------------

    async def usage_lines(self, incoming: Incoming, draws_today: int | None = None) -> list[str]:
        """ "Today: 12 of 50 messages, 3,200 of 10,000 tokens." and what is left."""
        limits, now = self.limits, self.clock()
        used: list[str] = []
        left: list[str] = []
        if self.daily:
            counts = await self.records.counts(
                incoming.platform, incoming.user_id, incoming.chat_id, day=day_start(now)
            )
            for count, limit, noun in (
                (counts.messages, limits.messages_per_day, "messages"),
                (counts.tokens, limits.tokens_per_day, "tokens"),
            ):
                if limit:
                    used.append(f"{count:,} of {limit:,} {noun}")
                    left.append(f"{max(0, limit - count):,} {noun}")
        if draws_today is not None and limits.draws_per_day:
            used.append(f"{draws_today:,} of {limits.draws_per_day:,} pictures")
            left.append(f"{max(0, limits.draws_per_day - draws_today):,} pictures")
        lines = []
        if used:
            lines.append("Today: " + ", ".join(used) + ".")
            lines.append(
                f"Left: {', '.join(left)}; resets at midnight UTC, in {duration(until_reset(now))}."
            )
        if limits.global_tokens_per_day:
            everyone = await self.global_tokens(now)
            lines.append(
                f"Everyone together today: {everyone:,} of {limits.global_tokens_per_day:,} tokens."
            )
        return lines
