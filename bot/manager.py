"""The conversation manager: one place where every channel's messages meet.

For each message: validate, commit it, wait for the conversation's turn (strict
arrival order within a conversation, concurrency across conversations), build
the dialogue from stored history, ask the engine, commit the reply, yield it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bot.commands import KNOWN, Command, help_text, parse_command
from bot.config import Config
from bot.engines import EngineUnavailable, TextEngine
from bot.limits import SlidingWindowLimiter
from bot.messages import ConversationKey, Incoming, Notice, NoticeKind, Reply, Text, Typing
from bot.ordering import KeyedLocks
from bot.turns import conversation_turn
from storage import StorageUnavailable, Store, StoredMessage

log = logging.getLogger(__name__)
T = TypeVar("T")

STORAGE_DOWN = (
    "I can't reach my memory right now, so I didn't take that message. "
    "Please try again in a moment."
)
ENGINE_DOWN = (
    "I can't answer right now (my language model is unavailable). "
    "Your message is saved; please try again later."
)
INTERNAL_ERROR = "Something went wrong on my side. Please try again."


class DrawService(Protocol):
    """What the manager needs from `/draw` (see bot.draw.service)."""

    def handle(self, incoming: Incoming, args: str) -> AsyncIterator[Reply]: ...

    def cancel(self, platform: str, user_id: str) -> int: ...


class _Cancelled(Exception):
    pass


@dataclass(eq=False)
class _Ticket:
    """One request in flight; `/cancel` and shutdown set `event`."""

    event: asyncio.Event = field(default_factory=asyncio.Event)


class ConversationManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        engine: TextEngine,
        *,
        drawer: DrawService | None = None,
        metrics: Any = None,
    ) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.drawer = drawer
        self.metrics = metrics
        self._admit_locks = KeyedLocks()
        self._turn_locks = KeyedLocks()
        self._tickets: dict[tuple[str, str], set[_Ticket]] = {}
        self._limiter = SlidingWindowLimiter(config.limits.messages_per_minute, 60.0)
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0

    # -- entry point -------------------------------------------------------------

    async def handle(self, incoming: Incoming) -> AsyncIterator[Reply]:
        """Every reply to one incoming message, in order. Never raises for bad
        input or a failing dependency: the user gets a short notice instead."""
        if (
            not incoming.addressed
            and not incoming.is_private
            and self.config.bot.group_messages == "addressed"
        ):
            return
        started = time.monotonic()
        if self.metrics is not None:
            self.metrics.messages.labels(incoming.platform).inc()
        self._in_flight += 1
        self._idle.clear()
        try:
            async for reply in self._dispatch(incoming):
                yield reply
        except Exception:
            log.exception("failed to handle a %s message", incoming.platform)
            self._count_error("internal")
            yield Notice(INTERNAL_ERROR, NoticeKind.ERROR)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            if self.metrics is not None:
                self.metrics.reply_latency.labels(incoming.platform).observe(
                    time.monotonic() - started
                )

    async def close(self, grace: float | None = None) -> None:
        """Stop taking messages; let in-flight ones finish for `grace` seconds, then cancel them."""
        self._closing = True
        grace = self.config.bot.shutdown_grace_s if grace is None else grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        for tickets in self._tickets.values():
            for ticket in tickets:
                ticket.event.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5)

    # -- dispatch ------------------------------------------------------------------

    async def _dispatch(self, incoming: Incoming) -> AsyncIterator[Reply]:
        if self._closing:
            yield Notice(
                "I'm restarting; please send that again in a minute.", NoticeKind.UNAVAILABLE, 30
            )
            return
        text = incoming.text.strip()
        if not text:
            yield Notice("Please send me a text message.", NoticeKind.EMPTY)
            return
        limit = self.config.bot.max_input_chars
        if len(text) > limit:
            yield Notice(
                f"That message is too long ({len(text):,} characters; the limit is {limit:,}). "
                "Please shorten it.",
                NoticeKind.TOO_LONG,
            )
            return
        command = parse_command(text)
        if command is not None:
            async for reply in self._command(incoming, command):
                yield reply
            return
        wait = self._limiter.acquire((incoming.platform, incoming.user_id))
        if wait is not None:
            self._count_error("rate_limited")
            yield Notice(
                f"You're sending messages faster than I can answer. Please wait {wait:.0f} s.",
                NoticeKind.RATE_LIMITED,
                retry_after=wait,
            )
            return
        async for reply in self._converse(incoming, text):
            yield reply

    async def _converse(self, incoming: Incoming, text: str) -> AsyncIterator[Reply]:
        key = ConversationKey.for_message(incoming, self.config.bot.history_scope)
        with self._ticket(incoming) as ticket:
            try:
                async with self._admit_locks.hold(key):
                    intake = await self.store.conversations.add_user_message(
                        platform=key.platform,
                        chat_id=key.chat_id,
                        owner=key.user_id,
                        user_id=incoming.user_id,
                        user_name=incoming.user_name,
                        text=text,
                    )
                    stored = intake.message
                async with contextlib.aclosing(
                    self._turn(key, stored, incoming, text, ticket)
                ) as turn:
                    async for reply in turn:
                        yield reply
            except _Cancelled:
                yield Notice("Cancelled.", NoticeKind.CANCELLED)
            except StorageUnavailable as exc:
                log.warning("storage unavailable: %s", exc)
                self._count_error("storage")
                yield Notice(STORAGE_DOWN, NoticeKind.UNAVAILABLE, retry_after=10)
            except EngineUnavailable as exc:
                log.warning("text engine unavailable: %s", exc)
                self._count_error("engine")
                yield Notice(ENGINE_DOWN, NoticeKind.UNAVAILABLE, retry_after=30)

    async def _turn(
        self,
        key: ConversationKey,
        stored: StoredMessage,
        incoming: Incoming,
        text: str,
        ticket: _Ticket,
    ) -> AsyncIterator[Reply]:
        """A committed message's turn: wait for the earlier ones (in this
        process and, on PostgreSQL, in others), generate, store the reply.
        However it ends, the turn is marked over before the next one starts."""
        over = False
        try:
            yield Typing()
            async with (
                self._turn_locks.hold(key),
                conversation_turn(self.store, key.platform, key.chat_id, key.user_id, stored),
            ):
                try:
                    if ticket.event.is_set():
                        raise _Cancelled
                    history = await self.store.conversations.history(
                        stored.conversation_id, before_id=stored.id, limit=self._history_limit()
                    )
                    turns = [message.text for message in history] + [text]
                    cache_key = "\x1f".join(
                        (key.platform, key.chat_id, key.user_id, str(stored.conversation_id))
                    )
                    final: Text | None = None
                    async for partial in self._race(
                        self.engine.stream(turns, conversation=cache_key), ticket
                    ):
                        if partial.final:
                            final = partial
                        else:
                            yield partial
                    if final is None:
                        raise EngineUnavailable("the engine ended without a reply")
                    over = await self._save_reply(stored, incoming, final.text)
                finally:
                    over = over or await self._finish_turn(stored)
            yield final
        finally:
            if not over:  # it never got its turn (cancelled, shut down)
                await self._finish_turn(stored)

    async def _save_reply(self, stored: StoredMessage, incoming: Incoming, text: str) -> bool:
        """Store the reply (which ends the message's turn); if the database went
        away meanwhile, the user still gets the answer (their own message is
        already safe). True when it was stored."""
        try:
            await self.store.conversations.add_bot_message(
                reply_to=stored, platform=incoming.platform, user_id=incoming.user_id, text=text
            )
        except StorageUnavailable as exc:
            log.warning("a reply could not be stored: %s", exc)
            self._count_error("storage")
            return False
        return True

    async def _finish_turn(self, stored: StoredMessage) -> bool:
        """End a turn that stored no reply, so later messages do not wait for it."""
        try:
            await self.store.conversations.finish_turn(stored)
        except StorageUnavailable as exc:
            log.warning("could not mark message %s's turn over: %s", stored.id, exc)
            return False
        return True

    def _history_limit(self) -> int:
        # Every stored turn costs at least two tokens (a word and EOS), so more
        # rows than this can never fit the prompt budget.
        return max(2, min(1000, self.config.text.max_history_tokens // 2))

    async def _race(self, stream: AsyncIterator[T], ticket: _Ticket) -> AsyncIterator[T]:
        """Iterate `stream` until it ends or the ticket is cancelled."""
        iterator = aiter(stream)
        try:
            while True:
                item = await self._until_cancelled(anext(iterator), ticket)
                yield item
        except StopAsyncIteration:
            return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    @staticmethod
    async def _until_cancelled(awaitable: Awaitable[T], ticket: _Ticket) -> T:
        task = asyncio.ensure_future(awaitable)
        waiter = asyncio.ensure_future(ticket.event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()  # our caller went away: don't leave the work running
            raise
        finally:
            waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await task
        raise _Cancelled

    @contextlib.contextmanager
    def _ticket(self, incoming: Incoming) -> Any:
        ticket = _Ticket()
        owner = (incoming.platform, incoming.user_id)
        self._tickets.setdefault(owner, set()).add(ticket)
        try:
            yield ticket
        finally:
            tickets = self._tickets.get(owner)
            if tickets is not None:
                tickets.discard(ticket)
                if not tickets:
                    del self._tickets[owner]

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(kind).inc()

    # -- commands ------------------------------------------------------------------

    async def _command(self, incoming: Incoming, command: Command) -> AsyncIterator[Reply]:
        name = command.name
        if name not in KNOWN:
            yield Text(f"I don't know /{name}.\n\n" + help_text(self.config.bot.name))
            return
        try:
            if name == "start":
                yield Text(self.config.bot.welcome)
            elif name == "help":
                yield Text(help_text(self.config.bot.name))
            elif name == "cancel":
                yield Text(self._cancel(incoming))
            elif name == "reset":
                yield Text(await self._reset(incoming))
            elif name == "forget":
                yield Text(await self._forget(incoming))
            elif name == "stats":
                yield Text(await self._stats(incoming))
            elif name == "draw":
                if self.drawer is None:
                    yield Notice("Drawing is turned off on this bot.", NoticeKind.UNAVAILABLE)
                    return
                async for reply in self.drawer.handle(incoming, command.args):
                    yield reply
        except StorageUnavailable as exc:
            log.warning("storage unavailable: %s", exc)
            self._count_error("storage")
            yield Notice(STORAGE_DOWN, NoticeKind.UNAVAILABLE, retry_after=10)

    def _cancel(self, incoming: Incoming) -> str:
        tickets = self._tickets.get((incoming.platform, incoming.user_id), set())
        pending = [ticket for ticket in tickets if not ticket.event.is_set()]
        for ticket in pending:
            ticket.event.set()
        draws = self.drawer.cancel(incoming.platform, incoming.user_id) if self.drawer else 0
        count = len(pending) + draws
        if not count:
            return "You have nothing queued or running."
        return f"Cancelled {count} request{'s' if count > 1 else ''}."

    async def _reset(self, incoming: Incoming) -> str:
        key = ConversationKey.for_message(incoming, self.config.bot.history_scope)
        async with self._admit_locks.hold(key), self._turn_locks.hold(key):
            await self.store.conversations.reset(key.platform, key.chat_id, key.user_id)
        return (
            "Started a new conversation. I won't remember what we said before "
            "(it's still stored; /forget deletes it)."
        )

    async def _forget(self, incoming: Incoming) -> str:
        self._cancel(incoming)
        result = await self.store.people.forget(incoming.platform, incoming.user_id)
        await asyncio.to_thread(_remove_files, result.image_paths)
        return (
            f"Done: I deleted everything I had stored about you "
            f"({result.messages} messages, {result.draws} pictures)."
        )

    async def _stats(self, incoming: Incoming) -> str:
        stats = await self.store.people.stats(incoming.platform, incoming.user_id)
        since = f" since {stats.first_seen:%Y-%m-%d}" if stats.first_seen else ""
        return (
            f"Your usage{since}: {stats.messages} messages, {stats.replies} replies, "
            f"{stats.conversations} conversations, {stats.draws} pictures."
        )


def _remove_files(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
