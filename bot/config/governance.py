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
    #: What a banned person hears, once; "" = silence (the web API always answers 403).
    banned_answer: str = "You can't use this bot."

    _lists = field_validator(
        "users_allow", "users_deny", "chats_allow", "chats_deny", mode="before"
    )(platform_ids)


#: Labels that toxicity and offensive-language classifiers commonly use for what they flag.
FLAGGED_LABELS = (
    "toxic",
    "toxicity",
    "severe_toxic",
    "obscene",
    "threat",
    "insult",
    "identity_hate",
    "offensive",
    "hate",
    "abusive",
    "nsfw",
    "unsafe",
)


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
    #: The classifier's labels that flag a text (any case); its other labels never do.
    classifier_labels: list[str] = Field(default_factory=lambda: list(FLAGGED_LABELS))

    @field_validator("blocked_terms", "classifier_labels")
    @classmethod
    def _no_blanks(cls, value: list[str]) -> list[str]:
        if any(not entry.strip() for entry in value):
            raise ValueError("must not contain empty entries")
        return [entry.strip() for entry in value]

    @field_validator("blocked_patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                compiled = re.compile(pattern)
            except (re.error, OverflowError, RecursionError) as exc:
                shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
                raise ValueError(f"has a bad regular expression {shown!r}: {exc}") from None
            if compiled.search("") is not None:
                raise ValueError(f"{pattern!r} matches the empty text: it would block everything")
        return value
