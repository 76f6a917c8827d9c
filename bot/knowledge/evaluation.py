"""`aigc-bot faq eval`: how often the knowledge base is right on labelled questions.

Per question the knowledge base either answers an entry (score at or above
`answer_threshold`) or gives no entry's answer (a suggestion or a fallback).
Accuracy counts in-scope questions answered with their entry; the
false-answer rate counts answers with a wrong entry, and answers to
out-of-scope questions, over all questions; the abstain rate, questions given
no entry's answer, over all questions. The sweep repeats that for other
answer thresholds, so an operator can pick one; the nearest-neighbour
baseline (closest question by cosine) is measured on the same set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.knowledge.faq import FaqFile, KnowledgeError
from bot.knowledge.matching import Match, nearest_neighbour, suggestions

#: The false-answer rate the baseline's threshold is chosen for.
BASELINE_FALSE_ANSWERS = 0.05
SWEEP = tuple(round(0.05 * step, 2) for step in range(1, 20))


@dataclass(frozen=True, slots=True)
class Labelled:
    text: str
    faq: str | None


def load_questions(path: Path, faq: FaqFile) -> list[Labelled]:
    """Lines `{"text": ..., "faq": <id> | null}`; errors name the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KnowledgeError(f"{path}: cannot be read ({exc})") from exc
    rows: list[Labelled] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KnowledgeError(f"{path}: line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise KnowledgeError(f'{path}: line {number}: expected {{"text": ..., "faq": ...}}')
        label = item.get("faq")
        if label is not None and (not isinstance(label, str) or faq.entry(label) is None):
            raise KnowledgeError(f"{path}: line {number}: faq {label!r} is not an entry of the FAQ")
        rows.append(Labelled(item["text"], label))
    if not rows:
        raise KnowledgeError(f"{path}: no questions")
    return rows


@dataclass(frozen=True, slots=True)
class Point:
    """The three rates at one answer threshold."""

    threshold: float
    accuracy: float
    false_answer_rate: float
    abstain_rate: float

    def as_dict(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "accuracy": round(self.accuracy, 4),
            "false_answer_rate": round(self.false_answer_rate, 4),
            "abstain_rate": round(self.abstain_rate, 4),
        }


def rates(rows: list[Labelled], matches: list[Match], threshold: float) -> Point:
    in_scope = sum(1 for row in rows if row.faq is not None)
    right = wrong = silent = 0
    for row, match in zip(rows, matches, strict=True):
        if match.score < threshold:
            silent += 1
        elif match.best.id == row.faq:
            right += 1
        else:
            wrong += 1
    n = len(rows)
    return Point(threshold, right / in_scope if in_scope else 0.0, wrong / n, silent / n)


def best_point(rows: list[Labelled], matches: list[Match], max_false: float) -> Point:
    """The threshold with the best accuracy whose false-answer rate stays within
    `max_false` (every distinct score is tried: the baseline's best case)."""
    candidates = [*sorted({match.score for match in matches}), float("inf")]
    best = rates(rows, matches, candidates[-1])
    for threshold in candidates:
        point = rates(rows, matches, threshold)
        if point.false_answer_rate <= max_false and point.accuracy > best.accuracy:
            best = point
    return best


@dataclass(frozen=True, slots=True)
class Report:
    n: int
    in_scope: int
    at_defaults: Point
    suggest_threshold: float
    suggested: float
    suggested_right: float
    top1: float
    sweep: tuple[Point, ...]
    baseline: Point
    baseline_top1: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": round(self.at_defaults.accuracy, 4),
            "false_answer_rate": round(self.at_defaults.false_answer_rate, 4),
            "abstain_rate": round(self.at_defaults.abstain_rate, 4),
            "n": self.n,
            "in_scope": self.in_scope,
            "answer_threshold": self.at_defaults.threshold,
            "suggest_threshold": self.suggest_threshold,
            "suggested_rate": round(self.suggested, 4),
            "suggested_with_right_entry": round(self.suggested_right, 4),
            "top1_accuracy": round(self.top1, 4),
            "sweep": [point.as_dict() for point in self.sweep],
            "baseline": {
                "method": "nearest question by cosine",
                **self.baseline.as_dict(),
                "top1_accuracy": round(self.baseline_top1, 4),
            },
        }


def _top1(rows: list[Labelled], matches: list[Match]) -> float:
    scoped = [(row, match) for row, match in zip(rows, matches, strict=True) if row.faq]
    return sum(match.best.id == row.faq for row, match in scoped) / max(1, len(scoped))


