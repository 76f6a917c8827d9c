"""Real `Services` around a scripted message handler, for channel tests that
drive an adapter without the manager."""

from __future__ import annotations

from typing import Any

from bot.bus import LocalBus
from bot.channels import Handler, Services
from bot.commands import CommandRegistry, CommandSpec
from bot.config import Config
from bot.delivery import Delivery
from bot.metrics import Metrics
from bot.web_services import WebServices


async def _no_problems() -> list[str]:
    return []


async def _unused(call: Any) -> Any:
    yield None


def scripted_services(config: Config, handle: Handler, store: Any = None) -> Services:
    """Services whose `handle` is the given one; the command registry lists the
    usual commands (for menus), the bus is in-process."""
    commands = CommandRegistry()
    for name in ("start", "help", "reset", "forget", "stats", "cancel"):
        commands.register(CommandSpec(name, f"/{name}", f"the {name} command", _unused))
    metrics = Metrics()
    return Services(
        config=config,
        handle=handle,
        commands=commands,
        delivery=Delivery(store, metrics),
        web=WebServices(store, _no_problems),
        bus=LocalBus(),
        metrics=metrics,
    )
