"""`aigc-bot run` as a real process, for tests that kill it, restart it or run two."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import aiohttp

from support.eventually import eventually

AIGC_BOT = str(Path(sys.executable).parent / "aigc-bot")


class BotProcess:
    """One `aigc-bot run` with its own environment; its output goes to `log`."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path, web_port: int | None) -> None:
        self.env = env
        self.cwd = cwd
        self.log = log
        self.web_port = web_port
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        #: seconds from each start to a healthy /healthz
        self.start_times: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    async def start(self, *, healthy_within: float = 120.0) -> None:
        self.starts += 1
        with self.log.open("ab") as output:
            output.write(f"\n===== start {self.starts} =====\n".encode())
            output.flush()
            self.process = await asyncio.create_subprocess_exec(
                AIGC_BOT, "run", cwd=self.cwd, env=self.env, stdout=output, stderr=output
            )
        if self.web_port is not None:
            started = time.monotonic()
            await eventually(self._healthy, within=healthy_within, every=0.1)
            self.start_times.append(round(time.monotonic() - started, 1))

    async def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise AssertionError(f"aigc-bot run exited {self.process.returncode}:\n{self.tail()}")
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(
                    self.url + "/healthz", timeout=aiohttp.ClientTimeout(2)
                ) as r:
                    return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def kill(self) -> None:
        """`kill -9`: no shutdown, no cleanup."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def terminate(self, within: float = 60.0) -> int:
        """SIGTERM, then its exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), within)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
