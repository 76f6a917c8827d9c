"""Questions the knowledge base could not answer, for `aigc-bot faq unanswered`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.base import Repository, guarded, iso
from storage.models import UnansweredQuestion


@dataclass(frozen=True, slots=True)
class UnansweredSummary:
    """One distinct question (by its normalized text) and how often it came."""

    text: str
    count: int
    last_at: datetime
    best_id: str | None
    best_score: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "count": self.count,
            "last_at": iso(self.last_at),
            "best_id": self.best_id,
            "best_score": self.best_score,
        }


def normalize_question(text: str) -> str:
    """Lower case, whitespace folded: what counts as the same question."""
    return " ".join(text.lower().split())[:512]


class UnansweredQuestions(Repository):
    @guarded
    async def record(
        self,
        *,
        platform: str,
        chat_id: str,
        user_id: str,
        text: str,
        best_id: str | None = None,
        best_score: float | None = None,
    ) -> None:
        row = UnansweredQuestion(
            platform=platform,
            chat_id=chat_id,
            user_id=user_id,
            text=text,
            normalized=normalize_question(text),
            best_id=best_id,
            best_score=best_score,
        )
        await self.db.write(lambda session: session.add(row))

    @guarded
    async def most_frequent(
        self, *, since: datetime | None = None, limit: int = 100
    ) -> list[UnansweredSummary]:
        """Distinct unanswered questions, most frequent first (then most recent)."""
        count = func.count().label("count")
        last_at = func.max(UnansweredQuestion.at).label("last_at")
        query = select(
            UnansweredQuestion.normalized,
            func.min(UnansweredQuestion.text),
            count,
            last_at,
            func.max(UnansweredQuestion.best_id),
            func.max(UnansweredQuestion.best_score),
        ).group_by(UnansweredQuestion.normalized)
        if since is not None:
            query = query.where(UnansweredQuestion.at >= since)
        query = query.order_by(count.desc(), last_at.desc()).limit(limit)

        def work(session: Session) -> list[UnansweredSummary]:
            return [
                UnansweredSummary(text, int(n), at, best_id, score)
                for _normalized, text, n, at, best_id, score in session.execute(query)
            ]

        return await self.db.read(work)
