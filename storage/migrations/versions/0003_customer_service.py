"""customer service, delivery and governance

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00.000000

- conversations: the platform address pushed replies go to, the handoff state
  (bot / waiting / claimed, by whom, since when) and the unanswered streak;
- messages: the chat id, a per-platform-message dedup key (unique), the
  operator who wrote it, where a reply came from, tokens generated, and the
  process that owns the turn;
- new tables: handoff_events (audit trail), unanswered_questions, bans,
  mutes, audit_log, instances (process heartbeats);
- web_sessions.last_seen_at goes (nothing ever updated it), and so does
  messages.platform_message_id (its job is dedup_key's now).
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _id() -> sa.Column[Any]:
    return sa.Column("id", IdType, autoincrement=True, nullable=False, primary_key=True)


def _at(name: str = "at") -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("address", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column("handoff_state", sa.String(16), server_default="bot", nullable=False)
        )
        batch.add_column(sa.Column("handoff_operator", sa.String(64), nullable=True))
        batch.add_column(sa.Column("handoff_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("unanswered_streak", sa.Integer(), server_default="0", nullable=False)
        )
        batch.create_index("ix_conversations_handoff", ["handoff_state"])

    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("chat_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("dedup_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("author", sa.String(128), nullable=True))
        batch.add_column(sa.Column("source", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("tokens", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("handled_by", sa.String(32), nullable=True))
        batch.drop_index("ix_messages_user")
        batch.create_index("ix_messages_user", ["platform", "user_id", "created_at"])
        batch.create_index("ix_messages_created", ["created_at"])
        batch.create_index("ix_messages_chat", ["platform", "chat_id", "created_at"])
        batch.create_index("ix_messages_pending", ["turn_done", "role"])
        batch.create_index("uq_messages_dedup_key", ["dedup_key"], unique=True)
        # nothing reads it: a message's platform id lives in dedup_key now
        batch.drop_column("platform_message_id")

    with op.batch_alter_table("web_sessions") as batch:
        batch.drop_column("last_seen_at")

    op.create_table(
        "handoff_events",
        _id(),
        sa.Column(
            "conversation_id",
            IdType,
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("operator", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        _at(),
    )
    op.create_index("ix_handoff_events_conversation", "handoff_events", ["conversation_id", "id"])

    op.create_table(
        "unanswered_questions",
        _id(),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("chat_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("normalized", sa.String(512), nullable=False),
        sa.Column("best_id", sa.String(128), nullable=True),
        sa.Column("best_score", sa.Float(), nullable=True),
        _at(),
    )
    op.create_index("ix_unanswered_normalized", "unanswered_questions", ["normalized"])
    op.create_index("ix_unanswered_at", "unanswered_questions", ["at"])

    op.create_table(
        "bans",
        _id(),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("banned_by", sa.String(160), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("notified", sa.Boolean(), nullable=False),
        _at(),
        sa.UniqueConstraint("platform", "user_id", name="uq_bans_platform_user"),
    )

    op.create_table(
        "mutes",
        _id(),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("chat_id", sa.String(128), nullable=False),
        _at("until"),
        sa.Column("muted_by", sa.String(160), nullable=False),
        sa.UniqueConstraint("platform", "chat_id", name="uq_mutes_platform_chat"),
    )

    op.create_table(
        "audit_log",
        _id(),
        _at(),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("chat_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_audit_at", "audit_log", ["at"])

    op.create_table(
        "instances",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        _at("started_at"),
        _at("heartbeat_at"),
    )


def downgrade() -> None:
    for table in ("instances", "audit_log", "mutes", "bans", "unanswered_questions"):
        op.drop_table(table)
    op.drop_table("handoff_events")
    with op.batch_alter_table("web_sessions") as batch:
        batch.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("messages") as batch:
        for index in (
            "uq_messages_dedup_key",
            "ix_messages_pending",
            "ix_messages_created",
            "ix_messages_chat",
        ):
            batch.drop_index(index)
        batch.drop_index("ix_messages_user")
        batch.create_index("ix_messages_user", ["platform", "user_id"])
        batch.add_column(sa.Column("platform_message_id", sa.String(128), nullable=True))
        for column in ("handled_by", "tokens", "source", "author", "dedup_key", "chat_id"):
            batch.drop_column(column)
    with op.batch_alter_table("conversations") as batch:
        batch.drop_index("ix_conversations_handoff")
        for column in (
            "unanswered_streak",
            "handoff_since",
            "handoff_operator",
            "handoff_state",
            "address",
        ):
            batch.drop_column(column)
