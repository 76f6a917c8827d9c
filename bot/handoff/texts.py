"""What the handoff tells users, in one place."""

from __future__ import annotations

HANDED_OVER = "A person will answer here soon; I've passed on our conversation."
AWAY = (
    "Our team is away right now; people are back {when}. I've passed on our "
    "conversation, and a person will answer here then."
)
ALREADY_WAITING = "You're in the queue: a person will answer here as soon as they can."
ALREADY_CLAIMED = "A person from our team already has our conversation and will answer here."
BACK_TO_BOT = (
    "OK, you're back with me, the bot. Ask me anything, or send /human to reach a person again."
)
RELEASED = (
    "Our team has handed the conversation back to me, the bot. Ask me anything, "
    "or send /human to reach a person again."
)
