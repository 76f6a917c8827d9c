"""Rendering the manager's replies on Discord, for a message or a slash command.

`render` walks the replies of one request: `Typing` starts a typing indicator
(messages only; a deferred slash command already shows "thinking"), partial
texts are skipped, a final `Text` is split into messages of at most 2,000
characters (never truncated), an `Image` becomes a PNG attachment with its
seed in the content, and a `Notice` is a message that a later notice with the
same `ref` edits in place. Every send carries `allowed_mentions` that forbid
@everyone, roles and users, so generated text can never ping anyone; only a
reply to the user's own message may ping that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import discord

from adapters.splitting import split_message
from bot.messages import Image, Notice, Reply, Text, Typing

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000
TYPING_EVERY_S = 8.0  # Discord shows "typing" for about 10 s after each trigger
#: Generated text never pings anyone.
NO_MENTIONS = discord.AllowedMentions.none()
#: The first part of a reply may ping the person it answers, and nobody else.
REPLY_MENTIONS = discord.AllowedMentions(
    everyone=False, users=False, roles=False, replied_user=True
)


class Target(Protocol):
    """Where one request's replies go."""

    def typing(self) -> AbstractAsyncContextManager[None]: ...

    async def send(self, content: str, *, file: discord.File | None = None) -> Any: ...

    async def edit(self, sent: Any, content: str) -> None: ...

    async def finish(self, sent_anything: bool) -> None: ...


@contextlib.asynccontextmanager
async def typing_indicator(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Keep "typing…" on until the block ends; a failing trigger only logs."""

    async def keep_typing() -> None:
        while True:
            try:
                await channel.typing()
            except discord.HTTPException as exc:
                log.debug("discord: typing indicator failed: %s", exc)
                return
            await asyncio.sleep(TYPING_EVERY_S)

    task = asyncio.create_task(keep_typing(), name="discord-typing")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class MessageTarget:
    """Answers a message in its channel; the first part replies to it."""

    def __init__(self, message: discord.Message) -> None:
        self.message = message
        self._replied = False

    def typing(self) -> AbstractAsyncContextManager[None]:
        return typing_indicator(self.message.channel)

    async def send(self, content: str, *, file: discord.File | None = None) -> discord.Message:
        channel = self.message.channel
        if not self._replied:
            self._replied = True
            try:
                return await channel.send(
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
        return await channel.send(content, file=file, allowed_mentions=NO_MENTIONS)  # type: ignore[arg-type]

    async def edit(self, sent: Any, content: str) -> None:
        await sent.edit(content=content, allowed_mentions=NO_MENTIONS)

    async def finish(self, sent_anything: bool) -> None:
        return None


class InteractionTarget:
    """Follows up a deferred slash command."""

    def __init__(self, interaction: discord.Interaction, *, ephemeral: bool = False) -> None:
        self.interaction = interaction
        self.ephemeral = ephemeral

    def typing(self) -> AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def send(
        self, content: str, *, file: discord.File | None = None
    ) -> discord.WebhookMessage:
        extra: dict[str, Any] = {"file": file} if file is not None else {}
        return await self.interaction.followup.send(
            content, allowed_mentions=NO_MENTIONS, ephemeral=self.ephemeral, wait=True, **extra
        )

    async def edit(self, sent: Any, content: str) -> None:
        await sent.edit(content=content, allowed_mentions=NO_MENTIONS)

    async def finish(self, sent_anything: bool) -> None:
        if not sent_anything:
            # Nothing to say: remove the "thinking…" placeholder rather than leave it spinning.
            with contextlib.suppress(discord.HTTPException):
                await self.interaction.delete_original_response()


def image_content(image: Image) -> str:
    seed = str(image.seed)
    caption = image.caption.strip()
    if seed in caption:
        return caption
    return f"{caption}\nseed: {seed}" if caption else f"seed: {seed}"


async def render(
    replies: AsyncIterator[Reply], target: Target, *, limit: int = MESSAGE_LIMIT
) -> int:
    """Deliver every reply of one request; returns how many messages were sent.

    If sending fails, the replies generator is still closed, so the manager
    finishes its bookkeeping for the request instead of waiting for it."""
    try:
        sent = await _deliver(replies, target, limit)
    finally:
        aclose = getattr(replies, "aclose", None)
        if aclose is not None:
            await aclose()
    await target.finish(sent > 0)
    return sent


async def _deliver(replies: AsyncIterator[Reply], target: Target, limit: int) -> int:
    sent = 0
    notices: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as typing:
        typing_on = False
        async for reply in replies:
            if isinstance(reply, Typing):
                if not typing_on:
                    await typing.enter_async_context(target.typing())
                    typing_on = True
            elif isinstance(reply, Text):
                if not reply.final:
                    continue
                await typing.aclose()
                typing_on = False
                for part in split_message(reply.text, limit):
                    if part.strip():  # Discord refuses a blank message
                        await target.send(part)
                        sent += 1
            elif isinstance(reply, Image):
                await typing.aclose()
                typing_on = False
                parts = split_message(image_content(reply), limit)
                file = discord.File(io.BytesIO(reply.png), filename=f"draw-{reply.seed}.png")
                await target.send(parts[0], file=file)
                sent += 1
                for part in parts[1:]:
                    if part.strip():
                        await target.send(part)
                        sent += 1
            elif isinstance(reply, Notice):
                previous = notices.get(reply.ref) if reply.ref else None
                if previous is not None and len(reply.text) <= limit:
                    try:
                        await target.edit(previous, reply.text)
                        continue
                    except discord.NotFound:
                        pass  # deleted meanwhile: send it again
                for part in split_message(reply.text, limit):
                    if part.strip():
                        message = await target.send(part)
                        sent += 1
                        if reply.ref:
                            notices[reply.ref] = message
    return sent
