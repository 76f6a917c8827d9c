"""Phrases that ask for a person: whole words, any case, any spacing."""

from __future__ import annotations

import re
from collections.abc import Iterable


def phrase_pattern(phrases: Iterable[str]) -> re.Pattern[str] | None:
    """One pattern matching any of `phrases` as whole words; None when there are none.

    "agent" matches "Agent, please!" and "an AGENT" but not "agents" or
    "reagent"; "talk to a human" also matches across extra spaces or a line break.
    """
    alternatives = []
    for phrase in phrases:
        words = phrase.split()
        if words:
            alternatives.append(r"\s+".join(re.escape(word) for word in words))
    if not alternatives:
        return None
    # Longest first, so that the longest phrase wins where several overlap.
    alternatives.sort(key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


class Triggers:
    """`[handoff] triggers`, compiled once."""

    def __init__(self, phrases: Iterable[str]) -> None:
        self.pattern = phrase_pattern(phrases)

    def match(self, text: str) -> str | None:
        """The trigger phrase found in `text` (as written there), or None."""
        if self.pattern is None:
            return None
        found = self.pattern.search(text)
        return found.group(0) if found else None

    def __call__(self, text: str) -> bool:
        return self.match(text) is not None
