"""From a message's embedding to a decision: answer, suggest, or fall back.

The classifier ranks the entries; each of the first few then gets a score,
`sigmoid(W · features + B)`, that estimates the chance that it is the entry
the message asks about (`answer_threshold = 0.65`: "answer when at least 65%
sure"). The features, all free of the FAQ's size:

* `logit`: the entry's centred classifier logit over `FaqIndex.reference`,
  the median top logit on the FAQ's own questions;
* `margin`: its lead over the best other entry, on the same scale;
* `answer`: the cosine between the message and the entry's answer;
* `worst` and `mean`: how well the entry covers the message's worst-covered
  content word, and its content words on average, rare words weighing more
  (`bot.knowledge.coverage`): the first gives a near miss away, the second
  small talk and messages that only brush the entry's topic.

W and B come from `python -m bot.knowledge.calibration` on
examples/faq-dev.jsonl, over random subsets of the FAQ's entries and of their
questions (an entry left out turns its questions into near misses, and the
fit holds for FAQs of other sizes); docs/KNOWLEDGE.md has the measurements.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bot.knowledge.coverage import Coverage, EntryWords, MessageWords
from bot.knowledge.faq import FaqEntry
from bot.knowledge.index import FaqIndex, Vectors

#: Calibration weights of (logit, margin, answer, worst, mean), and the bias.
WEIGHTS = (4.495, 2.259, 1.741, 0.530, 6.449)
BIAS = -9.817
#: At most this many questions are offered in "Did you mean ...?"; only these
#: entries are scored (the others get 0.0).
MAX_SUGGESTIONS = 3

Features = tuple[float, float, float, float, float]


@dataclass(frozen=True, slots=True)
class Match:
    """The entries ranked for one message, best first, with their scores."""

    ranked: tuple[tuple[FaqEntry, float], ...]

    @property
    def best(self) -> FaqEntry:
        return self.ranked[0][0]

    @property
    def score(self) -> float:
        return self.ranked[0][1]


def features(
    logits: Vectors,
    order: Sequence[int],
    k: int,
    reference: float,
    answer: float,
    coverage: Coverage,
) -> Features:
    """The calibration features of entry `k` for one message (see the module doc)."""
    others = [logits[j] for j in order[:2] if j != k]  # `order` is best first
    best_other = float(others[0]) if others else 0.0  # a one-entry FAQ
    return (
        float(logits[k]) / reference,
        float(logits[k] - best_other) / reference,
        answer,
        coverage.worst,
        coverage.mean,
    )


def calibrate(values: Sequence[float]) -> float:
    z = BIAS + sum(w * v for w, v in zip(WEIGHTS, values, strict=True))
    return 1.0 / (1.0 + math.exp(-z))


def ranked_features(
    index: FaqIndex,
    vectors: Vectors,
    messages: Sequence[MessageWords],
    entry_words: Sequence[EntryWords],
    places: int = MAX_SUGGESTIONS,
) -> list[tuple[list[int], list[Features]]]:
    """Per row of `vectors`: the entries best first, and the features of the
    first `places` of them (what `rank` scores and the calibration fits)."""
    logits = index.logits(vectors)
    answers = vectors @ index.answer_vectors.T
    result = []
    for row, answer_row, message in zip(logits, answers, messages, strict=True):
        order = [int(k) for k in np.argsort(-row, kind="stable")]
        values = [
            features(
                row,
                order,
                k,
                index.reference,
                float(answer_row[k]),
                entry_words[k].coverage(message),
            )
            for k in order[:places]
        ]
        result.append((order, values))
    return result


def rank(
    index: FaqIndex,
    vectors: Vectors,
    messages: Sequence[MessageWords],
    entry_words: Sequence[EntryWords],
) -> list[Match]:
    """One `Match` per row of `vectors` (embeddings of normalised messages)."""
    matches = []
    for order, values in ranked_features(index, vectors, messages, entry_words):
        scores = [calibrate(v) for v in values] + [0.0] * (len(order) - len(values))
        matches.append(
            Match(tuple((index.entries[k], s) for k, s in zip(order, scores, strict=True)))
        )
    return matches


def nearest_neighbour(index: FaqIndex, vectors: Vectors) -> list[Match]:
    """The baseline: each entry scored by its closest question's cosine."""
    similarity = index.nearest(vectors)
    matches = []
    for row in similarity:
        order = np.argsort(-row, kind="stable")
        matches.append(Match(tuple((index.entries[int(k)], float(row[k])) for k in order)))
    return matches


def suggestions(match: Match, suggest_threshold: float) -> tuple[FaqEntry, ...]:
    """The best entry and up to two more that also reach `suggest_threshold`."""
    chosen = [match.best]
    for entry, score in match.ranked[1:MAX_SUGGESTIONS]:
        if score >= suggest_threshold:
            chosen.append(entry)
    return tuple(chosen)


def suggestion_text(entries: tuple[FaqEntry, ...]) -> str:
    """ "Did you mean …?" with each entry's first question (its title)."""
    if len(entries) == 1:
        return f'Did you mean "{entries[0].questions[0]}"? Reply "yes", or ask in other words.'
    lines = [f"{number}. {entry.questions[0]}" for number, entry in enumerate(entries, 1)]
    return "\n".join(
        ["Did you mean one of these?", *lines, "Reply with its number, or ask in other words."]
    )


# -- replies to a suggestion ------------------------------------------------------

_ORDINALS = {
    "1": 0,
    "first": 0,
    "1st": 0,
    "2": 1,
    "two": 1,
    "second": 1,
    "2nd": 1,
    "3": 2,
    "three": 2,
    "third": 2,
    "3rd": 2,
}
_YES = frozenset(
    "yes yeah yep yup ya yea y sure ok okay correct right exactly indeed please".split()
)
_FILLER = frozenset(
    "the a an one number no option question it is its that this i mean meant want "
    "please pls that's thats it's one's first-one".split()
)
_TOKEN = re.compile(r"[a-z0-9']+")
_LAST = frozenset({"last", "latter"})


def chosen_suggestion(reply: str, offered: int) -> int | None:
    """Which of `offered` suggestions a short reply picks ("2", "the second
    one", "yes" when there was one), as a 0-based position; None otherwise."""
    tokens = _TOKEN.findall(reply.lower().replace("#", " "))
    if not tokens or len(tokens) > 6:
        return None
    picks = {_ORDINALS[token] for token in tokens if token in _ORDINALS}
    if any(token in _LAST for token in tokens):
        picks.add(offered - 1)
    if not picks and "one" in tokens:  # "one", "number one" (but "the second one" is 2)
        picks.add(0)
    rest = [t for t in tokens if t not in _ORDINALS and t not in _LAST and t not in _FILLER]
    if len(picks) == 1:
        pick = picks.pop()
        if pick < offered and all(t in _YES for t in rest):
            return pick
        return None
    if not picks and offered == 1 and tokens[0] in _YES and all(t in _YES for t in rest):
        return 0
    return None
