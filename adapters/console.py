"""The console channel: one conversation on stdin/stdout (`aigc-bot chat`).

Lines are read by a daemon thread (a blocked `readline` cannot be cancelled,
and must not keep the process alive at exit) and handled in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from pathlib import Path
from typing import ClassVar, TextIO

from bot.channels import Handler, Services
from bot.messages import Image, Incoming, Notice, Text


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
    ) -> None:
        self.handle = handle
        self.data_dir = data_dir
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.user_id = user_id
        self._task: asyncio.Task[None] | None = None
        self._counter = 0

    @classmethod
    def create(cls, services: Services) -> ConsoleChannel:
        return cls(services.handle, data_dir=services.config.bot.data_dir)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="console")

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

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
                self._write("you> ", end="")
            line = await lines.get()
            if line is None:
                return
            text = line.rstrip("\n")
            if not text.strip():
                continue
            self._counter += 1
            incoming = Incoming(
                platform="console",
                chat_id="console",
                user_id=self.user_id,
                user_name=self.user_id,
                text=text,
                message_id=str(self._counter),
            )
            async for reply in self.handle(incoming):
                if isinstance(reply, Text) and reply.final:
                    self._write(f"bot> {reply.text}")
                elif isinstance(reply, Notice):
                    self._write(f"bot> ({reply.text})")
                elif isinstance(reply, Image):
                    self._write(f"bot> {reply.caption}\nbot> picture saved to {self._save(reply)}")

    def _save(self, image: Image) -> str:
        if image.path:
            return image.path
        directory = self.data_dir / "console"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"draw-{image.seed}.png"
        path.write_bytes(image.png)
        return str(path)

    def _write(self, text: str, end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()
