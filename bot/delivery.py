"""Pushing replies to a stored conversation when nobody is waiting on a request.

An operator's answer, an answer to a message left unanswered by a crash, a
late picture: `Delivery.push(conversation_id, reply)` looks up the
conversation's platform and the address stored with it (Telegram chat and
topic, Discord channel, web session) and hands the reply to that platform's
outbound half, which sends it after whatever is already on its way to that
conversation.
"""

from __future__ import annotations

import logging

from bot.channels import OutboundChannel
from bot.errors import Unavailable
from bot.messages import Address, ConversationKey, Reply
from bot.metrics import Metrics
from bot.ordering import KeyedLocks
from storage import StorageUnavailable, Store

log = logging.getLogger(__name__)


class Delivery:
    def __init__(self, store: Store, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self._outbound: dict[str, OutboundChannel] = {}
        #: Pushes to one conversation leave in the order they were asked for,
        #: although each first looks its address up.
        self._order = KeyedLocks()

    def attach(self, outbound: OutboundChannel) -> None:
        """A channel's outbound half, available for pushes from now on."""
        self._outbound[outbound.platform] = outbound

    def detach(self, outbound: OutboundChannel) -> None:
        if self._outbound.get(outbound.platform) is outbound:
            del self._outbound[outbound.platform]

    async def address_of(self, conversation_id: int) -> tuple[ConversationKey, Address] | None:
        """The conversation's key and where its replies go, or None if it is gone."""
        try:
            place = await self.store.conversations.locate(conversation_id)
        except StorageUnavailable as exc:
            raise Unavailable(f"the database is unavailable ({exc})") from exc
        if place is None:
            return None
        key = ConversationKey(place.platform, place.chat_id, place.owner)
        stored = {"chat_id": place.chat_id, "user_id": place.owner, **place.address}
        return key, Address.from_dict(place.platform, stored)

    async def push(self, conversation_id: int, reply: Reply) -> bool:
        """Deliver `reply` to the conversation on its own platform. False (after
        logging why) when it cannot be: the conversation is gone, or its
        platform's channel is not running in this process."""
        async with self._order.hold(conversation_id):
            found = await self.address_of(conversation_id)
            if found is None:
                log.warning("push to conversation %s: it no longer exists", conversation_id)
                self._count("?", "gone")
                return False
            key, address = found
            return await self.push_to(key, address, reply)

    async def push_to(self, key: ConversationKey, address: Address, reply: Reply) -> bool:
        outbound = self._outbound.get(address.platform)
        if outbound is None:
            log.warning("push to a %s conversation: that channel is not running", address.platform)
            self._count(address.platform, "no_channel")
            return False
        try:
            await outbound.push(key, address, reply)
        except Exception:
            log.exception("pushing a reply to a %s conversation failed", address.platform)
            self._count(address.platform, "failed")
            return False
        self._count(address.platform, "delivered")
        return True

    def _count(self, platform: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.pushed.labels(platform, outcome).inc()
