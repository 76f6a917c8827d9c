"""Wiring and lifetime: open the store, start the engines and services, build
the manager, run the channels, and tear everything down in reverse.

    BotApp.__aenter__   store -> event bus -> text engine -> drawing ->
                        knowledge -> governance -> handoff -> manager
    serve()             channels start (one that cannot is logged, the others
                        serve) -> unanswered messages are answered -> wait for
                        SIGINT/SIGTERM -> finish replies in flight -> stop
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bot.bus import EventBus, LocalBus, RedisBus
from bot.channels import Channel, Services, channel_classes
from bot.commands import CommandRegistry
from bot.config import Config
from bot.delivery import Delivery
from bot.engines import EngineUnavailable, TextEngine
from bot.errors import StartupError
from bot.manager import ConversationManager
from bot.metrics import Metrics
from bot.ports import DrawPort, GovernancePort, HandoffPort, KnowledgePort
from bot.recovery import Recovery
from bot.web_services import WebServices
from storage import StorageUnavailable, Store

if TYPE_CHECKING:
    from bot.handoff import HandoffService

__all__ = ["BotApp", "StartupError", "chat", "serve"]

log = logging.getLogger(__name__)


class BotApp:
    """`async with BotApp(config) as app:` gives a running manager and services."""

    def __init__(self, config: Config, *, engine: TextEngine | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.commands = CommandRegistry()
        self._engine = engine
        self._stack = contextlib.AsyncExitStack()
        self.store: Store | None = None
        self.bus: EventBus = LocalBus()
        self.engine: TextEngine | None = None
        self.drawer: DrawPort | None = None
        self.knowledge: KnowledgePort | None = None
        self.handoff: HandoffPort | None = None
        self.governance: GovernancePort | None = None
        self.delivery: Delivery | None = None
        self.manager: ConversationManager | None = None
        self.channels: list[Channel] = []
        self._handoff_service: HandoffService | None = None

    async def __aenter__(self) -> BotApp:
        try:
            await self._open()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _open(self) -> None:
        config = self.config
        try:
            self.store = await Store.open(
                config.storage.url,
                busy_timeout_ms=config.storage.busy_timeout_ms,
                echo=config.storage.echo,
            )
        except StorageUnavailable as exc:
            raise StartupError(f"storage.url: the database cannot be opened ({exc})") from exc
        self._stack.push_async_callback(self.store.close)
        self.bus = await self._start_bus()
        self.delivery = Delivery(self.store, self.metrics)
        try:
            from bot.engine_settings import build_text_engine

            engine = self._engine
            if engine is None:  # off the loop: choosing it imports torch (and CTranslate2)
                engine = await asyncio.to_thread(
                    build_text_engine, config.text, self.metrics, data_dir=config.bot.data_dir
                )
            self.engine = engine
            await engine.start()
        except EngineUnavailable as exc:
            raise StartupError(str(exc)) from exc
        self._stack.push_async_callback(engine.close)
        self.drawer = await self._start_drawer()
        # The manager first, so that its commands come first in /help and the menus.
        self.manager = ConversationManager(
            config,
            self.store,
            self.engine,
            commands=self.commands,
            drawer=self.drawer,
            metrics=self.metrics,
        )
        self.knowledge = await self._start_knowledge()
        self.governance = await self._start_governance()
        self.handoff = await self._start_handoff()
        self.manager.knowledge = self.knowledge
        self.manager.governance = self.governance
        self.manager.handoff = self.handoff
        self._stack.push_async_callback(self.manager.close)

    async def _start_bus(self) -> EventBus:
        storage = self.config.storage
        bus: EventBus
        if storage.redis_url:
            bus = RedisBus(storage.redis_url)
        elif self.store is not None and self.store.dialect == "postgresql":
            from bot.bus_postgres import PostgresBus

            bus = PostgresBus(storage.url)
        else:
            bus = LocalBus()
        try:
            await bus.start()
        except Exception as exc:
            where = "storage.redis_url" if storage.redis_url else "storage.url"
            raise StartupError(
                f"{where}: the event bus cannot connect ({type(exc).__name__}: {exc})"
            ) from exc
        self._stack.push_async_callback(bus.close)
        return bus

    async def _start_drawer(self) -> DrawPort | None:
        if not self.config.draw.enabled:
            return None
        from bot.draw.service import DrawService

        assert self.store is not None
        drawer = DrawService(self.config, self.store, metrics=self.metrics)
        await drawer.start()
        self._stack.push_async_callback(drawer.close)
        return drawer

    async def _start_knowledge(self) -> KnowledgePort | None:
        if not self.config.knowledge.faq:
            return None
        from bot.knowledge import KnowledgeError, KnowledgeService

        assert self.store is not None
        try:
            service = KnowledgeService.create(self.config, self.store, self.metrics)
        except KnowledgeError as exc:
            raise StartupError(str(exc)) from exc
        if service is None:
            return None
        try:
            await service.start()
        except KnowledgeError as exc:
            raise StartupError(str(exc)) from exc
        self._stack.push_async_callback(service.close)
        return service

    async def _start_governance(self) -> GovernancePort:
        from bot.governance import GovernanceError, GovernanceService

        assert self.store is not None
        service = GovernanceService.create(self.config, self.store, self.commands, self.metrics)
        try:
            await service.start()
        except GovernanceError as exc:
            raise StartupError(str(exc)) from exc
        except StorageUnavailable as exc:
            raise StartupError(f"storage.url: the database cannot be read ({exc})") from exc
        self._stack.push_async_callback(service.close)
        return service

    async def _start_handoff(self) -> HandoffPort | None:
        from bot.handoff import HandoffService

        assert self.store is not None and self.delivery is not None
        service = HandoffService.create(
            self.config, self.store, self.delivery, self.bus, self.commands, self.metrics
        )
        if service is None:
            return None
        await service.start()
        self._stack.push_async_callback(service.close)
        self._handoff_service = service
        return service

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def health_problems(self) -> list[str]:
        """What `/healthz` reports as wrong; [] when all is well."""
        problems = []
        if self.engine is None or not self.engine.ready:
            problems.append("text engine not ready")
        try:
            assert self.store is not None
            await self.store.ping()
        except StorageUnavailable:
            problems.append("database unreachable")
        for channel in self.channels:
            if channel.health.state == "down":
                problems.append(f"{channel.name} channel down: {channel.health.detail}")
        return problems

    @property
    def services(self) -> Services:
        assert self.manager is not None and self.store is not None and self.delivery is not None
        return Services(
            config=self.config,
            handle=self.manager.handle,
            commands=self.commands,
            delivery=self.delivery,
            web=WebServices(self.store, self.health_problems, self._web_banned),
            bus=self.bus,
            metrics=self.metrics,
            operator_desk=self._handoff_service.desk if self._handoff_service else None,
        )

    def _web_banned(self, user_id: str) -> bool:
        return self.governance is not None and self.governance.is_banned("web", user_id)

    def build_channels(self, *, only: str | None = None) -> list[Channel]:
        """Instantiate the channels `run` starts (or just the one named)."""
        services = self.services
        channels: list[Channel] = []
        for name, cls in sorted(channel_classes().items()):
            if only is not None and name != only:
                continue
            if only is None and not cls.in_run:
                continue
            channel = cls.create(services)
            if channel is not None:
                channels.append(channel)
        self.channels = channels
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
        assert app.manager is not None and app.store is not None and app.delivery is not None
        recovery = Recovery(app.manager, app.delivery, host=socket.gethostname(), pid=os.getpid())

        async def start(channel: Channel) -> None:
            try:
                await channel.start()
            except Exception as exc:  # one platform down is not the bot down
                log.error("the %s channel could not start: %s", channel.name, exc)
                channel.health.state, channel.health.detail = "down", str(exc)
                return
            started.append(channel)
            log.info("%s channel started", channel.name)

        try:
            # Together, so that a platform slow to answer holds up none of the
            # others, and a SIGTERM meanwhile does not wait for it either.
            starting = asyncio.ensure_future(_all(start(channel) for channel in channels))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            else:
                if not started:
                    raise StartupError("no channel could start (see the log above)")
                await recovery.start()
                await stopping
            stopping.cancel()
            log.info("shutting down: finishing replies in flight")
            await app.manager.close()
        finally:
            await recovery.close()
            for channel in reversed(channels):
                try:
                    await channel.stop()
                except Exception:
                    log.exception("stopping the %s channel failed", channel.name)


async def _all(starts: Iterable[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*starts)


async def chat(config: Config, *, user: str = "local") -> int:
    """A console conversation on stdin/stdout that ends at end of input."""
    async with BotApp(config) as app:
        channels = app.build_channels(only="console")
        if not channels:
            raise StartupError("the console channel is not installed (pip install -e .)")
        console: Any = channels[0]
        console.user_id = user
        await console.start()
        try:
            await console.wait_closed()
        finally:
            await console.stop()
    return 0
