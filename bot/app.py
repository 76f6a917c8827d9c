"""Wiring and lifetime: open the store, start the engines, build the manager,
run the channels, and tear everything down in reverse on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from types import TracebackType
from typing import Any

from bot.channels import Channel, Services, channel_classes
from bot.config import Config
from bot.engines import EngineUnavailable, TextEngine, create_text_engine
from bot.manager import ConversationManager
from bot.metrics import Metrics
from storage import Store

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The bot cannot start; the message is one line for the operator."""


class BotApp:
    """`async with BotApp(config) as app:` gives a running manager and services."""

    def __init__(self, config: Config, *, engine: TextEngine | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self._engine = engine
        self.store: Store | None = None
        self.engine: TextEngine | None = None
        self.drawer: Any = None
        self.manager: ConversationManager | None = None

    async def __aenter__(self) -> BotApp:
        from storage import StorageUnavailable

        try:
            self.store = await Store.open(
                self.config.storage.url,
                busy_timeout_ms=self.config.storage.busy_timeout_ms,
                echo=self.config.storage.echo,
            )
        except StorageUnavailable as exc:
            raise StartupError(f"storage.url: the database cannot be opened ({exc})") from exc
        try:
            self.engine = self._engine or create_text_engine(self.config.text, self.metrics)
            await self.engine.start()
        except EngineUnavailable as exc:
            await self.store.close()
            raise StartupError(str(exc)) from exc
        self.drawer = await self._start_drawer()
        self.manager = ConversationManager(
            self.config, self.store, self.engine, drawer=self.drawer, metrics=self.metrics
        )
        return self

    async def _start_drawer(self) -> Any:
        if not self.config.draw.enabled:
            return None
        from bot.draw.service import DrawService

        assert self.store is not None
        drawer = DrawService(self.config, self.store, metrics=self.metrics)
        await drawer.start()
        return drawer

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.manager is not None:
            await self.manager.close()
        if self.drawer is not None:
            await self.drawer.close()
        if self.engine is not None:
            await self.engine.close()
        if self.store is not None:
            await self.store.close()

    @property
    def services(self) -> Services:
        assert self.manager is not None and self.store is not None and self.engine is not None
        engine = self.engine
        return Services(
            config=self.config,
            handle=self.manager.handle,
            store=self.store,
            metrics=self.metrics,
            engine_ready=lambda: engine.ready,
        )

    def build_channels(self, *, only: str | None = None) -> list[Channel]:
        """Instantiate the channels `run` starts (or just the one named)."""
        channels: list[Channel] = []
        for name, cls in sorted(channel_classes().items()):
            if only is not None and name != only:
                continue
            if only is None and not cls.in_run:
                continue
            channel = cls.create(self.services)
            if channel is not None:
                channels.append(channel)
        return channels


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run every enabled channel until SIGINT/SIGTERM (or `stop` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with BotApp(config) as app:
        channels = app.build_channels()
        if not channels:
            raise StartupError("no channel is enabled: enable [web], [telegram] or [discord]")
        started: list[Channel] = []
        try:
            for channel in channels:
                await channel.start()
                started.append(channel)
                log.info("%s channel started", channel.name)
            await stop.wait()
            log.info("shutting down: finishing replies in flight")
            assert app.manager is not None
            await app.manager.close()
        finally:
            for channel in reversed(started):
                try:
                    await channel.stop()
                except Exception:
                    log.exception("stopping the %s channel failed", channel.name)


async def chat(config: Config, *, user: str = "local") -> int:
    """A console conversation on stdin/stdout that ends at end of input."""
    async with BotApp(config) as app:
        channels = app.build_channels(only="console")
        if not channels:
            raise StartupError("the console channel is not installed (pip install -e .)")
        console = channels[0]
        console.user_id = user  # type: ignore[attr-defined]
        await console.start()
        try:
            await console.wait_closed()  # type: ignore[attr-defined]
        finally:
            await console.stop()
    return 0
