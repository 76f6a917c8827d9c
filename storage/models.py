"""ORM tables. Schema changes go through a new Alembic migration, never here alone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    true,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
IdType = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "user_id", name="uq_users_platform_user"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128))
    user_name: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Conversation(Base):
    """One thread of history. `owner` is the user id for per-user history and
    '' when the whole chat shares it. `/reset` closes it (`active = False`)."""

    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_key", "platform", "chat_id", "owner", "active"),
        Index("ix_conversations_handoff", "handoff_state"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str] = mapped_column(String(128), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Where pushed replies go on the platform ({"chat_id", "user_id", "thread_id"}),
    #: as of the user's latest message.
    address: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    #: "bot", "waiting" (for a person) or "claimed" (by the operator named here).
    handoff_state: Mapped[str] = mapped_column(
        String(16), default="bot", server_default=sql_text("'bot'")
    )
    handoff_operator: Mapped[str | None] = mapped_column(String(64), nullable=True)
    handoff_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: Questions in a row the bot could not answer (reset by an answered one).
    unanswered_streak: Mapped[int] = mapped_column(Integer, default=0, server_default=sql_text("0"))
    #: One more with every write that adds or deletes its messages (storage.history).
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default=sql_text("0"))


class Message(Base):
    """A user's message, the bot's reply or an operator's. `user_id` is the
    person it is from (role "user") or to (roles "bot", "operator"), so export
    and forget work in shared chats."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation", "conversation_id", "id"),
        Index("ix_messages_user", "platform", "user_id", "created_at"),
        Index("ix_messages_created", "created_at"),
        Index("ix_messages_chat", "platform", "chat_id", "created_at"),
        Index("ix_messages_pending", "turn_done", "role"),
        Index("uq_messages_dedup_key", "dedup_key", unique=True),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    platform: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(8))
    text: Mapped[str] = mapped_column(Text)
    reply_to_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: False while a user message waits for or is in its turn (see Store.conversation_lock).
    turn_done: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    #: The chat the message was written in (conversation.chat_id, kept here for counting).
    chat_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: Unique per platform message: "<platform>:<chat>:<message id>" (or the web
    #: Idempotency-Key), so a message delivered twice is stored once.
    dedup_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: The operator who wrote it (role "operator").
    author: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: Where a reply came from: {"kind": "model"} or {"kind": "faq", "id": ...}.
    source: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)
    #: Tokens the model generated for this reply (quotas).
    tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The process (`instances.id`) that owns this user message's turn.
    handled_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


#: History is read newest turn first (a reply sorts right after the message it
#: answers: `coalesce(reply_to_id, id)`); this index serves that order, so a
#: read costs its limit, not the conversation's length.
Index(
    "ix_messages_turn_order",
    Message.conversation_id,
    func.coalesce(Message.reply_to_id, Message.id),
    Message.id,
)


class Draw(Base):
    """One `/draw` request and its outcome; the PNG lives under the data dir."""

    __tablename__ = "draws"
    __table_args__ = (Index("ix_draws_user", "platform", "user_id", "created_at"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(64), unique=True)
    platform: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    prompt: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebSession(Base):
    """A web-widget session. Only the SHA-256 of the bearer token is stored."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HandoffEvent(Base):
    """The audit trail of a conversation's handoff states: who moved it where, when."""

    __tablename__ = "handoff_events"
    __table_args__ = (Index("ix_handoff_events_conversation", "conversation_id", "id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))
    operator: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(String(64), default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UnansweredQuestion(Base):
    """A question the knowledge base had no confident answer for."""

    __tablename__ = "unanswered_questions"
    __table_args__ = (
        Index("ix_unanswered_normalized", "normalized"),
        Index("ix_unanswered_at", "at"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    text: Mapped[str] = mapped_column(Text)
    #: Lower-cased, whitespace-folded text: what "most frequent" groups by.
    normalized: Mapped[str] = mapped_column(String(512))
    best_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    best_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Ban(Base):
    """A person the bot ignores. `notified` once they were told so."""

    __tablename__ = "bans"
    __table_args__ = (UniqueConstraint("platform", "user_id", name="uq_bans_platform_user"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128))
    banned_by: Mapped[str] = mapped_column(String(160))
    reason: Mapped[str] = mapped_column(Text, default="")
    notified: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Mute(Base):
    """A chat where the bot stays silent until `until`."""

    __tablename__ = "mutes"
    __table_args__ = (UniqueConstraint("platform", "chat_id", name="uq_mutes_platform_chat"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(128))
    until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    muted_by: Mapped[str] = mapped_column(String(160))


class AuditEntry(Base):
    """One moderation or admin action, for `aigc-bot audit`."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_at", "at"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(160))
    platform: Mapped[str] = mapped_column(String(32), default="")
    chat_id: Mapped[str] = mapped_column(String(128), default="")
    user_id: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class Instance(Base):
    """A running `aigc-bot` process; its heartbeat tells the others it is alive,
    so turns it owned are taken over only once it is gone."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
