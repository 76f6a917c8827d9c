"""Trigger keywords: in a group, "bot, what's the time?" is for the bot even
without a mention (`[telegram] keywords`, `[discord] keywords`)."""

from __future__ import annotations


def strip_keyword(text: str, keywords: list[str]) -> str | None:
    """The text after a leading keyword ("bot, what's up" -> "what's up"), or
    None when it starts with none of them (any case, whole word)."""
    folded = text.lstrip().casefold()
    for keyword in keywords:
        word = keyword.strip().casefold()
        if not word or not folded.startswith(word):
            continue
        rest = text.lstrip()[len(word) :]
        if word[-1].isalnum() and rest[:1].isalnum():
            continue  # "botany" is not "bot"
        return rest.lstrip(" ,:;").strip()
    return None
