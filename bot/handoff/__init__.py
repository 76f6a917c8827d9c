"""Handoff to people: `/human`, states bot -> waiting -> claimed -> bot, the
operator desk behind the console, notices to the team.

    service.py    HandoffService: the manager's HandoffPort, /human, lifecycle
    desk.py       OperatorDesk: what the operator API may do
    states.py     the state machine and what each change brings (events, gauge)
    notify.py     notify_url webhook (retried) and operators' chats
    triggers.py   trigger phrases, whole words
    hours.py      [handoff] hours
    operators.py  operator tokens from the environment
    views.py      the JSON shapes of conversations, messages and events
"""

from bot.handoff.desk import (
    Answered,
    Conflict,
    HandoffError,
    InvalidRequest,
    NotFound,
    OperatorDesk,
)
from bot.handoff.service import HandoffService
from bot.handoff.views import TOPIC, ConversationView, Transcript, TranscriptEntry

__all__ = [
    "TOPIC",
    "Answered",
    "Conflict",
    "ConversationView",
    "HandoffError",
    "HandoffService",
    "InvalidRequest",
    "NotFound",
    "OperatorDesk",
    "Transcript",
    "TranscriptEntry",
]
