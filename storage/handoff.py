"""Handoff to people: a conversation's state (bot, waiting, claimed), its audit
trail, and the unanswered streak that can trigger it.

Every change of state is one transaction that re-reads the conversation's row
under a row lock (`SELECT ... FOR UPDATE` on PostgreSQL; SQLite has one writer
at a time), decides from what it read, updates the row and appends the audit
row. Two operators claiming at once in two processes therefore see each
other's claim: one changes the state, the other reads it as taken. The rules
(which state may follow which) are the caller's; this module only applies
them atomically.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, and_, case, func, select, update
from sqlalchemy.orm import Session

from storage.base import Repository, guarded
from storage.models import Conversation, HandoffEvent, Message, User, utcnow

_conversations: Table = Conversation.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
_events: Table = HandoffEvent.__table__  # type: ignore[assignment]
_users: Table = User.__table__  # type: ignore[assignment]

STATES = ("bot", "waiting", "claimed")


@dataclass(frozen=True, slots=True)
class HandoffState:
    """Who has a conversation: `state`, the operator holding it, since when."""

    state: str
    operator: str | None
    since: datetime | None


@dataclass(frozen=True, slots=True)
class HandoffChange:
    """What a transition found (`before`) and left (`after`); equal when it changed nothing."""

    before: HandoffState
    after: HandoffState

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True, slots=True)
class HandoffSummary:
    """One conversation as the operator console lists it."""

    id: int
    platform: str
    chat_id: str
    #: The person: the conversation's owner, or in a shared chat its latest writer.
    user_id: str
    user_name: str
    state: str
    operator: str | None
    #: When the current state began (the conversation's start if it never changed).
    since: datetime
    last_text: str
    active: bool


@dataclass(frozen=True, slots=True)
class AuditEntry:
    state: str
    operator: str | None
    reason: str
    at: datetime


_last_user_message = (
    select(_messages.c.text, _messages.c.user_id)
    .where(_messages.c.conversation_id == _conversations.c.id, _messages.c.role == "user")
    .order_by(_messages.c.id.desc())
    .limit(1)
    .correlate(_conversations)
)
_SUMMARY = select(
    _conversations.c.id,
    _conversations.c.platform,
    _conversations.c.chat_id,
    _conversations.c.owner,
    _conversations.c.handoff_state,
    _conversations.c.handoff_operator,
    func.coalesce(_conversations.c.handoff_since, _conversations.c.started_at).label("since"),
    _conversations.c.active,
    _last_user_message.with_only_columns(_messages.c.text).scalar_subquery().label("last_text"),
    _last_user_message.with_only_columns(_messages.c.user_id).scalar_subquery().label("last_user"),
)


def _names(session: Session, rows: Sequence[Any]) -> dict[tuple[str, str], str]:
    """Display names of the people in `rows`, by (platform, user id)."""
    wanted = {(row.platform, row.owner or row.last_user or "") for row in rows}
    by_platform: dict[str, set[str]] = {}
    for platform, user_id in wanted:
        if user_id:
            by_platform.setdefault(platform, set()).add(user_id)
    names: dict[tuple[str, str], str] = {}
    for platform, user_ids in by_platform.items():
        query = select(_users.c.user_id, _users.c.user_name).where(
            _users.c.platform == platform, _users.c.user_id.in_(sorted(user_ids))
        )
        for found in session.connection().execute(query):
            names[(platform, found.user_id)] = found.user_name
    return names


def _summaries(session: Session, rows: Sequence[Any]) -> list[HandoffSummary]:
    names = _names(session, rows)
    summaries = []
    for row in rows:
        user_id = row.owner or row.last_user or ""
        summaries.append(
            HandoffSummary(
                id=int(row.id),
                platform=row.platform,
                chat_id=row.chat_id,
                user_id=user_id,
                user_name=names.get((row.platform, user_id), ""),
                state=row.handoff_state,
                operator=row.handoff_operator,
                since=row.since,
                last_text=row.last_text or "",
                active=bool(row.active),
            )
        )
    return summaries


class Handoffs(Repository):
    """Handoff states, their audit trail and the unanswered streak."""

    @guarded
    async def transition(
        self,
        conversation_id: int,
        *,
        to: str,
        allowed_from: Collection[str],
        operator: str | None = None,
        reason: str = "",
        holder_only: bool = False,
    ) -> HandoffChange | None:
        """Move a conversation to state `to` if its current state is in
        `allowed_from` (and, with `holder_only`, a claimed conversation only
        when `operator` holds it), in one transaction with its audit row.
        `operator` is kept with state "claimed" only. None when the
        conversation does not exist; otherwise what was found and left."""
        if to not in STATES:
            raise ValueError(f"unknown handoff state {to!r}")
        locked = (
            select(
                _conversations.c.handoff_state,
                _conversations.c.handoff_operator,
                _conversations.c.handoff_since,
            )
            .where(_conversations.c.id == conversation_id)
            .with_for_update()
        )
        holder = operator if to == "claimed" else None

        def work(session: Session) -> HandoffChange | None:
            connection = session.connection()
            row = connection.execute(locked).first()
            if row is None:
                return None
            before = HandoffState(row.handoff_state, row.handoff_operator, row.handoff_since)
            if before.state not in allowed_from:
                return HandoffChange(before, before)
            if holder_only and before.state == "claimed" and before.operator != operator:
                return HandoffChange(before, before)
            if before.state == to and before.operator == holder:
                return HandoffChange(before, before)
            now = utcnow()
            connection.execute(
                update(_conversations)
                .where(_conversations.c.id == conversation_id)
                .values(
                    handoff_state=to,
                    handoff_operator=holder,
                    handoff_since=now,
                    unanswered_streak=0,
                )
            )
            connection.execute(
                _events.insert().values(
                    conversation_id=conversation_id,
                    state=to,
                    operator=operator,
                    reason=reason[:64],
                    at=now,
                )
            )
            return HandoffChange(before, HandoffState(to, holder, now))

        return await self.db.write(work)

    @guarded
    async def note_outcome(self, conversation_id: int, *, answered: bool) -> int:
        """Count one more unanswered question in a row (or reset the count after
        an answered one); the count now."""
        column = _conversations.c.unanswered_streak
        statement = (
            update(_conversations)
            .where(_conversations.c.id == conversation_id)
            .values(unanswered_streak=0 if answered else column + 1)
            .returning(column)
        )

        def work(session: Session) -> int:
            found = session.connection().execute(statement).scalar()
            return int(found or 0)

        return await self.db.write(work)

    @guarded
    async def summary(self, conversation_id: int) -> HandoffSummary | None:
        query = _SUMMARY.where(_conversations.c.id == conversation_id)

        def work(session: Session) -> HandoffSummary | None:
            rows = list(session.connection().execute(query))
            found = _summaries(session, rows)
            return found[0] if found else None

        return await self.db.read(work)

    @guarded
    async def listing(self, states: Collection[str], *, limit: int = 200) -> list[HandoffSummary]:
        """Active conversations in `states`: waiting, then claimed, then with the
        bot; newest state change first within each."""
        state = _conversations.c.handoff_state
        rank = case((state == "waiting", 0), (state == "claimed", 1), else_=2)
        query = (
            _SUMMARY.where(
                _conversations.c.handoff_state.in_(sorted(states)),
                _conversations.c.active.is_(True),
            )
            .order_by(
                rank,
                func.coalesce(_conversations.c.handoff_since, _conversations.c.started_at).desc(),
                _conversations.c.id.desc(),
            )
            .limit(limit)
        )

        def work(session: Session) -> list[HandoffSummary]:
            return _summaries(session, list(session.connection().execute(query)))

        return await self.db.read(work)

    @guarded
    async def count(self, state: str) -> int:
        """Active conversations in `state` (the waiting gauge)."""
        query = select(func.count()).where(
            _conversations.c.handoff_state == state, _conversations.c.active.is_(True)
        )
        return await self.db.read(lambda session: int(session.scalar(query) or 0))

    @guarded
    async def audit(self, conversation_id: int, *, limit: int = 200) -> list[AuditEntry]:
        """The conversation's state changes, oldest first."""
        query = (
            select(_events.c.state, _events.c.operator, _events.c.reason, _events.c.at)
            .where(_events.c.conversation_id == conversation_id)
            .order_by(_events.c.id.desc())
            .limit(limit)
        )

        def work(session: Session) -> list[AuditEntry]:
            rows = session.connection().execute(query)
            return [AuditEntry(row.state, row.operator, row.reason, row.at) for row in rows]

        entries = await self.db.read(work)
        return entries[::-1]

    @guarded
    async def unreplied_since(self, conversation_id: int) -> datetime | None:
        """When the conversation last started waiting, if no operator has
        written in it since (the time to a first reply); else None."""
        waited = (
            select(func.max(_events.c.at))
            .where(_events.c.conversation_id == conversation_id, _events.c.state == "waiting")
            .scalar_subquery()
        )
        replied = select(func.count()).where(
            and_(
                _messages.c.conversation_id == conversation_id,
                _messages.c.role == "operator",
                _messages.c.created_at >= waited,
            )
        )

        def work(session: Session) -> datetime | None:
            connection = session.connection()
            since: datetime | None = connection.execute(select(waited)).scalar()
            if since is None or connection.execute(replied).scalar():
                return None
            return since

        return await self.db.read(work)
