"""One message's way through its conversation: commit, turn, answer, store.

`converse` commits the user's message before any work (once per platform
message: a redelivered Telegram update or a retried web request finds the
first copy and its answer), respects the conversation's handoff state (while
people hold it, messages are stored and not answered), then takes the
message's turn: the knowledge base answers word for word when it is sure, the
dialogue model otherwise; the reply is moderated, stored, and yielded.
However a turn ends (reply, failure, cancel, shutdown), it is marked over, so
later messages never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from bot import texts
from bot.engines import EngineUnavailable
from bot.messages import (
    MODEL,
    ConversationKey,
    Incoming,
    Notice,
    NoticeKind,
    Reply,
    Source,
    Text,
    Typing,
)
from bot.ordering import KeyedLocks
from bot.text_safety import safe_text
from bot.tickets import Cancelled, Ticket, race, until_cancelled
from bot.turns import conversation_turn
from storage import Intake, StorageUnavailable, StoredMessage

if TYPE_CHECKING:
    from bot.manager import ConversationManager

log = logging.getLogger(__name__)


def dedup_key(incoming: Incoming) -> str | None:
    """One key per platform message: the same message delivered twice is stored once."""
    if not incoming.message_id:
        return None
    return f"{incoming.platform}:{incoming.chat_id}:{incoming.message_id}"[:255]


class Conversation:
    def __init__(self, manager: ConversationManager) -> None:
        self.manager = manager
        self.config = manager.config
        self.store = manager.store
        self.admit_locks = KeyedLocks()
        self.turn_locks = KeyedLocks()
        #: user message id -> set when its turn is over (duplicates wait on it)
        self._answering: dict[int, asyncio.Event] = {}
        #: user message id -> tokens the model generated for its reply (quotas)
        self._tokens: dict[int, int] = {}

    def key_for(self, incoming: Incoming) -> ConversationKey:
        scope = self.config.bot.scope_for(incoming.platform, incoming.chat_id)
        return ConversationKey.for_message(incoming, scope)

    # -- intake ----------------------------------------------------------------

    async def converse(self, incoming: Incoming, text: str) -> AsyncIterator[Reply]:
        manager = self.manager
        key = self.key_for(incoming)
        with manager.tickets.issue((incoming.platform, incoming.user_id)) as ticket:
            try:
                async with self.admit_locks.hold(key):
                    intake = await self.store.conversations.add_user_message(
                        platform=key.platform,
                        chat_id=key.chat_id,
                        owner=key.user_id,
                        user_id=incoming.user_id,
                        user_name=safe_text(incoming.user_name),
                        text=text,
                        address=incoming.address.as_dict(),
                        dedup_key=dedup_key(incoming),
                        handled_by=manager.instance_id,
                    )
                if intake.duplicate:
                    if incoming.answer_duplicates:
                        async for reply in self._earlier_answer(intake, ticket):
                            yield reply
                    return
                held = await self._held(incoming, intake, text)
                if held is not None:
                    for reply in held:
                        yield reply
                    return
                async with contextlib.aclosing(
                    self.turn(key, intake.message, incoming, text, ticket)
                ) as turn:
                    async for reply in turn:
                        yield reply
            except Cancelled:
                yield Notice(texts.CANCELLED, NoticeKind.CANCELLED)
            except StorageUnavailable as exc:
                yield manager.storage_down(exc)
            except EngineUnavailable as exc:
                log.warning("text engine unavailable: %s", exc)
                manager.count_error("engine")
                yield Notice(texts.ENGINE_DOWN, NoticeKind.UNAVAILABLE, retry_after=30)
            except TimeoutError:
                log.warning("a reply took longer than text.timeout_s; gave up")
                manager.count_error("timeout")
                yield Notice(texts.TIMED_OUT, NoticeKind.UNAVAILABLE, retry_after=10)

    async def _held(self, incoming: Incoming, intake: Intake, text: str) -> list[Reply] | None:
        """The replies when people hold this conversation or the message asks
        for them; None when the bot answers it."""
        handoff = self.manager.handoff
        if handoff is None:
            return None
        message = intake.message
        if intake.handoff_state != "bot":
            await self.finish_turn(message)
            return await handoff.on_held_message(
                incoming, message.conversation_id, intake.handoff_state
            )
        if handoff.is_trigger(text):
            await self.finish_turn(message)
            return await handoff.request(incoming, message.conversation_id, "phrase")
        return None

    async def _earlier_answer(self, intake: Intake, ticket: Ticket) -> AsyncIterator[Reply]:
        """A message stored before: its answer, once there is one."""
        if not intake.answered:
            done = self._answering.get(intake.message.id)
            if done is None:  # answered elsewhere, or after a restart
                yield Notice(texts.STILL_WORKING, NoticeKind.INFO)
                return
            await until_cancelled(done.wait(), ticket)
        for text, source in await self.store.conversations.replies_to(intake.message):
            yield Text(text, source=Source.from_dict(source))

    # -- the turn ------------------------------------------------------------------

    async def turn(
        self,
        key: ConversationKey,
        stored: StoredMessage,
        incoming: Incoming,
        text: str,
        ticket: Ticket,
    ) -> AsyncGenerator[Reply, None]:
        """A committed message's turn: wait for the earlier ones (in this
        process and, on PostgreSQL, in others), answer, store the reply.
        However it ends, the turn is marked over before the next one starts."""
        done = self._answering.setdefault(stored.id, asyncio.Event())
        over = False
        try:
            yield Typing()
            async with (
                self.turn_locks.hold(key),
                conversation_turn(self.store, key.platform, key.chat_id, key.user_id, stored),
            ):
                try:
                    if ticket.cancelled:
                        raise Cancelled
                    final: Reply | None = None
                    async for reply in self._answer(stored, incoming, text, ticket):
                        if isinstance(reply, Text) and reply.final:
                            final = reply
                        elif isinstance(reply, Text):
                            yield reply
                        else:
                            final = reply  # a handoff notice: the turn ends without a reply
                    if isinstance(final, Text):
                        over, deliver = await self._save_reply(stored, incoming, final)
                        if not deliver:
                            final = None
                finally:
                    over = over or await self.finish_turn(stored)
            if final is not None:
                yield final
        finally:
            if not over:  # it never got its turn (cancelled, shut down)
                await self.finish_turn(stored)
            done.set()
            self._answering.pop(stored.id, None)
            self._tokens.pop(stored.id, None)

    async def _answer(
        self, stored: StoredMessage, incoming: Incoming, text: str, ticket: Ticket
    ) -> AsyncIterator[Reply]:
        """The knowledge base's answer when it has one, else the model's; or
        the conversation goes to people."""
        manager = self.manager
        history = await self.store.conversations.recent_history(
            stored.conversation_id, before_id=stored.id, limit=self.history_limit()
        )
        if manager.knowledge is not None:
            previous = next(
                (Source.from_dict(m.source) for m in reversed(history) if m.role != "user"),
                None,
            )
            decision = await manager.knowledge.decide(incoming, text, previous)
            escalate = decision.escalate
            if manager.handoff is not None:
                answered = decision.kind == "answer"
                escalate = escalate or await manager.handoff.note_outcome(
                    stored.conversation_id, answered=answered
                )
                if escalate:
                    trigger = "fallback" if decision.escalate else "unanswered"
                    for reply in await manager.handoff.request(
                        incoming, stored.conversation_id, trigger
                    ):
                        yield reply
                    return
            if decision.kind != "fallback":
                yield Text(decision.text, source=decision.source)
                return
        turns = [message.text for message in history] + [text]
        async for reply in self.generate(turns, stored, incoming, ticket):
            yield reply

    async def generate(
        self, turns: list[str], stored: StoredMessage, incoming: Incoming, ticket: Ticket
    ) -> AsyncIterator[Text]:
        """The dialogue model's reply: partial texts, then the moderated final one."""
        manager = self.manager
        key = self.key_for(incoming)
        cache_key = "\x1f".join(
            (key.platform, key.chat_id, key.user_id, str(stored.conversation_id))
        )
        # Partials can't be taken back, so they are only shown when nothing
        # the model writes can be blocked.
        stream_partials = manager.governance is None or not self._moderates()
        timeout = self.config.text.timeout_s or None
        final_text, tokens = "", 0
        async with asyncio.timeout(timeout):
            stream = manager.engine.stream(turns, conversation=cache_key)
            async for chunk in race(stream, ticket):
                if chunk.final:
                    final_text, tokens = chunk.text, chunk.tokens
                    break
                if stream_partials:
                    yield Text(chunk.text, final=False)
            else:
                raise EngineUnavailable("the engine ended without a reply")
        if not final_text.strip():
            final_text = self.config.text.fallback_reply
        self._tokens[stored.id] = tokens  # generated, and counted, even if it is blocked
        if manager.governance is not None:
            blocked = await manager.governance.moderate(incoming, final_text, "output")
            if blocked is not None:
                yield Text(blocked, source=MODEL)
                return
        yield Text(final_text, source=MODEL)

    def _moderates(self) -> bool:
        moderation = self.config.moderation
        return bool(
            moderation.blocked_terms or moderation.blocked_patterns or moderation.classifier
        )

    # -- bookkeeping -------------------------------------------------------------

    async def _save_reply(
        self, stored: StoredMessage, incoming: Incoming, reply: Text
    ) -> tuple[bool, bool]:
        """Store the reply (which ends the message's turn); (turn over, send it).
        Not sent when, meanwhile, people took the conversation or another
        process answered the message; sent anyway when the database went away
        (the user's own message is already safe)."""
        tokens = self._tokens.pop(stored.id, None)
        try:
            saved = await self.store.conversations.add_bot_message(
                reply_to=stored,
                platform=incoming.platform,
                user_id=incoming.user_id,
                text=reply.text,
                source=reply.source.as_dict() if reply.source else None,
                tokens=tokens,
            )
        except StorageUnavailable as exc:
            log.warning("a reply could not be stored: %s", exc)
            self.manager.count_error("storage")
            return False, True
        if saved is None:
            log.info("message %s: people hold the conversation, or it was answered", stored.id)
            return True, False
        return True, True

    async def finish_turn(self, stored: StoredMessage) -> bool:
        """End a turn that stored no reply, so later messages do not wait for it."""
        try:
            await self.store.turns.finish(stored)
        except StorageUnavailable as exc:
            log.warning("could not mark message %s's turn over: %s", stored.id, exc)
            return False
        return True

    def history_limit(self) -> int:
        # Every stored turn costs at least two tokens (a word and EOS), so more
        # rows than this can never fit the prompt budget.
        return max(2, min(1000, self.config.text.max_history_tokens // 2))
