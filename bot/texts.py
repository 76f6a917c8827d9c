"""What the bot says when it is not the model talking: one place for the copy
every channel shows, so wording stays consistent and is easy to change."""

from __future__ import annotations

STORAGE_DOWN = (
    "I can't reach my memory right now, so I didn't take that message. "
    "Please try again in a moment."
)
ENGINE_DOWN = (
    "I can't answer right now (my language model is unavailable). "
    "Your message is saved; please try again later."
)
TIMED_OUT = "That took me too long to answer, sorry. Please try again."
INTERNAL_ERROR = "Something went wrong on my side. Please try again."
RESTARTING = "I'm restarting; please send that again in a minute."
EMPTY = "Please send me a text message."
TEXT_ONLY = "I can only read text messages. Please type what you'd like to say."
CANCELLED = "Cancelled."
NOTHING_TO_CANCEL = "You have nothing queued or running."
STILL_WORKING = "I'm still working on that message; my answer will appear here."
LOST_ANSWER = (
    "Sorry, I restarted before I could answer your message: \u201c{text}\u201d. "
    "Please send it again."
)
DRAW_OFF = "Drawing is turned off on this bot."
ADMIN_ONLY = "Sorry, only the bot's admins can use /{name}."


def too_long(size: int, limit: int) -> str:
    return (
        f"That message is too long ({size:,} characters; the limit is {limit:,}). "
        "Please shorten it."
    )


def rate_limited(wait_s: float) -> str:
    return f"You're sending messages faster than I can answer. Please wait {wait_s:.0f} s."


def unknown_command(name: str) -> str:
    return f"I don't know /{name}."
