"""The outbound half of the Discord channel: where replies go, and how.

`MessageTarget` answers a message in its channel (the first part replies to
it), `InteractionTarget` follows up a deferred slash command, `ChannelTarget`
writes into a channel by id (pushes). Messages are at most 2,000 characters
(the shared `Renderer` splits, never truncates), pictures are PNG attachments
with their seed in the content, notices are edited in place, "typing" is
refreshed every 8 s. Every send carries `allowed_mentions` that forbid
@everyone, roles and users, so generated text can never ping anyone; only a
reply to the user's own message may ping that user. discord.py waits out 429s
itself; `DiscordOutbound.order` keeps one conversation's deliveries in
sequence whatever those retries cost.
"""

from __future__ import annotations

import contextlib
import io
import logging
from abc import abstractmethod
from typing import Any, ClassVar

import discord

from adapters.outbound import Outbound, Target, image_caption
from adapters.splitting import split_message
from bot.messages import Address, Image

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000
#: Generated text never pings anyone.
NO_MENTIONS = discord.AllowedMentions.none()
#: The first part of a reply may ping the person it answers, and nobody else.
REPLY_MENTIONS = discord.AllowedMentions(
    everyone=False, users=False, roles=False, replied_user=True
)


class DiscordTarget(Target):
    text_limit: ClassVar[int] = MESSAGE_LIMIT

    async def send_image(self, image: Image) -> Any:
        parts = split_message(image_caption(image), self.text_limit)
        file = discord.File(io.BytesIO(image.png), filename=f"draw-{image.seed}.png")
        sent = await self.send(parts[0], file=file)
        for part in parts[1:]:
            if part.strip():
                await self.send_text(part)
        return sent

    async def send_text(self, text: str) -> Any:
        return await self.send(text)

    @abstractmethod
    async def send(self, content: str, *, file: discord.File | None = None) -> Any:
        """Post one message (with a file)."""

    async def edit_text(self, sent: Any, text: str) -> bool:
        try:
            await sent.edit(content=text, allowed_mentions=NO_MENTIONS)
        except discord.NotFound:
            return False  # deleted meanwhile: send it again
        return True

    async def delete(self, sent: Any) -> None:
        with contextlib.suppress(discord.HTTPException):
            await sent.delete()


class ChannelTarget(DiscordTarget):
    """A channel (guild channel, thread or DM) by id: no message to reply to."""

    typing_every_s: ClassVar[float] = 8.0  # Discord shows "typing" ~10 s after each trigger

    def __init__(self, channel: discord.abc.Messageable) -> None:
        self.channel = channel

    async def show_typing(self) -> None:
        await self.channel.typing()

    async def send(self, content: str, *, file: discord.File | None = None) -> Any:
        return await self.channel.send(content, file=file, allowed_mentions=NO_MENTIONS)  # type: ignore[arg-type]


class MessageTarget(ChannelTarget):
    """Answers a message in its channel; the first part replies to it."""

    def __init__(self, message: discord.Message) -> None:
        super().__init__(message.channel)
        self.message = message
        self._replied = False

    async def send(self, content: str, *, file: discord.File | None = None) -> Any:
        if not self._replied:
            self._replied = True
            try:
                return await self.channel.send(
                    content,
                    file=file,  # type: ignore[arg-type]
                    reference=self.message.to_reference(fail_if_not_exists=False),
                    allowed_mentions=REPLY_MENTIONS,
                )
            except discord.HTTPException as exc:
                if exc.status >= 500 or exc.status == 429:
                    raise
                # e.g. no "Read Message History" permission: a reply is refused,
                # a plain message may still go through.
                log.warning(
                    "discord: cannot reply to message %s (%s); sending without the reply",
                    self.message.id,
                    exc,
                )
                if file is not None:
                    file.reset()
        return await super().send(content, file=file)


class InteractionTarget(DiscordTarget):
    """Follows up a deferred slash command (its "thinking…" shows meanwhile)."""

    def __init__(self, interaction: discord.Interaction, *, ephemeral: bool = False) -> None:
        self.interaction = interaction
        self.ephemeral = ephemeral

    async def send(self, content: str, *, file: discord.File | None = None) -> Any:
        extra: dict[str, Any] = {"file": file} if file is not None else {}
        return await self.interaction.followup.send(
            content, allowed_mentions=NO_MENTIONS, ephemeral=self.ephemeral, wait=True, **extra
        )

    async def finish(self, sent_anything: bool) -> None:
        if not sent_anything:
            # Nothing to say: remove the "thinking…" placeholder rather than leave it spinning.
            with contextlib.suppress(discord.HTTPException):
                await self.interaction.delete_original_response()


class DiscordOutbound(Outbound):
    platform = "discord"

    def __init__(self) -> None:
        super().__init__()
        self.client: discord.Client | None = None

    def target_for(self, to: Address) -> ChannelTarget:
        if self.client is None:
            raise RuntimeError("the Discord client is not connected")
        channel_id = int(to.thread_id or to.chat_id)
        known = self.client.get_channel(channel_id)
        if isinstance(known, discord.abc.Messageable):
            return ChannelTarget(known)
        # not in the cache (a DM nobody wrote in since the start): send by id
        return ChannelTarget(self.client.get_partial_messageable(channel_id))
