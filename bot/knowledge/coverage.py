"""Word coverage: does an entry speak of everything a message asks about?

A near miss shares most of its meaning with an entry and asks about one thing
the entry never mentions: "do you gift wrap?" against the gift card entry,
"how do I return a library book?" against returns. Its sentence embedding
sits close to the entry, so the classifier is confident; what gives it away
is a word that nothing in the entry comes close to ("wrap", "library").

Each content word of the message gets a score against an entry: 1.0 for a
word the entry itself uses (after a light stem), else the best cosine between
the word's embedding and the embeddings of the entry's words. The entry's
coverage is the worst word's score (what gives a near miss away) and a mean
of the scores weighted by how rare each word is among the FAQ's entries (a
word that half the entries use, "order", says little about which one covers
the message; one that none uses, "library", says a lot). A message with no
content word ("hello", "hi!") has nothing that ties it to any entry: both are
0.0, which keeps small talk away from the FAQ's answers. Words are embedded
alone by the same sentence model; the FAQ's are embedded once, with the index.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from bot.knowledge.faq import FaqFile
from bot.knowledge.text import STOPWORDS, stem, words

if TYPE_CHECKING:
    from bot.knowledge.index import FaqIndex

Vectors = npt.NDArray[np.float32]

#: Embeddings of words outside the FAQ kept for later messages (most recent).
WORD_CACHE = 20_000
#: Words this short say too little about a topic ("fee" still counts).
MIN_LETTERS = 3
#: Words that never carry a topic, beyond the FAQ text's stopwords.
FUNCTION_WORDS = STOPWORDS | frozenset(
    """they them their theirs he him his she her hers itself myself yourself ours
    because while until over under again once more most other such only own same
    now really okay ok hey hello hi thanks""".split()
)


def content_words(text: str) -> list[str]:
    """The words of `text` that carry its topic, in order, each once."""
    seen: dict[str, None] = {}
    for word in words(text):
        if len(word) >= MIN_LETTERS and word not in FUNCTION_WORDS and not word.isdigit():
            seen.setdefault(word, None)
    return list(seen)


def faq_vocabulary(faq: FaqFile) -> tuple[tuple[str, ...], list[list[int]]]:
    """(every content word of the FAQ, sorted; per entry the positions of its
    words in that list), from each entry's questions and answer."""
    per_entry = [content_words(" ".join((*entry.questions, entry.answer))) for entry in faq.entries]
    vocabulary = tuple(sorted({word for entry_words in per_entry for word in entry_words}))
    position = {word: number for number, word in enumerate(vocabulary)}
    return vocabulary, [sorted(position[word] for word in entry) for entry in per_entry]


def _same_root(a: str, b: str) -> bool:
    """A shared start of five letters or more, covering most of the shorter word."""
    shorter = min(len(a), len(b))
    if shorter < 5 or a[:5] != b[:5]:
        return False
    shared = 5
    while shared < shorter and a[shared] == b[shared]:
        shared += 1
    return shared >= 0.75 * shorter


class Coverage(NamedTuple):
    """How well one entry covers one message's content words."""

    worst: float
    #: The mean word score, weighted by each word's rarity among the entries.
    mean: float


#: The coverage of a message without content words.
NO_WORDS = Coverage(0.0, 0.0)


@dataclass(frozen=True, slots=True)
class EntryWords:
    """One entry's words: their stems for exact hits and their embeddings."""

    stems: frozenset[str]
    vectors: Vectors

    def uses(self, word: str) -> bool:
        """The entry has this word, an inflection of it or another spelling
        ("programme" for "program", "canceled" for "cancelled")."""
        root = stem(word)
        return root in self.stems or any(_same_root(root, other) for other in self.stems)

    def score(self, word: str, vector: Vectors) -> float:
        """1.0 for a word the entry uses, else its best cosine to the entry's words."""
        if self.uses(word):
            return 1.0
        return float((self.vectors @ vector).max()) if len(self.vectors) else 0.0

    def coverage(self, message: MessageWords) -> Coverage:
        """The worst and the weighted mean word score (`NO_WORDS` for a
        message without content words)."""
        if not message.words:
            return NO_WORDS
        scores = [
            self.score(word, vector)
            for word, vector in zip(message.words, message.vectors, strict=True)
        ]
        mean = sum(s * w for s, w in zip(scores, message.weights, strict=True))
        return Coverage(min(scores), mean / sum(message.weights))


class WordTable:
    """Word embeddings for coverage: the FAQ's (from the index) and, in a
    bounded cache, those of words customers used that the FAQ does not."""

    def __init__(self, index: FaqIndex) -> None:
        vocabulary, vectors = index.vocabulary, index.word_vectors
        self._faq: dict[str, Vectors] = {w: vectors[n] for n, w in enumerate(vocabulary)}
        self._other: OrderedDict[str, Vectors] = OrderedDict()
        offsets, members = index.word_offsets, index.word_members
        self.entries = [
            EntryWords(
                frozenset(stem(vocabulary[int(i)]) for i in members[offsets[k] : offsets[k + 1]]),
                vectors[members[offsets[k] : offsets[k + 1]]],
            )
            for k in range(len(offsets) - 1)
        ]
        #: Per stem, how many entries use it (a word's weight in `Coverage.mean`).
        self._entries_using: dict[str, int] = {}
        for entry in self.entries:
            for root in entry.stems:
                self._entries_using[root] = self._entries_using.get(root, 0) + 1

    def lookup(self, messages: Sequence[Sequence[str]]) -> tuple[dict[str, Vectors], list[str]]:
        """(the embeddings this table has for the words of `messages`, the words
        it has none for, each once). The first is a snapshot: what another
        conversation adds or evicts meanwhile does not change it."""
        known: dict[str, Vectors] = {}
        missing: dict[str, None] = {}
        for words_of_one in messages:
            for word in words_of_one:
                if word in known or word in missing:
                    continue
                vector = self._faq.get(word)
                if vector is None and word in self._other:
                    vector = self._other[word]
                    self._other.move_to_end(word)
                if vector is None:
                    missing[word] = None
                else:
                    known[word] = vector
        return known, list(missing)

    def add(self, words_: Sequence[str], vectors: Vectors) -> dict[str, Vectors]:
        """Remember the embeddings of new words (the oldest go beyond
        `WORD_CACHE`); returns them by word."""
        fresh = dict(zip(words_, vectors, strict=True))
        self._other.update(fresh)
        while len(self._other) > WORD_CACHE:
            self._other.popitem(last=False)
        return fresh

    @property
    def width(self) -> int:
        return int(self.entries[0].vectors.shape[1]) if self.entries else 0

    def rarity(self, word: str) -> float:
        """log(1 + entries / (1 + entries using the word)): an inverse document frequency."""
        using = self._entries_using.get(stem(word), 0)
        return math.log(1 + len(self.entries) / (1 + using))

    def message(self, words_: Sequence[str], vectors: dict[str, Vectors]) -> MessageWords:
        """A message's words with their embeddings (taken from `vectors`, a
        `lookup` snapshot) and their rarity weights."""
        rows = [vectors[word] for word in words_]
        stacked = np.stack(rows) if rows else np.zeros((0, self.width), dtype=np.float32)
        return MessageWords(tuple(words_), stacked, tuple(self.rarity(w) for w in words_))


@dataclass(frozen=True, slots=True)
class MessageWords:
    """A message's content words and their embeddings (for coverage)."""

    words: tuple[str, ...]
    vectors: Vectors
    #: `WordTable.rarity` of each word.
    weights: tuple[float, ...]
