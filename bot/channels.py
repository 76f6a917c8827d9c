"""The adapter contract: how platform channels plug into the bot without the
bot importing them.

A channel has two halves. Inbound, it turns platform events into `Incoming`
and calls `Services.handle`, rendering the replies of that request. Outbound,
it attaches an `OutboundChannel` to `Services.delivery`, through which the bot
pushes replies to a stored conversation at any time (an operator's answer, an
answer recovered after a crash). Both halves render through the same code per
platform, so splitting, pacing and per-conversation order live in one place.

Channels are registered under the `aigc_bot.adapters` entry-point group (see
pyproject.toml) and built from `Services`. A factory returns None when its
channel is off (disabled, or its token env var unset), after logging why.
User-facing copy is in `bot.texts`; errors that reach adapters are
`bot.errors.Unavailable` and `bot.errors.StartupError`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar, Protocol

from bot.commands import CommandRegistry
from bot.config import Config, read_secret
from bot.errors import StartupError
from bot.messages import Address, ConversationKey, Incoming, Reply
from bot.metrics import Metrics

if TYPE_CHECKING:
    from bot.bus import EventBus
    from bot.delivery import Delivery
    from bot.handoff import OperatorDesk
    from bot.web_services import WebServices

__all__ = [
    "Channel",
    "ChannelState",
    "Handler",
    "OutboundChannel",
    "Services",
    "StartupError",
    "channel_classes",
    "platform_token",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "aigc_bot.adapters"

Handler = Callable[[Incoming], AsyncGenerator[Reply, None]]


class OutboundChannel(Protocol):
    """The outbound half of a channel: deliver one reply to a conversation's
    address outside any request, after the replies already on their way to
    that conversation."""

    platform: str

    async def push(self, conversation: ConversationKey, to: Address, reply: Reply) -> None: ...


@dataclass(slots=True)
class ChannelState:
    """What `/healthz` reports for one channel: "up", "connecting", "down" or "off"."""

    state: str = "connecting"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Services:
    """What a channel gets: a callback into the manager and the shared services
    whose lifetime the app owns."""

    config: Config
    handle: Handler
    commands: CommandRegistry
    delivery: Delivery
    web: WebServices
    bus: EventBus
    metrics: Metrics
    #: The operator console's API (handoff to people); None when handoff is off.
    operator_desk: OperatorDesk | None = None


class Channel(Protocol):
    name: ClassVar[str]
    #: False for channels that only run on request (the console).
    in_run: ClassVar[bool]
    #: Reported on /healthz; kept up to date by the channel.
    health: ChannelState

    @classmethod
    def create(cls, services: Services) -> Channel | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def platform_token(section: str, enabled: bool, token_env: str) -> str | None:
    """The token of a platform channel, or None after logging why the channel is off."""
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
