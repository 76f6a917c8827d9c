"""Users and their privacy: what is stored about one person, exported or deleted."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from storage.base import Repository, Transactions, guarded, iso, rows_affected
from storage.conversations import StoredMessage
from storage.history import RecentTurns
from storage.models import Conversation, Draw, Message, UnansweredQuestion, User
from storage.statements import turn_order


@dataclass(slots=True)
class ExportedConversation:
    chat_id: str
    started_at: datetime
    messages: list[StoredMessage] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "chat_id": self.chat_id,
            "started_at": iso(self.started_at),
            "messages": [message.as_dict() for message in self.messages],
        }


@dataclass(frozen=True, slots=True)
class ForgetResult:
    messages: int
    conversations: int
    draws: int
    image_paths: list[str]


@dataclass(frozen=True, slots=True)
class UserStats:
    messages: int
    replies: int
    conversations: int
    draws: int
    first_seen: datetime | None


class People(Repository):
    def __init__(self, db: Transactions, recent: RecentTurns | None = None) -> None:
        super().__init__(db)
        self.recent = recent if recent is not None else RecentTurns(0)

    @guarded
    async def export(self, platform: str, user_id: str) -> list[ExportedConversation]:
        """Every message from or to one person, grouped by conversation."""
        query = (
            select(Message, Conversation.chat_id, Conversation.started_at)
            .join(Conversation, Message.conversation_id == Conversation.id)
            .where(Message.platform == platform, Message.user_id == user_id)
            .order_by(Message.conversation_id, turn_order, Message.id)
        )

        def work(session: Session) -> list[ExportedConversation]:
            conversations: dict[int, ExportedConversation] = {}
            for message, chat_id, started_at in session.execute(query):
                exported = conversations.setdefault(
                    message.conversation_id, ExportedConversation(chat_id, started_at)
                )
                exported.messages.append(
                    StoredMessage(
                        message.id,
                        message.conversation_id,
                        message.role,
                        message.text,
                        message.created_at,
                    )
                )
            return list(conversations.values())

        return await self.db.read(work)

    @guarded
    async def forget(self, platform: str, user_id: str) -> ForgetResult:
        """Delete everything stored about one person; returns image files to remove."""

        touched: set[int] = set()

        def work(session: Session) -> ForgetResult:
            mine = (Message.platform == platform, Message.user_id == user_id)
            conversation_ids = set(session.scalars(select(Message.conversation_id).where(*mine)))
            touched.update(conversation_ids)
            touched.update(
                session.scalars(
                    select(Conversation.id).where(
                        Conversation.platform == platform, Conversation.owner == user_id
                    )
                )
            )
            message_count = session.scalar(select(func.count()).select_from(Message).where(*mine))
            if conversation_ids:  # what other processes hold of them is stale now
                session.execute(
                    update(Conversation)
                    .where(Conversation.id.in_(conversation_ids))
                    .values(version=Conversation.version + 1)
                )
            session.execute(delete(Message).where(*mine))
            emptied = 0
            for conversation_id in conversation_ids:
                remaining = session.scalar(
                    select(func.count())
                    .select_from(Message)
                    .where(Message.conversation_id == conversation_id)
                )
                if not remaining:
                    session.execute(delete(Conversation).where(Conversation.id == conversation_id))
                    emptied += 1
            session.execute(
                delete(Conversation).where(
                    Conversation.platform == platform, Conversation.owner == user_id
                )
            )
            draws = (Draw.platform == platform, Draw.user_id == user_id)
            image_paths = [
                path for path in session.scalars(select(Draw.image_path).where(*draws)) if path
            ]
            deleted_draws = session.execute(delete(Draw).where(*draws))
            session.execute(
                delete(UnansweredQuestion).where(
                    UnansweredQuestion.platform == platform, UnansweredQuestion.user_id == user_id
                )
            )
            session.execute(delete(User).where(User.platform == platform, User.user_id == user_id))
            return ForgetResult(
                messages=message_count or 0,
                conversations=emptied,
                draws=rows_affected(deleted_draws),
                image_paths=image_paths,
            )

        try:
            return await self.db.write(work)
        finally:
            for conversation_id in touched:
                self.recent.drop(conversation_id)

    @guarded
    async def stats(self, platform: str, user_id: str) -> UserStats:
        def work(session: Session) -> UserStats:
            mine = (Message.platform == platform, Message.user_id == user_id)
            counts = dict(
                session.execute(
                    select(Message.role, func.count()).where(*mine).group_by(Message.role)
                ).all()
            )
            conversations = session.scalar(
                select(func.count(func.distinct(Message.conversation_id))).where(*mine)
            )
            draws = session.scalar(
                select(func.count())
                .select_from(Draw)
                .where(Draw.platform == platform, Draw.user_id == user_id, Draw.status == "done")
            )
            first_seen = session.scalar(
                select(User.created_at).where(User.platform == platform, User.user_id == user_id)
            )
            return UserStats(
                messages=counts.get("user", 0),
                replies=counts.get("bot", 0) + counts.get("operator", 0),
                conversations=conversations or 0,
                draws=draws or 0,
                first_seen=first_seen,
            )

        return await self.db.read(work)
