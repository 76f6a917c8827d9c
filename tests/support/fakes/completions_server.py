"""A fake OpenAI-compatible completions server (what vLLM serves), for tests
that need a text engine in another process whose answers they control."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web


class FakeCompletions:
    """`POST /v1/completions` streaming "answer: <the prompt's last line>".
    While `gate` is clear, requests wait at the door (`waiting` counts them)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.requests: list[dict[str, Any]] = []
        self.waiting = 0
        self.arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> FakeCompletions:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for_waiting(self, count: int) -> None:
        async with self.arrived:
            await self.arrived.wait_for(lambda: self.waiting >= count)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        async with self.arrived:
            self.waiting += 1
            self.arrived.notify_all()
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        prompt = str(body.get("prompt", ""))
        last = prompt.replace("<|endoftext|>", "\n").strip().splitlines()[-1:] or [""]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in ("answer:", f" {last[0]}"):
            chunk = {"choices": [{"text": piece, "index": 0}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response
