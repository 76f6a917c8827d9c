"""What may be said: blocked terms and patterns, and an optional classifier.

Texts are *folded* before matching — Unicode NFKD with combining marks and
invisible format characters dropped, then case-folded — so "Café", "CAFE" and
"ca\u200bfé" all read "cafe". Terms are whole words or phrases (any run of
spaces between their words): "ass" blocks "ass" but not "class"; a pattern
such as `idiot\\w*` covers a word's forms. Patterns are regular expressions
searched in the folded text, case-insensitively, with their own accents
dropped the same way (`café` in a pattern matches "CAFÉ" and "cafe").
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.governance.errors import GovernanceError

if TYPE_CHECKING:
    from bot.config.governance import ModerationSection
    from bot.governance.classifier import Classifier


def _strip_marks(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(
        char
        for char in decomposed
        if not unicodedata.combining(char) and unicodedata.category(char) != "Cf"
    )


def fold(text: str) -> str:
    """The form texts, terms and patterns are compared in: no accents, no
    invisible characters, case-folded, compatibility forms decomposed."""
    if text.isascii():  # most texts: nothing to decompose, and casefold() is lower()
        return text.lower()
    # Case folding can make marks of its own ("İ" folds to "i" + a combining
    # dot), so they are stripped again after it.
    return _strip_marks(_strip_marks(text).casefold())


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why a text was blocked: `rule` is "term", "pattern" or "classifier"."""

    rule: str
    detail: str

    def describe(self) -> str:
        return f"{self.rule} {self.detail}"


def _words(term: str) -> list[str]:
    return fold(term).split()


def _term_body(words: list[str]) -> str:
    return r"\s+".join(re.escape(word) for word in words)


def _bounded(words: list[str]) -> bool:
    """Whether a term starts and ends with a word character (most do)."""
    return bool(re.match(r"\w", words[0]) and re.search(r"\w$", words[-1]))


def _terms_regex(terms: list[list[str]]) -> re.Pattern[str] | None:
    """One expression for all terms. Terms that start and end with a word
    character share one pair of word-boundary checks around a plain
    alternation, which `re` searches far faster than one group per term."""
    bounded = [_term_body(words) for words in terms if _bounded(words)]
    others = []
    for words in terms:
        if not _bounded(words):
            start = r"(?<!\w)" if re.match(r"\w", words[0]) else ""
            end = r"(?!\w)" if re.search(r"\w$", words[-1]) else ""
            others.append(start + _term_body(words) + end)
    parts = ([r"(?<!\w)(?:" + "|".join(bounded) + r")(?!\w)"] if bounded else []) + others
    return re.compile("|".join(parts)) if parts else None


class BlockList:
    """`[moderation] blocked_terms` and `blocked_patterns`, compiled once."""

    def __init__(self, terms: list[str], patterns: list[str]) -> None:
        #: folded words (joined by one space) -> the term as configured
        self.terms = {" ".join(_words(term)): term for term in terms if _words(term)}
        self._terms = _terms_regex([key.split(" ") for key in self.terms])
        self.patterns = list(patterns)
        self._patterns: list[re.Pattern[str]] = []
        for pattern in patterns:
            try:
                self._patterns.append(re.compile(_strip_marks(pattern), re.IGNORECASE))
            except re.error as exc:
                raise GovernanceError(
                    f"moderation.blocked_patterns: {pattern!r} is not a valid expression "
                    f"once its accents are dropped ({exc})"
                ) from None

    def __bool__(self) -> bool:
        return bool(self.terms or self._patterns)

    def check(self, text: str) -> Verdict | None:
        folded = fold(text)
        if self._terms is not None:
            match = self._terms.search(folded)
            if match is not None:
                term = self.terms.get(" ".join(match.group(0).split()), match.group(0))
                return Verdict("term", f'"{term}"')
        for source, pattern in zip(self.patterns, self._patterns, strict=True):
            if pattern.search(folded):
                return Verdict("pattern", f"/{source}/")
        return None


class Moderator:
    """Checks a text against the block list, then the classifier (if any)."""

    def __init__(self, section: ModerationSection, classifier: Classifier | None = None) -> None:
        self.answer = section.blocked_answer
        self.blocklist = BlockList(section.blocked_terms, section.blocked_patterns)
        self.classifier = classifier

    @property
    def enabled(self) -> bool:
        return bool(self.blocklist) or self.classifier is not None

    async def check(self, text: str) -> Verdict | None:
        verdict = self.blocklist.check(text)
        if verdict is None and self.classifier is not None:
            verdict = await self.classifier.check(text)
        return verdict