def report(
    rows: list[Labelled],
    matches: list[Match],
    baseline: list[Match],
    answer_threshold: float,
    suggest_threshold: float,
) -> Report:
    """All figures of `faq eval` from the ranked entries of every question."""
    band = [
        (row, match)
        for row, match in zip(rows, matches, strict=True)
        if suggest_threshold <= match.score < answer_threshold
    ]
    right = sum(
        1
        for row, match in band
        if row.faq in {entry.id for entry in suggestions(match, suggest_threshold)}
    )
    return Report(
        n=len(rows),
        in_scope=sum(1 for row in rows if row.faq is not None),
        at_defaults=rates(rows, matches, answer_threshold),
        suggest_threshold=suggest_threshold,
        suggested=len(band) / len(rows),
        suggested_right=right / len(band) if band else 0.0,
        top1=_top1(rows, matches),
        sweep=tuple(rates(rows, matches, threshold) for threshold in SWEEP),
        baseline=best_point(rows, baseline, BASELINE_FALSE_ANSWERS),
        baseline_top1=_top1(rows, baseline),
    )


async def evaluate(service: Any, rows: list[Labelled]) -> Report:
    """Run every question through a started `KnowledgeService` (nothing is recorded)."""
    texts = [row.text for row in rows]
    matches: list[Match] = []
    baseline: list[Match] = []
    step = service.embedder.max_batch_size
    for start in range(0, len(texts), step):
        chunk = texts[start : start + step]
        matches += await service.match(chunk)
        baseline += nearest_neighbour(service.index, await service.embedder.embed(chunk))
    settings = service.settings
    return report(rows, matches, baseline, settings.answer_threshold, settings.suggest_threshold)


def format_report(result: Report) -> str:
    d = result.at_defaults
    b = result.baseline
    lines = [
        f"questions: {result.n} ({result.in_scope} in scope, "
        f"{result.n - result.in_scope} out of scope)",
        f"at answer_threshold {d.threshold:g} / suggest_threshold {result.suggest_threshold:g}:",
        f"  accuracy           {d.accuracy:.3f}  (in-scope questions answered with their entry)",
        f"  false-answer rate  {d.false_answer_rate:.3f}  (answered with a wrong entry)",
        f"  abstain rate       {d.abstain_rate:.3f}  (no entry's answer given)",
        f"  suggested          {result.suggested:.3f}  of all questions; the right entry was "
        f"among the offers for {result.suggested_right:.0%} of them",
        f"  right entry first  {result.top1:.3f}  of in-scope questions (any score)",
        f"baseline (nearest question by cosine, threshold {b.threshold:.3f} = best accuracy "
        f"with <= {BASELINE_FALSE_ANSWERS:.0%} false answers on this set):",
        f"  accuracy {b.accuracy:.3f}, false answers {b.false_answer_rate:.3f}, abstain "
        f"{b.abstain_rate:.3f}, right entry first {result.baseline_top1:.3f}",
        "",
        "answer_threshold  accuracy  false answers  abstain",
    ]
    for point in result.sweep:
        mark = "  <- configured" if abs(point.threshold - d.threshold) < 1e-9 else ""
        lines.append(
            f"{point.threshold:16.2f}  {point.accuracy:8.3f}  {point.false_answer_rate:13.3f}"
            f"  {point.abstain_rate:7.3f}{mark}"
        )
    return "\n".join(lines)


def plot(result: Report, path: Path) -> None:
    """Accuracy, false answers and abstentions against the answer threshold (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = [point.threshold for point in result.sweep]
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    axes.plot(thresholds, [p.accuracy for p in result.sweep], marker="o", label="accuracy")
    axes.plot(
        thresholds, [p.false_answer_rate for p in result.sweep], marker="o", label="false answers"
    )
    axes.plot(thresholds, [p.abstain_rate for p in result.sweep], marker="o", label="abstain")
    axes.axvline(result.at_defaults.threshold, color="grey", linestyle="--", label="configured")
    axes.axhline(BASELINE_FALSE_ANSWERS, color="red", linestyle=":", linewidth=1)
    axes.axhline(
        result.baseline.accuracy,
        color="black",
        linestyle=":",
        linewidth=1,
        label="baseline accuracy at 5% false answers",
    )
    axes.set_xlabel("answer_threshold")
    axes.set_ylabel("rate")
    axes.set_ylim(0, 1)
    axes.set_title(f"FAQ matching on {result.n} questions")
    axes.legend(loc="center left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
