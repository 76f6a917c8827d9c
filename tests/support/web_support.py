"""Helpers shared by the web API and widget tests.

`PictureDrawer` stands in for the diffusers drawing service behind the
manager's `/draw`: it stores a real PNG the way a draw does, so the
`/media/<id>.png` route and the widget's inline images are exercised end to
end in seconds. `parse_sse` reads a `text/event-stream` body.
"""

from __future__ import annotations

import json
import secrets
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bot.messages import Image, Incoming, Notice, NoticeKind, Reply


def tiny_png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (40, 90, 200)) -> bytes:
    """A valid solid-colour PNG, built without Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (
            struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        )

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


class PictureDrawer:
    """The manager's `/draw` service, minus diffusers: a queue notice, then a stored PNG."""

    def __init__(self, store: Any, directory: Path, *, size: int = 96) -> None:
        self.store = store
        self.directory = directory
        self.size = size

    async def handle(self, incoming: Incoming, args: str) -> AsyncIterator[Reply]:
        draw_id = secrets.token_hex(8)
        seed = 1234
        prompt = args.strip() or "a picture"
        await self.store.draws.add(
            public_id=draw_id,
            platform=incoming.platform,
            chat_id=incoming.chat_id,
            user_id=incoming.user_id,
            prompt=prompt,
            options={"steps": 1},
            seed=seed,
        )
        yield Notice("Drawing… you are number 1 in the queue.", NoticeKind.QUEUED, ref=draw_id)
        png = tiny_png(self.size, self.size)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{draw_id}.png"
        path.write_bytes(png)
        await self.store.draws.finish(draw_id, status="done", image_path=str(path))
        yield Image(png=png, caption=prompt, seed=seed, path=str(path), draw_id=draw_id)

    def cancel(self, platform: str, user_id: str) -> int:
        return 0


def parse_sse(body: str) -> list[tuple[str, Any]]:
    """(event, data) pairs of a text/event-stream body; comments are kept as (":", text)."""
    events: list[tuple[str, Any]] = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append((":", line[1:].strip()))
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events
