"""Governance as the manager sees it (`bot.ports.GovernancePort`).

One message's checks, in order, in `admit` (before any work):

1. an admin (`[bot] admins`) always passes;
2. a banned person gets `[access] banned_answer` once, then silence;
3. someone outside the access lists gets `[access] refusal` once (per
   person, or per chat when the chat is what is outside), then silence;
4. in a muted chat the bot is silent;
5. commands pass (they cost no model work; /draw has its own limits);
6. quotas: flood control in group chats, then the person's daily messages and
   tokens, then the global daily tokens. Past one, the user is told when it
   resets (`NoticeKind.RATE_LIMITED` + `retry_after`) at most every
   `REMIND_S` seconds, silence in between.

On the web API every refused request is answered (403 or 429): silence there
would read as an empty answer. Bans and mutes are answered from memory
(bot.governance.sanctions), access lists are config, and quotas cost one read
only when a limit is set: with nothing configured, the message path makes no
extra database round trip. `moderate` checks input, the model's output and
/draw prompts; every block and every admin action goes to the audit log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from bot.commands import CommandRegistry, parse_command
from bot.governance.access import AccessPolicy, Outside
from bot.governance.classifier import Classifier, ClassifierFailed
from bot.governance.commands import register_admin_commands
from bot.governance.moderation import Moderator
from bot.governance.periods import day_start
from bot.governance.quotas import QuotaHit, Quotas
from bot.governance.sanctions import Sanctions
from bot.messages import Incoming, Notice, NoticeKind
from bot.ports import Refusal, Where
from bot.text_safety import safe_text
from storage import StorageUnavailable, Store

if TYPE_CHECKING:
    from bot.config import Config
    from bot.metrics import Metrics

log = logging.getLogger(__name__)

K = TypeVar("K", bound=tuple[str, ...])

#: Platforms that answer every request (HTTP): a refusal there is never silent.
ALWAYS_ANSWERED = frozenset({"web"})
#: A quota's notice is repeated at most this often per person (per chat for flood control).
REMIND_S = 600.0
#: The audit log's actor for what the bot did by itself.
BOT_ACTOR = "bot"
#: Memory of whom we told, kept bounded (the database remembers the rest).
_MAX_REMEMBERED = 100_000
_DEFAULT_FORBIDDEN = "You can't use this bot."


def _utcnow() -> datetime:
    return datetime.now(UTC)


class GovernanceService:
    """Admins, bans, access lists, muted chats, moderation and quotas."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics | None = None,
        *,
        classifier: Classifier | None = None,
        clock: Callable[[], datetime] = _utcnow,
        refresh_s: float = 5.0,
        global_ttl_s: float = 2.0,
    ) -> None:
        self.config = config
        self.store = store
        self.records = store.governance
        self.metrics = metrics
        self.clock = clock
        self.admins = frozenset(config.bot.admins)
        self.access = AccessPolicy(config.access)
        self.sanctions = Sanctions(self.records, clock, refresh_s=refresh_s)
        self.quotas = Quotas(config.limits, self.records, clock, global_ttl_s=global_ttl_s)
        self.classifier = classifier
        self.moderator = Moderator(config.moderation, classifier)
        #: Banned people told (or found told) in this process: no more database writes.
        self._told_banned: set[tuple[str, str]] = set()
        #: Outsiders (person or chat) whose refusal was decided in this process.
        self._told_outside: set[tuple[str, str, str]] = set()
        #: Quota notices: (kind, scope) -> time.monotonic() before which we stay silent.
        self._reminded: dict[tuple[str, ...], float] = {}

    @classmethod
    def create(
        cls,
        config: Config,
        store: Store,
        commands: CommandRegistry,
        metrics: Metrics | None = None,
        *,
        refresh_s: float = 5.0,
        global_ttl_s: float = 2.0,
    ) -> GovernanceService:
        """The service, with /ban, /unban, /mute and /usage registered in `commands`.
        Call `start()` before use. Bans and mutes made by other processes apply
        here within `refresh_s` seconds; the global token count is re-read
        after `global_ttl_s`."""
        moderation = config.moderation
        classifier = None
        if moderation.classifier.strip():
            classifier = Classifier(
                config.relative_to_config(moderation.classifier),
                threshold=moderation.classifier_threshold,
                labels=moderation.classifier_labels,
            )
        service = cls(
            config,
            store,
            metrics,
            classifier=classifier,
            refresh_s=refresh_s,
            global_ttl_s=global_ttl_s,
        )
        register_admin_commands(service, commands)
        return service

    async def start(self) -> None:
        """Load bans and mutes (and the classifier). `GovernanceError` for a bad
        classifier; `StorageUnavailable` if the database can't be read."""
        await self.sanctions.start()
        if self.classifier is not None:
            try:
                await self.classifier.start()
            except BaseException:
                await self.close()  # nothing is left running when start fails
                raise

    async def close(self) -> None:
        await self.sanctions.close()
        if self.classifier is not None:
            await self.classifier.close()

    # -- GovernancePort ----------------------------------------------------------------

    def is_admin(self, incoming: Incoming) -> bool:
        return incoming.sender in self.admins

    def is_banned(self, platform: str, user_id: str) -> bool:
        return f"{platform}:{user_id}" not in self.admins and self.sanctions.banned(
            platform, user_id
        )

    async def admit(self, incoming: Incoming) -> Refusal | None:
        if incoming.sender in self.admins:
            return None
        if self.sanctions.banned(incoming.platform, incoming.user_id):
            return await self._banned(incoming)
        if self.access.enabled:
            outside = self.access.check(incoming)
            if outside is not None:
                return await self._outside(incoming, outside)
        if self.sanctions.muted(incoming.platform, incoming.chat_id) is not None:
            return Refusal("muted")
        if not self.quotas.enabled or parse_command(safe_text(incoming.text)) is not None:
            return None
        hit = await self.quotas.check(incoming)
        return None if hit is None else self._over_quota(incoming, hit)

    async def moderate(self, incoming: Incoming, text: str, where: Where) -> str | None:
        if not self.moderator.enabled:
            return None
        try:
            verdict = await self.moderator.check(text)
        except ClassifierFailed as exc:
            log.warning("moderation classifier unavailable, text let through: %s", exc)
            if self.metrics is not None:
                self.metrics.count_error("moderation_classifier")
            return None
        if verdict is None:
            return None
        if self.metrics is not None:
            self.metrics.moderation.labels(where).inc()
        await self.audit(
            "moderation",
            actor=BOT_ACTOR,
            platform=incoming.platform,
            chat_id=incoming.chat_id,
            user_id=incoming.user_id,
            detail=f"{where}: {verdict.describe()}",
        )
        return self.moderator.answer

    async def usage_lines(self, incoming: Incoming) -> list[str]:
        draws = None
        if self.config.limits.draws_per_day and self.config.draw.enabled:
            from bot.draw.service import LIMITED_STATUSES

            made = await self.store.draws.times_since(
                incoming.platform, incoming.user_id, day_start(self.clock()), LIMITED_STATUSES
            )
            draws = len(made)
        return await self.quotas.usage_lines(incoming, draws)

    # -- refusals ----------------------------------------------------------------------

    async def _banned(self, incoming: Incoming) -> Refusal:
        answer = self.config.access.banned_answer
        notice = Notice(answer or _DEFAULT_FORBIDDEN, NoticeKind.FORBIDDEN)
        if incoming.platform in ALWAYS_ANSWERED:
            return Refusal("banned", notice)
        person = (incoming.platform, incoming.user_id)
        if not answer or person in self._told_banned:
            return Refusal("banned")
        self._remember(self._told_banned, person)
        # Once per ban, whichever process sees their next message first.
        first = await self.records.claim_ban_notice(*person)
        return Refusal("banned", notice if first else None)

    async def _outside(self, incoming: Incoming, outside: Outside) -> Refusal:
        refusal = self.config.access.refusal
        if outside.scope == "chat":
            key = (incoming.platform, incoming.chat_id, "")
        else:
            key = (incoming.platform, "", incoming.user_id)
        first = key not in self._told_outside
        if first:
            self._remember(self._told_outside, key)
            # Once per person (or chat), across restarts: the audit log remembers.
            platform, chat_id, user_id = key
            first = not await self.records.has_entry(
                "access", platform=platform, chat_id=chat_id, user_id=user_id
            )
            if first:
                await self.audit(
                    "access",
                    actor=BOT_ACTOR,
                    platform=platform,
                    chat_id=chat_id,
                    user_id=user_id,
                    detail=f"refused {incoming.sender} in chat {incoming.chat_id}: {outside.why}",
                )
        if incoming.platform in ALWAYS_ANSWERED:
            return Refusal("access", Notice(refusal or _DEFAULT_FORBIDDEN, NoticeKind.FORBIDDEN))
        if first and refusal:
            return Refusal("access", Notice(refusal, NoticeKind.FORBIDDEN))
        return Refusal("access")

    def _over_quota(self, incoming: Incoming, hit: QuotaHit) -> Refusal:
        notice = Notice(hit.text, NoticeKind.RATE_LIMITED, retry_after=hit.retry_after)
        if incoming.platform in ALWAYS_ANSWERED:
            return Refusal(hit.reason, notice)
        key = (hit.kind, *hit.scope)
        now = time.monotonic()
        if self._reminded.get(key, 0.0) > now:
            return Refusal(hit.reason)
        if len(self._reminded) >= _MAX_REMEMBERED:
            self._reminded = {k: t for k, t in self._reminded.items() if t > now}
        self._reminded[key] = now + min(hit.retry_after, REMIND_S)
        return Refusal(hit.reason, notice)

    @staticmethod
    def _remember(memory: set[K], key: K) -> None:
        if len(memory) >= _MAX_REMEMBERED:
            memory.clear()  # the database still knows whom we told
        memory.add(key)

    # -- admin actions (bot.governance.commands) ----------------------------------------

    async def ban(self, platform: str, user_id: str, *, by: str, reason: str = "") -> bool:
        added = await self.sanctions.ban(platform, user_id, by=by, reason=reason)
        self._told_banned.discard((platform, user_id))
        if added:
            await self.audit(
                "ban", actor=by, platform=platform, user_id=user_id, detail=reason or "-"
            )
        return added

    async def unban(self, platform: str, user_id: str, *, by: str) -> bool:
        removed = await self.sanctions.unban(platform, user_id)
        self._told_banned.discard((platform, user_id))
        if removed:
            await self.audit("unban", actor=by, platform=platform, user_id=user_id)
        return removed

    async def mute(self, incoming: Incoming, length: timedelta, *, by: str) -> datetime:
        until = self.clock() + length
        await self.sanctions.mute(incoming.platform, incoming.chat_id, until=until, by=by)
        await self.audit(
            "mute",
            actor=by,
            platform=incoming.platform,
            chat_id=incoming.chat_id,
            detail=f"until {until:%Y-%m-%dT%H:%M:%SZ}",
        )
        return until

    async def unmute(self, incoming: Incoming, *, by: str) -> bool:
        lifted = await self.sanctions.unmute(incoming.platform, incoming.chat_id)
        if lifted:
            await self.audit(
                "unmute", actor=by, platform=incoming.platform, chat_id=incoming.chat_id
            )
        return lifted

    async def audit(
        self,
        kind: str,
        *,
        actor: str,
        platform: str = "",
        chat_id: str = "",
        user_id: str = "",
        detail: str = "",
    ) -> None:
        """Write to the audit log. If the database is down the action still
        stands (a blocked text stays blocked); the failure is logged."""
        try:
            await self.records.record(
                kind,
                actor=actor,
                platform=platform,
                chat_id=chat_id,
                user_id=user_id,
                detail=detail,
            )
        except StorageUnavailable as exc:
            log.warning("could not write a %s entry to the audit log: %s", kind, exc)
