"""Telling people that a conversation waits for them.

When a conversation starts waiting, `Notifier.waiting` sends, in the
background (the user's answer never waits for it):

* `[handoff] notify_url`: a JSON POST with the conversation id, platform,
  user, last text and a link into the console (plus `text`, one readable
  line, so Slack-style incoming webhooks show it as is), retried with
  exponential backoff and jitter on connection errors, timeouts, 408, 429
  (honouring Retry-After) and 5xx; other 4xx answers are final;
* `[handoff] telegram_chat_id` / `discord_channel_id`: the same line posted
  into an operators' chat through the bot's own channels (`Delivery.push_to`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from bot.delivery import Delivery
from bot.handoff.views import ConversationView
from bot.messages import Address, ConversationKey, Text

log = logging.getLogger(__name__)

#: Answers worth another try; any other 4xx means the request itself is wrong.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 6
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    timeout_s: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before try `attempt + 1` (after `attempt` failed): doubling,
        with jitter, at most `max_delay_s`; a server's Retry-After when longer."""
        base = min(self.max_delay_s, self.first_delay_s * 2.0 ** (attempt - 1))
        wait = base * random.uniform(0.5, 1.0)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay_s))
        return wait


def notice_payload(view: ConversationView, trigger: str, console_url: str) -> dict[str, Any]:
    who = view.user_name or view.user_id or "someone"
    line = f"{who} on {view.platform} is waiting for a person"
    if view.last_text:
        line += f": \u201c{_shorten(view.last_text, 300)}\u201d"
    if console_url:
        line += f" \u2014 {console_url}"
    return {
        "event": "handoff.waiting",
        "conversation_id": view.id,
        "platform": view.platform,
        "chat_id": view.chat_id,
        "user_id": view.user_id,
        "user_name": view.user_name,
        "last_text": view.last_text,
        "trigger": trigger,
        "since": view.since,
        "console_url": console_url,
        "text": line,
    }


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value: str = response.headers.get("Retry-After", "")
    try:
        return float(value)
    except ValueError:
        return None


class Notifier:
    def __init__(
        self,
        delivery: Delivery | None,
        *,
        notify_url: str = "",
        telegram_chat_id: str = "",
        discord_channel_id: str = "",
        policy: RetryPolicy | None = None,
    ) -> None:
        self.delivery = delivery
        self.notify_url = notify_url
        self.chats = [
            Address(platform, chat_id)
            for platform, chat_id in (
                ("telegram", telegram_chat_id),
                ("discord", discord_channel_id),
            )
            if chat_id
        ]
        self.policy = policy or RetryPolicy()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.notify_url or self.chats)

    async def start(self) -> None:
        if self.notify_url:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.policy.timeout_s),
                headers={"User-Agent": "aigc-bot handoff"},
            )

    async def close(self, grace_s: float = 2.0) -> None:
        """Let notices on their way finish for `grace_s`, then drop the rest."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def waiting(self, payload: dict[str, Any]) -> None:
        """Send the notice for a conversation that started waiting, in the background."""
        if not self.enabled:
            return
        task = asyncio.create_task(self._send(payload), name="handoff-notify")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, payload: dict[str, Any]) -> None:
        sends: list[Coroutine[Any, Any, object]] = [
            self._post_to_chat(address, payload["text"]) for address in self.chats
        ]
        if self.notify_url:
            sends.append(self.post(payload))
        await asyncio.gather(*sends)

    async def _post_to_chat(self, address: Address, text: str) -> None:
        if self.delivery is None:
            return
        key = ConversationKey(address.platform, address.chat_id)
        if not await self.delivery.push_to(key, address, Text(text)):
            log.warning("handoff: the notice could not be posted to the %s chat", address.platform)

    async def post(self, payload: dict[str, Any]) -> bool:
        """POST `payload` to `notify_url`, retrying; True once it was taken (2xx)."""
        if self._session is None:
            raise RuntimeError("Notifier.start() was not called")
        policy = self.policy
        for attempt in range(1, policy.attempts + 1):
            retry_after: float | None = None
            try:
                async with self._session.post(self.notify_url, json=payload) as response:
                    if 200 <= response.status < 300:
                        return True
                    if response.status not in RETRY_STATUSES:
                        log.warning(
                            "handoff: notify_url answered %s; the notice is dropped",
                            response.status,
                        )
                        return False
                    retry_after = _retry_after(response)
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            if attempt == policy.attempts:
                log.warning(
                    "handoff: notify_url failed %d times (last: %s); the notice is dropped",
                    attempt,
                    problem,
                )
                return False
            delay = policy.delay(attempt, retry_after)
            log.info("handoff: notify_url failed (%s); retrying in %.1f s", problem, delay)
            await asyncio.sleep(delay)
        return False
