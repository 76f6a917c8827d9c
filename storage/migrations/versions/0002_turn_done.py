"""messages.turn_done: whether a user message's turn is over

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 19:30:00.000000

Several processes on one PostgreSQL database answer one conversation's
messages in arrival order: a turn waits while an earlier message of its
conversation is still waiting for, or in, its own turn. Rows that exist
already are done.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column("turn_done", sa.Boolean(), server_default=sa.true(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("turn_done")
