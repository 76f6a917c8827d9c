"""Persistence: SQLAlchemy 2 models, the store API and Alembic migrations.

This package knows nothing of the bot: it keeps primitives (store a message,
end a turn, count draws with these statuses) and leaves policy to `bot`.
"""

from storage.base import StorageUnavailable, aware, iso
from storage.conversations import ConversationPlace, Intake, StoredMessage
from storage.people import ExportedConversation, ForgetResult, UserStats
from storage.store import Store
from storage.turns import PendingTurn, TurnLock

__all__ = [
    "ConversationPlace",
    "ExportedConversation",
    "ForgetResult",
    "Intake",
    "PendingTurn",
    "StorageUnavailable",
    "Store",
    "StoredMessage",
    "TurnLock",
    "UserStats",
    "aware",
    "iso",
]
