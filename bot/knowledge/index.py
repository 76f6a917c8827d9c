"""The FAQ index: embeddings of every question and answer, and a classifier
trained on them, cached on disk by the file's content and the model.

Why a classifier: the nearest question alone can't tell "close to one entry"
from "close to everything" (a question about gift wrapping sits near the gift
card entry). A multinomial logistic regression trained on the FAQ's own
questions (and answers) learns which directions in embedding space separate
the entries; its top logit is a far better confidence than a cosine
(docs/KNOWLEDGE.md has the measurements). It trains in well under a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bot.knowledge.coverage import faq_vocabulary
from bot.knowledge.faq import FaqEntry, FaqFile

log = logging.getLogger(__name__)

#: Bump when what is cached (or how it is computed) changes.
INDEX_VERSION = 5
#: Inverse L2 strength of the classifier (chosen on examples/faq-dev.jsonl).
CLASSIFIER_C = 10.0
#: Cache files kept (the newest); older ones are removed.
CACHE_KEEP = 8
#: With a single entry there is nothing to tell apart, so the classifier
#: learns "this entry" against some small talk instead.
SMALL_TALK = (
    "hello",
    "hi there",
    "thanks",
    "ok",
    "how are you?",
    "what's your name?",
    "tell me a joke",
    "good morning",
    "bye",
    "what is the weather like?",
)

Vectors = npt.NDArray[np.float32]
Embed = Callable[[Sequence[str]], Awaitable[Vectors]]


@dataclass(frozen=True, slots=True)
class FaqIndex:
    """What matching needs, for one FAQ file and one embedding model."""

    faq: FaqFile
    #: Row i of `question_vectors` is a question of entry `question_entry[i]`.
    question_vectors: Vectors
    question_entry: npt.NDArray[np.int64]
    answer_vectors: Vectors
    #: Logits for entry k: vectors @ coef[k] + intercept[k] (only the first
    #: len(entries) rows are entries; a single-entry FAQ has a small-talk row).
    coef: Vectors
    intercept: Vectors
    #: The median top logit over the FAQ's own questions and answers. Logits
    #: grow with the number of entries and of questions per entry; dividing by
    #: this keeps one calibration (and one threshold) right for FAQs of any size.
    reference: float
    #: Every content word of the FAQ (`coverage.faq_vocabulary`), embedded alone;
    #: entry k's words are `word_members[word_offsets[k]:word_offsets[k + 1]]`.
    vocabulary: tuple[str, ...]
    word_vectors: Vectors
    word_offsets: npt.NDArray[np.int64]
    word_members: npt.NDArray[np.int64]

    @property
    def entries(self) -> tuple[FaqEntry, ...]:
        return self.faq.entries

    def logits(self, vectors: Vectors) -> Vectors:
        """Centred logits, one column per entry."""
        raw = vectors @ self.coef.T + self.intercept
        centred: Vectors = (raw - raw.mean(axis=1, keepdims=True))[:, : len(self.entries)]
        return centred

    def nearest(self, vectors: Vectors) -> Vectors:
        """Best cosine between each vector and any question of each entry."""
        similarity = vectors @ self.question_vectors.T
        best = np.full((len(vectors), len(self.entries)), -1.0, dtype=np.float32)
        for column in range(len(self.entries)):
            best[:, column] = similarity[:, self.question_entry == column].max(axis=1)
        return best


def cache_key(faq: FaqFile, model: str) -> str:
    text = f"v{INDEX_VERSION}\0{model}\0C={CLASSIFIER_C}\0{faq.digest}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def train_classifier(
    questions: Vectors, labels: npt.NDArray[np.int64], answers: Vectors, small_talk: Vectors
) -> tuple[Vectors, Vectors, float]:
    """(coef, intercept, reference) of a multinomial logistic regression over
    the entries; see `FaqIndex.reference`."""
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    entries = len(answers)
    features = np.concatenate([questions, answers])
    targets = np.concatenate([labels, np.arange(entries)])
    if entries == 1:
        features = np.concatenate([features, small_talk])
        targets = np.concatenate([targets, np.full(len(small_talk), 1)])
    # newton-cg reaches lbfgs's solution here in a tenth of the time.
    model: Any = LogisticRegression(C=CLASSIFIER_C, solver="newton-cg", max_iter=1000)
    model.fit(features, targets)
    coef = np.asarray(model.coef_, dtype=np.float32)
    intercept = np.asarray(model.intercept_, dtype=np.float32)
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row for class 1
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    own = np.concatenate([questions, answers])
    raw = own @ coef.T + intercept
    top = (raw - raw.mean(axis=1, keepdims=True))[:, :entries].max(axis=1)
    return coef, intercept, max(float(np.median(top)), 1e-3)


async def build_index(faq: FaqFile, embed: Embed) -> FaqIndex:
    """Embed the FAQ (through the batching worker) and train the classifier
    (on a thread: it is numpy work, not the event loop's)."""
    import asyncio

    questions = [question for entry in faq.entries for question in entry.questions]
    labels = np.array(
        [number for number, entry in enumerate(faq.entries) for _ in entry.questions],
        dtype=np.int64,
    )
    question_vectors = await embed(questions)
    answer_vectors = await embed([entry.answer for entry in faq.entries])
    small_talk = await embed(SMALL_TALK) if len(faq.entries) == 1 else answer_vectors[:0]
    vocabulary, members = faq_vocabulary(faq)
    word_vectors = await embed(vocabulary) if vocabulary else answer_vectors[:0]
    coef, intercept, reference = await asyncio.to_thread(
        train_classifier, question_vectors, labels, answer_vectors, small_talk
    )
    offsets, flat = flatten(members)
    return FaqIndex(
        faq,
        question_vectors,
        labels,
        answer_vectors,
        coef,
        intercept,
        reference,
        vocabulary,
        word_vectors,
        offsets,
        flat,
    )


def flatten(members: list[list[int]]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Lists of word positions as (offsets, members) arrays (CSR style)."""
    offsets = np.cumsum([0, *map(len, members)]).astype(np.int64)
    flat = np.array([i for entry in members for i in entry], dtype=np.int64)
    return offsets, flat


class IndexCache:
    """Indexes saved as .npz files named by `cache_key`, in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, faq: FaqFile, model: str) -> Path:
        return self.folder / f"faq-{cache_key(faq, model)}.npz"

    def load(self, faq: FaqFile, model: str) -> FaqIndex | None:
        """The cached index of this file and model, or None (missing or unusable)."""
        path = self.path(faq, model)
        try:
            with np.load(path, allow_pickle=False) as data:
                index = FaqIndex(
                    faq,
                    data["question_vectors"].astype(np.float32),
                    data["question_entry"].astype(np.int64),
                    data["answer_vectors"].astype(np.float32),
                    data["coef"].astype(np.float32),
                    data["intercept"].astype(np.float32),
                    float(data["reference"]),
                    tuple(str(word) for word in data["vocabulary"]),
                    data["word_vectors"].astype(np.float32),
                    data["word_offsets"].astype(np.int64),
                    data["word_members"].astype(np.int64),
                )
        except FileNotFoundError:
            return None
        except (OSError, KeyError, ValueError) as exc:
            log.warning("ignoring the unreadable FAQ index cache %s: %s", path, exc)
            return None
        questions = sum(len(entry.questions) for entry in faq.entries)
        if (
            len(index.question_vectors) != questions
            or len(index.answer_vectors) != len(faq.entries)
            or len(index.word_offsets) != len(faq.entries) + 1
            or len(index.word_vectors) != len(index.vocabulary)
        ):
            log.warning("ignoring the FAQ index cache %s: it does not match the file", path)
            return None
        return index

    def save(self, index: FaqIndex, model: str) -> Path | None:
        """Write atomically (a crash leaves the old file or none, never half
        of one); a cache that can't be written only costs a rebuild."""
        path = self.path(index.faq, model)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(handle, "wb") as out:
                np.savez(
                    out,
                    question_vectors=index.question_vectors,
                    question_entry=index.question_entry,
                    answer_vectors=index.answer_vectors,
                    coef=index.coef,
                    intercept=index.intercept,
                    reference=np.array(index.reference),
                    vocabulary=np.array(index.vocabulary, dtype=str),
                    word_vectors=index.word_vectors,
                    word_offsets=index.word_offsets,
                    word_members=index.word_members,
                )
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("could not write the FAQ index cache %s: %s", path, exc)
            return None
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        files = sorted(
            self.folder.glob("faq-*.npz"), key=lambda file: file.stat().st_mtime, reverse=True
        )
        for old in [file for file in files if file != keep][CACHE_KEEP - 1 :]:
            old.unlink(missing_ok=True)
