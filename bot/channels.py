"""How platform adapters plug into the bot without the bot importing them.

Adapters are registered under the `aigc_bot.adapters` entry-point group (see
pyproject.toml) and built from `Services`: the message callback and the few
shared resources a channel needs. A factory returns None when its channel is
off (disabled, or its token env var unset), after logging why.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from bot.config import Config
from bot.messages import Incoming, Reply
from storage import Store

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "aigc_bot.adapters"

Handler = Callable[[Incoming], AsyncIterator[Reply]]


@dataclass(frozen=True, slots=True)
class Services:
    """What a channel gets: a callback into the manager and shared resources
    whose lifetime the app owns."""

    config: Config
    handle: Handler
    store: Store
    metrics: Any
    engine_ready: Callable[[], bool]


class Channel(Protocol):
    name: ClassVar[str]
    #: False for channels that only run on request (the console).
    in_run: ClassVar[bool]

    @classmethod
    def create(cls, services: Services) -> Channel | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def platform_token(section: str, enabled: bool, token_env: str) -> str | None:
    """The token of a platform channel, or None after logging why the channel is off."""
    from bot.config import read_secret

    if not enabled:
        log.info("%s channel is off: [%s] enabled = false", section, section)
        return None
    token = read_secret(token_env)
    if token is None:
        log.info(
            "%s channel is off: the env var %s ([%s] token_env) is not set",
            section,
            token_env,
            section,
        )
        return None
    return token.get_secret_value()


def channel_classes() -> dict[str, type[Channel]]:
    """Every installed channel, by entry-point name."""
    found: dict[str, type[Channel]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[entry.name] = entry.load()
        except ImportError as exc:
            log.error("channel %s cannot be loaded: %s", entry.name, exc)
    return found
