"""Who may use the bot and how much, and what may be said.

service.py      GovernanceService: the manager's GovernancePort
access.py       [access] allow and deny lists (config only)
sanctions.py    bans and muted chats (stored, read from memory)
quotas.py       daily quotas and flood control (counted in the database)
moderation.py   blocked terms and patterns, folded matching
classifier.py   an optional local text classifier on a worker thread
commands.py     /ban, /unban, /mute, /usage (admins only)
cli.py          `aigc-bot audit`
"""

from bot.governance.errors import GovernanceError
from bot.governance.service import GovernanceService

__all__ = ["GovernanceError", "GovernanceService"]
