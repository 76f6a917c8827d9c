"""Days and durations: when daily quotas reset (midnight UTC), how long
until then in words, and the `--since` / `/usage` period forms."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from bot.governance.errors import GovernanceError

DAY = timedelta(days=1)
_DAYS = re.compile(r"^(\d{1,5})d$")


def day_start(now: datetime) -> datetime:
    """Midnight UTC of `now`'s day: when daily quotas last reset."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def until_reset(now: datetime) -> float:
    """Seconds until the next midnight UTC (at least 1)."""
    return max(1.0, (day_start(now) + DAY - now).total_seconds())


def duration(seconds: float) -> str:
    """ "5 h 12 min", "12 min", "40 s"."""
    whole = max(1, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes = -(-whole // 60)  # rounded up: "in 1 min" rather than "in 0 min"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def parse_since(value: str, now: datetime) -> datetime:
    """`YYYY-MM-DD` (that day's midnight UTC), `Nd` (N days before now) or
    `today` (midnight UTC); `GovernanceError` for anything else."""
    value = value.strip().lower()
    if value == "today":
        return day_start(now)
    days = _DAYS.match(value)
    if days:
        return now - timedelta(days=int(days.group(1)))
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise GovernanceError(
            f"{value!r} is not a period: use YYYY-MM-DD, Nd (the last N days) or today"
        ) from None
