"""Persistence: SQLAlchemy 2 async models, the store API and Alembic migrations.

This package knows nothing of the bot; it stores users, conversations,
messages, draws and web sessions.
"""

from storage.store import (
    ExportedConversation,
    ForgetResult,
    StorageUnavailable,
    Store,
    StoredMessage,
    UserStats,
)

__all__ = [
    "ExportedConversation",
    "ForgetResult",
    "StorageUnavailable",
    "Store",
    "StoredMessage",
    "UserStats",
]
