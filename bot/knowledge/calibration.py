"""Fit the score calibration of `bot.knowledge.matching` on labelled questions.

    python -m bot.knowledge.calibration --faq examples/faq.toml \\
        --questions examples/faq-dev.jsonl [--rounds 40] [--seed 0]

prints the `WEIGHTS` and `BIAS` to paste into matching.py. Each round builds
the index of a random part of the FAQ (between half and all of its entries,
each with between half and all of its questions) exactly as the bot does,
ranks every labelled question against it and records the features of the
top entry and whether it was the right one; a question whose entry was left
out becomes an out-of-scope question for that round, the hardest kind: one
that a neighbouring entry almost answers. A logistic regression over all
rounds gives the weights. Round 0 is the whole FAQ.

A development tool: the bot itself never fits anything at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from bot.config.knowledge import BUNDLED_EMBEDDING_MODEL
from bot.knowledge.coverage import WordTable, content_words
from bot.knowledge.embedder import encode, load_encoder
from bot.knowledge.evaluation import Labelled, load_questions
from bot.knowledge.faq import FaqFile, load_faq
from bot.knowledge.index import Vectors, build_index
from bot.knowledge.matching import ranked_features
from bot.knowledge.text import faq_normalizer


class _Embeddings:
    """Every text embedded once, however many rounds ask for it."""

    def __init__(self, model_name: str) -> None:
        self.model, self.tokenizer = load_encoder(model_name)
        self.known: dict[str, Vectors] = {}

    async def __call__(self, texts: Sequence[str]) -> Vectors:
        missing = [text for text in dict.fromkeys(texts) if text not in self.known]
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            for text, vector in zip(chunk, encode(self.model, self.tokenizer, chunk), strict=True):
                self.known[text] = vector
        width = int(self.model.config.hidden_size)
        if not texts:
            return np.zeros((0, width), dtype=np.float32)
        return np.stack([self.known[text] for text in texts])


def _part(faq: FaqFile, rng: random.Random) -> FaqFile:
    entries = list(faq.entries)
    keep = rng.randint(max(2, math.ceil(len(entries) / 2)), len(entries))
    chosen = sorted(rng.sample(range(len(entries)), keep))
    parts = []
    for number in chosen:
        entry = entries[number]
        questions = list(entry.questions)
        count = rng.randint(math.ceil(len(questions) / 2), len(questions))
        picked = sorted(rng.sample(range(len(questions)), count))
        parts.append(replace(entry, questions=tuple(questions[i] for i in picked)))
    return replace(faq, entries=tuple(parts), digest=f"{faq.digest}-part")


async def collect(
    faq: FaqFile, rows: list[Labelled], embed: _Embeddings, rounds: int, seed: int
) -> tuple[list[tuple[float, ...]], list[int]]:
    """(features of the top entry, 1 if it is the right entry) per question and round."""
    normalizer = faq_normalizer(faq, embed.tokenizer)
    cleaned = [normalizer(row.text) for row in rows]
    message_words = [content_words(text) for text in cleaned]
    vectors = await embed(cleaned)
    rng = random.Random(seed)
    samples: list[tuple[float, ...]] = []
    right: list[int] = []
    for round_number in range(rounds):
        part = faq if round_number == 0 else _part(faq, rng)
        index = await build_index(part, embed)
        table = WordTable(index)
        known, unseen = table.lookup(message_words)
        known.update(table.add(unseen, await embed(unseen)))
        messages = [table.message(words, known) for words in message_words]
        ranked = ranked_features(index, vectors, messages, table.entries, places=1)
        for row, (order, values) in zip(rows, ranked, strict=True):
            samples.append(values[0])
            right.append(int(row.faq == part.entries[order[0]].id))
    return samples, right


def fit(samples: list[tuple[float, ...]], right: list[int]) -> tuple[list[float], float]:
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    model = LogisticRegression(C=1.0, max_iter=1000).fit(np.array(samples), np.array(right))
    return [float(w) for w in model.coef_[0]], float(model.intercept_[0])


def cross_validated(
    samples: list[tuple[float, ...]], right: list[int], questions: int, folds: int = 5
) -> list[float]:
    """Out-of-fold scores of round 0 (the whole FAQ): each question scored by
    a fit on the other folds' questions (all their rounds)."""
    data, labels = np.array(samples), np.array(right)
    question = np.arange(len(samples)) % questions
    scores = np.zeros(questions)
    for fold in range(folds):
        held = question % folds == fold
        weights, bias = fit(data[~held].tolist(), labels[~held].tolist())
        z = data[:questions][held[:questions]] @ np.array(weights) + bias
        scores[held[:questions]] = 1 / (1 + np.exp(-z))
    return scores.tolist()


def _best_accuracy(rows: list[Labelled], scores: list[float], top_right: list[int]) -> str:
    """Accuracy at the best threshold with <= 5% false answers (for comparing fits)."""
    in_scope = sum(row.faq is not None for row in rows)
    best = (0.0, 1.0, 0.0)
    for threshold in sorted(set(scores)):
        answered = [s >= threshold for s in scores]
        good = sum(a and r for a, r in zip(answered, top_right, strict=True))
        bad = sum(a and not r for a, r in zip(answered, top_right, strict=True))
        if bad / len(rows) <= 0.05 and good / in_scope > best[0]:
            best = (good / in_scope, threshold, bad / len(rows))
    return f"accuracy {best[0]:.3f} at threshold {best[1]:.3f} (false answers {best[2]:.3f})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faq", type=Path, required=True)
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--model", default=BUNDLED_EMBEDDING_MODEL)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faq = load_faq(args.faq)
    rows = load_questions(args.questions, faq)
    samples, right = asyncio.run(
        collect(faq, rows, _Embeddings(args.model), args.rounds, args.seed)
    )
    weights, bias = fit(samples, right)
    print(f"# {len(samples)} samples ({sum(right)} right) from {args.rounds} rounds")
    print(f"WEIGHTS = ({', '.join(f'{w:.3f}' for w in weights)})")
    print(f"BIAS = {bias:.3f}")
    scores = cross_validated(samples, right, len(rows))
    print("# cross-validated on these questions:", _best_accuracy(rows, scores, right[: len(rows)]))


if __name__ == "__main__":
    main()
