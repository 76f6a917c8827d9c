"""`[handoff] hours`: when people answer, and when they are back.

Entries look like "Mon-Fri 09:00-17:00", "Sat 10:00-14:00" or
"Mon,Wed,Fri 18:00-02:00" (past midnight: the window ends the next day);
"24:00" ends a day. Times are wall-clock times in `[handoff] timezone`, so a
change to or from summer time moves nothing. No entries: always open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ENTRY = re.compile(
    r"^\s*(?P<days>[A-Za-z ,-]+?)\s+(?P<open>\d{1,2}:\d{2})\s*-\s*(?P<close>\d{1,2}:\d{2})\s*$"
)


class HoursError(ValueError):
    """An entry of `[handoff] hours` that cannot be read."""


def _minutes(text: str, entry: str) -> int:
    hours, minutes = (int(part) for part in text.split(":"))
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise HoursError(f"{entry!r}: {text} is not a time of day")
    return hours * 60 + minutes


def _days(text: str, entry: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.split(","):
        ends = [name.strip().lower() for name in part.split("-")]
        if len(ends) not in (1, 2) or any(name not in DAYS for name in ends):
            raise HoursError(f"{entry!r}: days are Mon, Tue, ... Sun, or ranges like Mon-Fri")
        first, last = DAYS.index(ends[0]), DAYS.index(ends[-1])
        day = first
        while True:  # Fri-Mon wraps over the weekend
            days.add(day)
            if day == last:
                break
            day = (day + 1) % 7
    return frozenset(days)


@dataclass(frozen=True, slots=True)
class Window:
    """Open from `start` to `end` (minutes after midnight) on `days` (0 = Monday);
    `end <= start` runs past midnight into the next day."""

    days: frozenset[int]
    start: int
    end: int

    def contains(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        return (weekday in self.days and minute >= self.start) or (
            (weekday - 1) % 7 in self.days and minute < self.end
        )


def parse_window(entry: str) -> Window:
    match = _ENTRY.match(entry)
    if match is None:
        raise HoursError(f'{entry!r}: expected something like "Mon-Fri 09:00-17:00"')
    start = _minutes(match["open"], entry)
    end = _minutes(match["close"], entry)
    if start == end:
        raise HoursError(f"{entry!r}: opens and closes at the same time")
    return Window(_days(match["days"], entry), start, end)


class OfficeHours:
    def __init__(self, entries: list[str], timezone: str = "UTC") -> None:
        self.windows = [parse_window(entry) for entry in entries]
        self.zone = ZoneInfo(timezone)
        self.timezone = timezone

    @property
    def always(self) -> bool:
        return not self.windows

    def is_open(self, now: datetime) -> bool:
        """Whether people answer at `now` (an aware datetime)."""
        if self.always:
            return True
        local = now.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        return any(window.contains(local.weekday(), minute) for window in self.windows)

    def next_open(self, now: datetime) -> datetime | None:
        """When people are next answering, after `now`; None when always open."""
        if self.always:
            return None
        local = now.astimezone(self.zone)
        best: datetime | None = None
        for offset in range(8):
            day = local.date() + timedelta(days=offset)
            for window in self.windows:
                if day.weekday() not in window.days or window.start == 24 * 60:
                    continue
                opens = datetime.combine(
                    day, time(window.start // 60, window.start % 60), tzinfo=self.zone
                )
                if opens > local and (best is None or opens < best):
                    best = opens
            if best is not None:
                return best
        return best

    def describe_next(self, now: datetime) -> str:
        """E.g. "today at 09:00 (UTC)", "tomorrow at 09:00 (UTC)", "on Monday at 09:00 (UTC)"."""
        opens = self.next_open(now)
        if opens is None:
            return "soon"
        today = now.astimezone(self.zone).date()
        days = (opens.date() - today).days
        if days == 0:
            when = "today"
        elif days == 1:
            when = "tomorrow"
        else:
            when = f"on {DAY_NAMES[opens.weekday()]}"
        return f"{when} at {opens:%H:%M} ({self.timezone})"
