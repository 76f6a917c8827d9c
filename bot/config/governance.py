"""`[access]` (who may talk to the bot, and where) and `[moderation]` (what may be said)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from bot.config.section import Section, platform_ids


class AccessSection(Section):
    """Lists hold "<platform>:<id>" entries. An allow list that is not empty
    lets in only what it names; a deny list always keeps out what it names."""

    users_allow: list[str] = Field(default_factory=list)
    users_deny: list[str] = Field(default_factory=list)
    chats_allow: list[str] = Field(default_factory=list)
    chats_deny: list[str] = Field(default_factory=list)
    #: "all" chats, "private" chats only, or group chats only if "listed" in chats_allow.
    groups: Literal["all", "private", "listed"] = "all"
    #: What someone outside hears, once; "" = silence.
    refusal: str = "Sorry, I'm not available here."

    _lists = field_validator(
        "users_allow", "users_deny", "chats_allow", "chats_deny", mode="before"
    )(platform_ids)


class ModerationSection(Section):
    #: Words or phrases (any case, accents ignored) that may not be said.
    blocked_terms: list[str] = Field(default_factory=list)
    #: Regular expressions matched against the folded text.
    blocked_patterns: list[str] = Field(default_factory=list)
    #: What the user sees instead.
    blocked_answer: str = "Sorry, I can't help with that."
    #: A local text-classification model directory; "" = none.
    classifier: str = ""
    #: Flag a text when the classifier's score for a flagged label reaches this.
    classifier_threshold: Annotated[float, Field(ge=0, le=1)] = 0.8

    @field_validator("blocked_patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"has a bad regular expression {pattern!r}: {exc}") from None
        return value
