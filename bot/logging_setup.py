"""Logging with secrets redacted.

Every secret read through `bot.config.read_secret` is registered here, and a
filter on the root handlers replaces it wherever it shows up — in a message,
its arguments or a traceback. httpx logs request URLs (which hold the Telegram
token) at INFO, so it is kept at WARNING as well.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

_secrets: set[str] = set()
_lock = threading.Lock()
REDACTED = "[REDACTED]"


def register_secret(value: str) -> None:
    if len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Formats the record once and scrubs every registered secret from it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is now, not the one at set-up (which a
    test runner or an embedding program may have replaced and closed since)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "urllib3", "aiosqlite", "asyncio", "filelock", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
