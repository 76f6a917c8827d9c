"""The console channel: one conversation on stdin/stdout (`aigc-bot chat`).

Lines are read by a daemon thread (a blocked `readline` cannot be cancelled,
and must not keep the process alive at exit) and handled in order. Replies —
answers to what was typed, and pushes such as an operator's answer — are
printed through the same `ConsoleTarget`: pictures are saved under the data
dir and their path printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, ClassVar, TextIO

from adapters.outbound import Outbound, Target, image_caption
from bot.channels import ChannelState, Handler, Services
from bot.messages import Address, ConversationKey, Image, Incoming, Reply, Text

PLATFORM = "console"
CHAT_ID = "console"


class ConsoleTarget(Target):
    text_limit: ClassVar[int] = 1_000_000  # a terminal takes any length
    shows_author: ClassVar[bool] = True  # "Sam> ..." instead of "bot> ..."

    def __init__(self, channel: ConsoleChannel) -> None:
        self.channel = channel

    async def send_text(self, text: str) -> Any:
        self.channel.write(f"{self.channel.speaker}> {text}")
        return None

    async def send_image(self, image: Image) -> Any:
        self.channel.write(
            f"bot> {image_caption(image)}\nbot> picture saved to {self.channel.save(image)}"
        )
        return None


class ConsoleOutbound(Outbound):
    platform = PLATFORM

    def __init__(self, channel: ConsoleChannel) -> None:
        super().__init__()
        self.channel = channel

    def target_for(self, to: Address) -> Target:
        return ConsoleTarget(self.channel)

    async def push(self, conversation: ConversationKey, to: Address, reply: Reply) -> None:
        if to.user_id and to.user_id != self.channel.user_id:
            return  # another console user's conversation: nobody here to show it to
        if isinstance(reply, Text) and reply.role == "operator":
            self.channel.speaker = reply.author or "operator"
        try:
            await super().push(conversation, to, reply)
        finally:
            self.channel.speaker = "bot"


class ConsoleChannel:
    name: ClassVar[str] = "console"
    in_run: ClassVar[bool] = False

    def __init__(
        self,
        handle: Handler,
        *,
        data_dir: Path,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        user_id: str = "local",
        services: Services | None = None,
    ) -> None:
        self.handle = handle
        self.data_dir = data_dir
        self.stdin = _lenient(stdin or sys.stdin)
        self.stdout = stdout or sys.stdout
        self.user_id = user_id
        self.services = services
        self.outbound = ConsoleOutbound(self)
        self.health = ChannelState()
        self.speaker = "bot"
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def create(cls, services: Services) -> ConsoleChannel:
        return cls(services.handle, data_dir=services.config.bot.data_dir, services=services)

    async def start(self) -> None:
        if self.services is not None:
            self.services.delivery.attach(self.outbound)
        self.health = ChannelState("up")
        self._task = asyncio.create_task(self._run(), name="console")

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self.services is not None:
            self.services.delivery.detach(self.outbound)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.health = ChannelState("off", "stopped")

    def _reader(self, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
        try:
            for line in self.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lines.put_nowait, None)

    async def _run(self) -> None:
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._reader, args=(loop, lines), daemon=True, name="stdin").start()
        interactive = self.stdin.isatty()
        while True:
            if interactive:
                self.write("you> ", end="")
            line = await lines.get()
            if line is None:
                return
            text = line.rstrip("\n")
            if not text.strip():
                continue
            incoming = Incoming(
                platform=PLATFORM,
                chat_id=CHAT_ID,
                user_id=self.user_id,
                user_name=self.user_id,
                text=text,
                # unique across runs: the same line typed again is a new message
                message_id=uuid.uuid4().hex,
            )
            key = ConversationKey.for_message(incoming, "user")
            slot = self.outbound.order.take(key)
            await self.outbound.deliver(self.handle(incoming), ConsoleTarget(self), slot)

    def save(self, image: Image) -> str:
        if image.path:
            return image.path
        directory = self.data_dir / "console"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"draw-{image.seed}.png"
        path.write_bytes(image.png)
        return str(path)

    def write(self, text: str, end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()


def _lenient(stream: TextIO) -> TextIO:
    """Bytes that are not valid in the terminal's encoding come through as
    surrogates (stored as U+FFFD) instead of ending the console."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    return stream
