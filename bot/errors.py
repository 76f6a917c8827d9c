"""Errors that cross from `bot` into the adapters: adapters never see storage's."""

from __future__ import annotations


class Unavailable(Exception):
    """Something the bot depends on (the database) is down for now; try again
    later. `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 10.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StartupError(Exception):
    """The bot (or one channel) cannot start; the message is one line for the operator."""
