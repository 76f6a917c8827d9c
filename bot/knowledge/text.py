"""Cleaning customers' messages before they are compared with the FAQ.

Customers type fast: "retrun", "pasword", "pls", "dont". The embedding model
splits an unknown word into pieces that mean little, so a word that is in
neither the model's vocabulary nor the FAQ's is corrected to the closest FAQ
word (one edit for short words, two for long ones), and chat shorthand is
spelled out. Only words the FAQ itself uses are ever substituted, so a
correction can only move a message towards an entry that shares the word.
The same tokens feed the lexical (BM25) score.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.knowledge.faq import FaqFile

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_WORD_ANY_CASE = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?")

SHORTHAND = {
    "u": "you",
    "ur": "your",
    "pls": "please",
    "plz": "please",
    "thx": "thanks",
    "ty": "thanks",
    "im": "i'm",
    "dont": "don't",
    "doesnt": "doesn't",
    "didnt": "didn't",
    "cant": "can't",
    "wont": "won't",
    "isnt": "isn't",
    "havent": "haven't",
    "hasnt": "hasn't",
    "wasnt": "wasn't",
    "whats": "what's",
    "wheres": "where's",
    "whens": "when's",
    "hows": "how's",
    "ive": "i've",
    "id": "i'd",
    "abt": "about",
    "asap": "as soon as possible",
    "w/": "with",
}

_SUFFIXES = ("ing", "ed", "es", "s", "er", "ers", "ly", "ise", "ize", "ment", "ments")

#: Words too common to say which entry a message is about (for BM25 only).
STOPWORDS = frozenset(
    """a an the i me my mine we us our you your yours u ur it its it's this that these those
    is are was were be been being am do does did done doing can could would will shall should
    may might must to of in on for at by with from into about as and or but if so than then
    there here what how when where why which who whom whose have has had having not no
    please pls hi hello hey thanks thank just get got i'm i've i'd i'll you're don't can't
    any some all one very too also still yet out up off""".split()
)


def words(text: str) -> list[str]:
    """Lower-case word tokens (apostrophes kept inside words)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def stem(word: str) -> str:
    """A light suffix strip, so "refunds"/"refunded" meet "refund" in BM25."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _within(a: str, b: str, limit: int) -> bool:
    """Damerau-Levenshtein distance (adjacent swaps count once) <= limit."""
    if abs(len(a) - len(b)) > limit:
        return False
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > limit:
            return False
        previous2, previous = previous, current
    return previous[-1] <= limit


def _inflection(a: str, b: str) -> bool:
    """ "subscribe" is not a typo of "unsubscribe", nor "coupons" of "coupon"
    (but "cancell" is one of "cancel")."""
    short, long = sorted((a, b), key=len)
    if short not in long:
        return False
    rest = long.replace(short, "", 1)
    return len(rest) >= 2 or rest == "s"


class Normalizer:
    """Spells out shorthand and corrects typos towards the FAQ's own words."""

    def __init__(self, faq_texts: Iterable[str], known: Collection[str] = frozenset()) -> None:
        counts = Counter(word for text in faq_texts for word in words(text))
        self.faq_words = counts
        #: Words the embedding model knows whole (its vocabulary): never "corrected".
        self.known = known
        self._cache: dict[str, str] = {}

    def is_known(self, word: str) -> bool:
        """In the FAQ or the model's vocabulary, or an inflection of a vocabulary
        word ("mailing" from "mail"): such words are never "corrected"."""
        if word in self.faq_words or word in self.known:
            return True
        return any(
            word.endswith(suffix) and word[: -len(suffix)] in self.known for suffix in _SUFFIXES
        )

    def correct(self, word: str) -> str:
        if word in SHORTHAND:
            return SHORTHAND[word]
        if len(word) < 5 or not word.isalpha() or self.is_known(word):
            return word
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        limit = 1 if len(word) < 9 else 2
        best = word
        best_count = 0
        for candidate, count in self.faq_words.items():
            if (
                count > best_count
                and len(candidate) >= 4
                and not _inflection(word, candidate)
                and _within(word, candidate, limit)
            ):
                best, best_count = candidate, count
        if len(self._cache) < 10_000:
            self._cache[word] = best
        return best

    def __call__(self, text: str) -> str:
        """The message with shorthand spelled out and typos corrected; the
        rest (case, punctuation) as it was."""

        def fix(match: re.Match[str]) -> str:
            word = match.group(0)
            lower = word.lower().replace("\u2019", "'")
            corrected = self.correct(lower)
            return word if corrected == lower else corrected

        return _WORD_ANY_CASE.sub(fix, text.strip())


def faq_normalizer(faq: FaqFile, tokenizer: Any | None) -> Normalizer:
    """The normalizer of `faq`'s questions and answers; `tokenizer` (the
    embedding model's) supplies the words never to correct."""
    texts = [question for entry in faq.entries for question in entry.questions]
    texts += [entry.answer for entry in faq.entries]
    known: frozenset[str] = frozenset()
    if tokenizer is not None:
        known = frozenset(word for word in tokenizer.get_vocab() if word.isalpha())
    return Normalizer(texts, known)
