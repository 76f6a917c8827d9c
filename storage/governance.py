"""Governance records: bans, muted chats, the audit log, and the counts that
daily quotas and flood control are computed from.

Quotas are counted from `messages` (user messages since a moment, tokens of
the bot's replies to a person since a moment), so every process and every
restart sees the same numbers. The statements that run on the message path
are built once with bound parameters, like storage.conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, case, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from storage.base import Repository, aware, guarded, iso, rows_affected
from storage.models import AuditEntry, Ban, Conversation, Message, Mute, User, utcnow

_messages: Table = Message.__table__  # type: ignore[assignment]
_conversations: Table = Conversation.__table__  # type: ignore[assignment]
_users: Table = User.__table__  # type: ignore[assignment]
_bans: Table = Ban.__table__  # type: ignore[assignment]
_mutes: Table = Mute.__table__  # type: ignore[assignment]
_audit: Table = AuditEntry.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class BanRecord:
    platform: str
    user_id: str
    banned_by: str
    reason: str
    notified: bool
    at: datetime


@dataclass(frozen=True, slots=True)
class MuteRecord:
    platform: str
    chat_id: str
    until: datetime
    muted_by: str


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    at: datetime
    kind: str
    actor: str
    platform: str
    chat_id: str
    user_id: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "at": iso(self.at),
            "kind": self.kind,
            "actor": self.actor,
            "platform": self.platform,
            "chat_id": self.chat_id,
            "user_id": self.user_id,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class UsageCounts:
    """What one message's quota checks need, read in one transaction."""

    #: The person's user messages since the start of the day.
    messages: int = 0
    #: Tokens the model generated for the person since the start of the day.
    tokens: int = 0
    #: User messages in the chat within the flood window.
    chat_messages: int = 0
    #: The oldest of those (None when there are none).
    chat_oldest: datetime | None = None


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals of one person or one chat over a period."""

    platform: str
    id: str
    name: str
    messages: int
    tokens: int


@dataclass(frozen=True, slots=True)
class UsageTotals:
    messages: int
    tokens: int
    users: list[UsageRow]
    chats: list[UsageRow]


_is_user = _messages.c.role == "user"
_is_bot = _messages.c.role == "bot"
_user_messages = func.coalesce(func.sum(case((_is_user, 1), else_=0)), 0)
_bot_tokens = func.coalesce(
    func.sum(case((_is_bot, func.coalesce(_messages.c.tokens, 0)), else_=0)), 0
)

_PERSON_TODAY = select(_user_messages, _bot_tokens).where(
    _messages.c.platform == bindparam("platform"),
    _messages.c.user_id == bindparam("user_id"),
    _messages.c.created_at >= bindparam("day", type_=_messages.c.created_at.type),
)
_CHAT_WINDOW = select(func.count(), func.min(_messages.c.created_at)).where(
    _messages.c.created_at >= bindparam("window", type_=_messages.c.created_at.type),
    _messages.c.platform == bindparam("platform"),
    _messages.c.chat_id == bindparam("chat_id"),
    _is_user,
)
_ALL_TOKENS = select(func.coalesce(func.sum(_messages.c.tokens), 0)).where(
    _messages.c.created_at >= bindparam("day", type_=_messages.c.created_at.type),
    _is_bot,
)
_CLAIM_NOTICE = (
    update(_bans)
    .where(
        _bans.c.platform == bindparam("b_platform"),
        _bans.c.user_id == bindparam("b_user_id"),
        _bans.c.notified.is_(False),
    )
    .values(notified=True)
)


def _insert_ban(dialect_insert: Any) -> Any:
    return dialect_insert(_bans).on_conflict_do_nothing(index_elements=["platform", "user_id"])


def _upsert_mute(dialect_insert: Any) -> Any:
    statement = dialect_insert(_mutes)
    return statement.on_conflict_do_update(
        index_elements=["platform", "chat_id"],
        set_={"until": statement.excluded.until, "muted_by": statement.excluded.muted_by},
    )


_INSERT_BAN = {"sqlite": _insert_ban(sqlite_insert), "postgresql": _insert_ban(postgresql_insert)}
_UPSERT_MUTE = {
    "sqlite": _upsert_mute(sqlite_insert),
    "postgresql": _upsert_mute(postgresql_insert),
}


class GovernanceRecords(Repository):
    # -- bans ------------------------------------------------------------------------

    @guarded
    async def bans(self) -> list[BanRecord]:
        query = select(_bans).order_by(_bans.c.id)

        def work(session: Session) -> list[BanRecord]:
            return [
                BanRecord(
                    row.platform, row.user_id, row.banned_by, row.reason, row.notified, row.at
                )
                for row in session.execute(query)
            ]

        return await self.db.read(work)

    @guarded
    async def add_ban(self, platform: str, user_id: str, *, by: str, reason: str = "") -> bool:
        """Ban a person; False when they were banned already."""
        values = {
            "platform": platform,
            "user_id": user_id,
            "banned_by": by,
            "reason": reason,
            "notified": False,
            "at": utcnow(),
        }
        statement = _INSERT_BAN[self.dialect]
        return await self.db.write(
            lambda session: bool(rows_affected(session.connection().execute(statement, values)))
        )

    @guarded
    async def remove_ban(self, platform: str, user_id: str) -> bool:
        """Lift a ban; False when there was none."""
        statement = delete(_bans).where(_bans.c.platform == platform, _bans.c.user_id == user_id)
        return await self.db.write(
            lambda session: bool(rows_affected(session.connection().execute(statement)))
        )

    @guarded
    async def claim_ban_notice(self, platform: str, user_id: str) -> bool:
        """True exactly once per ban (across processes): the caller tells the
        banned person, every later caller stays silent."""
        params = {"b_platform": platform, "b_user_id": user_id}
        return await self.db.write(
            lambda session: bool(rows_affected(session.connection().execute(_CLAIM_NOTICE, params)))
        )

    # -- mutes -----------------------------------------------------------------------

    @guarded
    async def active_mutes(self, now: datetime) -> list[MuteRecord]:
        query = select(_mutes).where(_mutes.c.until > now).order_by(_mutes.c.id)

        def work(session: Session) -> list[MuteRecord]:
            return [
                MuteRecord(row.platform, row.chat_id, aware(row.until), row.muted_by)
                for row in session.execute(query)
            ]

        return await self.db.read(work)

    @guarded
    async def set_mute(self, platform: str, chat_id: str, *, until: datetime, by: str) -> None:
        values = {"platform": platform, "chat_id": chat_id, "until": until, "muted_by": by}
        statement = _UPSERT_MUTE[self.dialect]
        await self.db.write(lambda session: session.connection().execute(statement, values))

    @guarded
    async def remove_mute(self, platform: str, chat_id: str) -> bool:
        """Unmute a chat; False when it was not muted (or the mute had run out)."""
        now = utcnow()
        where = (_mutes.c.platform == platform, _mutes.c.chat_id == chat_id)

        def work(session: Session) -> bool:
            connection = session.connection()
            active = connection.execute(select(_mutes.c.id).where(*where, _mutes.c.until > now))
            was_active = active.first() is not None
            connection.execute(delete(_mutes).where(*where))
            return was_active

        return await self.db.write(work)

    # -- the audit log -----------------------------------------------------------------

    @guarded
    async def record(
        self,
        kind: str,
        *,
        actor: str,
        platform: str = "",
        chat_id: str = "",
        user_id: str = "",
        detail: str = "",
    ) -> None:
        values = {
            "at": utcnow(),
            "kind": kind[:32],
            "actor": actor[:160],
            "platform": platform[:32],
            "chat_id": chat_id[:128],
            "user_id": user_id[:128],
            "detail": detail,
        }
        await self.db.write(lambda session: session.connection().execute(_audit.insert(), values))

    @guarded
    async def has_entry(self, kind: str, *, platform: str, chat_id: str, user_id: str) -> bool:
        """Whether the log holds an entry of `kind` about exactly this chat and person."""
        query = (
            select(_audit.c.id)
            .where(
                _audit.c.kind == kind,
                _audit.c.platform == platform,
                _audit.c.chat_id == chat_id,
                _audit.c.user_id == user_id,
            )
            .limit(1)
        )
        return await self.db.read(lambda session: session.execute(query).first() is not None)

    @guarded
    async def entries(
        self, *, since: datetime | None = None, kind: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """The newest `limit` entries (since `since`, of `kind`), oldest first."""
        query = select(_audit)
        if since is not None:
            query = query.where(_audit.c.at >= since)
        if kind is not None:
            query = query.where(_audit.c.kind == kind)
        query = query.order_by(_audit.c.id.desc()).limit(limit)

        def work(session: Session) -> list[AuditRecord]:
            rows = [
                AuditRecord(
                    row.id,
                    aware(row.at),
                    row.kind,
                    row.actor,
                    row.platform,
                    row.chat_id,
                    row.user_id,
                    row.detail,
                )
                for row in session.execute(query)
            ]
            rows.reverse()
            return rows

        return await self.db.read(work)

    # -- counts for quotas ---------------------------------------------------------------

    @guarded
    async def counts(
        self,
        platform: str,
        user_id: str,
        chat_id: str,
        *,
        day: datetime | None = None,
        window: datetime | None = None,
    ) -> UsageCounts:
        """The person's messages and tokens since `day` (when given) and the
        chat's messages since `window` (when given), in one transaction."""

        def work(session: Session) -> UsageCounts:
            connection = session.connection()
            messages = tokens = chat_messages = 0
            oldest = None
            if day is not None:
                row = connection.execute(
                    _PERSON_TODAY, {"platform": platform, "user_id": user_id, "day": day}
                ).one()
                messages, tokens = int(row[0]), int(row[1])
            if window is not None:
                row = connection.execute(
                    _CHAT_WINDOW, {"platform": platform, "chat_id": chat_id, "window": window}
                ).one()
                chat_messages = int(row[0])
                oldest = aware(row[1]) if row[1] is not None else None
            return UsageCounts(messages, tokens, chat_messages, oldest)

        return await self.db.read(work)

    @guarded
    async def tokens_since(self, day: datetime) -> int:
        """Tokens the model generated for everyone since `day`."""
        return await self.db.read(
            lambda session: int(
                session.connection().execute(_ALL_TOKENS, {"day": day}).scalar() or 0
            )
        )

    @guarded
    async def totals(self, since: datetime, *, limit: int = 10) -> UsageTotals:
        """Messages and tokens since `since`: in all, and for the busiest people and chats."""
        recent = _messages.c.created_at >= since
        messages, tokens = _user_messages.label("messages"), _bot_tokens.label("tokens")
        people = (
            select(
                _messages.c.platform,
                _messages.c.user_id,
                func.max(_users.c.user_name),
                messages,
                tokens,
            )
            .select_from(
                _messages.outerjoin(
                    _users,
                    (_users.c.platform == _messages.c.platform)
                    & (_users.c.user_id == _messages.c.user_id),
                )
            )
            .where(recent, _messages.c.role.in_(("user", "bot")))
            .group_by(_messages.c.platform, _messages.c.user_id)
            .order_by(messages.desc(), tokens.desc(), _messages.c.user_id)
            .limit(limit)
        )
        # Replies carry no chat_id of their own: their conversation says where they went.
        chats = (
            select(_conversations.c.platform, _conversations.c.chat_id, messages, tokens)
            .select_from(
                _messages.join(_conversations, _conversations.c.id == _messages.c.conversation_id)
            )
            .where(recent, _messages.c.role.in_(("user", "bot")))
            .group_by(_conversations.c.platform, _conversations.c.chat_id)
            .order_by(messages.desc(), tokens.desc(), _conversations.c.chat_id)
            .limit(limit)
        )
        overall = select(_user_messages, _bot_tokens).where(recent)

        def work(session: Session) -> UsageTotals:
            connection = session.connection()
            total = connection.execute(overall).one()
            return UsageTotals(
                int(total[0]),
                int(total[1]),
                [
                    UsageRow(platform, user, name or "", int(n), int(t))
                    for platform, user, name, n, t in connection.execute(people)
                ],
                [
                    UsageRow(platform, chat, "", int(n), int(t))
                    for platform, chat, n, t in connection.execute(chats)
                ],
            )

        return await self.db.read(work)
