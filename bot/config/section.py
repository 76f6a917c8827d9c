"""The base of every config section, and validators several sections share."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

_PLATFORM_ID = re.compile(r"^[a-z][a-z0-9_-]*:\S+$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def platform_ids(value: Any) -> Any:
    """A `field_validator(mode="before")` for lists of "<platform>:<id>"."""
    if isinstance(value, list):
        for entry in value:
            if not isinstance(entry, str) or not _PLATFORM_ID.match(entry.strip()):
                raise ValueError('must be a list of "<platform>:<id>", e.g. "telegram:123"')
        return [entry.strip() for entry in value]
    return value
