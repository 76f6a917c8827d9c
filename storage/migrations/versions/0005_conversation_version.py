"""conversations.version: moved by every write to a conversation's messages

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 15:30:00.000000

A process keeps the newest turns of the conversations it serves in memory
(storage.history) instead of reading them back for every reply. Every write
that adds or deletes messages of a conversation adds one to its version in
the same transaction, so a process can tell whether anyone else wrote since:
by the version its own next write finds, or (PostgreSQL, several processes)
by reading the version before it trusts what it holds.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(
            sa.Column("version", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("version")
