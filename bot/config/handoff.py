"""`[handoff]`: people take a conversation over from the bot."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from bot.config.section import Section

DEFAULT_TRIGGERS = [
    "talk to a human",
    "speak to a human",
    "talk to a person",
    "speak to a person",
    "real person",
    "human agent",
    "live agent",
    "agent",
    "operator",
    "representative",
    "customer service",
    "someone real",
]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(
    r"^\s*(?P<days>[A-Za-z]{3}(?:\s*-\s*[A-Za-z]{3})?(?:\s*,\s*[A-Za-z]{3}(?:\s*-\s*[A-Za-z]{3})?)*)"
    r"\s+(?P<open>\d{1,2}:\d{2})\s*-\s*(?P<close>\d{1,2}:\d{2})\s*$"
)


class HandoffSection(Section):
    enabled: bool = True
    #: Phrases that ask for a person (whole words, any case), besides /human.
    triggers: list[str] = Field(default_factory=lambda: list(DEFAULT_TRIGGERS))
    #: Hand over after this many unanswered questions in a row (0 = never).
    after_unanswered: Annotated[int, Field(ge=0)] = 0
    #: When people answer, e.g. ["Mon-Fri 09:00-17:00", "Sat 10:00-14:00"]; [] = always.
    hours: list[str] = Field(default_factory=list)
    #: The time zone of `hours` (an IANA name such as "Europe/Berlin").
    timezone: str = "UTC"
    #: Env var with comma-separated `name:token` pairs for the operator console.
    operator_tokens_env: str = "AIGC_BOT_OPERATOR_TOKENS"
    #: POSTed a JSON notice when a conversation starts waiting; "" = none.
    notify_url: str = ""
    #: Tries of that POST (exponential backoff between them) before it is dropped.
    notify_attempts: Annotated[int, Field(ge=1, le=20)] = 6
    #: Also post that notice into this Telegram chat / Discord channel; "" = no.
    telegram_chat_id: str = ""
    discord_channel_id: str = ""

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: list[str]) -> list[str]:
        for entry in value:
            match = _HOURS.match(entry)
            if not match:
                raise ValueError('must be like ["Mon-Fri 09:00-17:00", "Sat 10:00-14:00"]')
            days = {day.lower() for day in re.findall(r"[A-Za-z]{3}", match["days"])}
            if not days <= set(_DAYS):
                raise ValueError("days must be Mon, Tue, Wed, Thu, Fri, Sat or Sun")
            times = [match["open"], match["close"]]
            for hours, minutes in (map(int, moment.split(":")) for moment in times):
                if minutes > 59 or hours > 24 or (hours == 24 and minutes):
                    raise ValueError(f"{entry!r}: times run from 00:00 to 24:00")
            if match["open"] == match["close"]:
                raise ValueError(f"{entry!r} opens and closes at the same time")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # "Europe" is a folder
            raise ValueError('must be an IANA time zone such as "UTC" or "Europe/Berlin"') from None
        return value

    @field_validator("notify_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError('must start with http:// or https:// (or be "")')
        return value
