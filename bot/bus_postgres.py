"""`PostgresBus`: the event bus over PostgreSQL `LISTEN/NOTIFY`, so several
`aigc-bot run` processes on one database need nothing else to share events.

One asyncpg connection listens (re-connecting with backoff when the database
restarts), another publishes with `pg_notify`. A NOTIFY payload is limited to
8,000 bytes, so longer events travel in numbered parts that the receiver puts
back together (NOTIFYs from one session arrive in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from sqlalchemy.engine import make_url

from bot.bus import BusBase, Event

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "aigc_bot_"
PART_BYTES = 7000
_MAX_PENDING = 64  # half-received long events kept at once


def asyncpg_dsn(url: str) -> str:
    """`postgresql+asyncpg://...` (SQLAlchemy) as a plain libpq DSN."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresBus(BusBase):
    def __init__(self, url: str, *, reconnect_max_s: float = 10.0) -> None:
        super().__init__()
        self.dsn = asyncpg_dsn(url)
        self.reconnect_max_s = reconnect_max_s
        self._id = secrets.token_hex(6)
        self._listener: Any = None
        self._publisher: Any = None
        self._publish_lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._parts: dict[str, list[str]] = {}
        self._closing = False

    async def start(self) -> None:
        await self._connect()
        self._watch = asyncio.create_task(self._keep_listening(), name="postgres-bus")

    async def close(self) -> None:
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for connection in (self._listener, self._publisher):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()

    async def _connect(self) -> None:
        import asyncpg

        self._listener = await asyncpg.connect(self.dsn, timeout=10)
        for topic in self._subscribers:
            await self._listen(topic)

    async def _keep_listening(self) -> None:
        """Re-open the listening connection when it dies (a database restart)."""
        pause = 0.5
        while not self._closing:
            await asyncio.sleep(1.0)
            if self._listener is not None and not self._listener.is_closed():
                pause = 0.5
                continue
            try:
                await self._connect()
                log.info("event bus: listening on PostgreSQL again")
            except Exception as exc:  # the database is still down
                log.warning("event bus: PostgreSQL unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.reconnect_max_s)

    @staticmethod
    def _channel(topic: str) -> str:
        return CHANNEL_PREFIX + "".join(c if c.isalnum() else "_" for c in topic)[:50]

    async def _listen(self, topic: str) -> None:
        if self._listener is None or self._listener.is_closed():
            return  # added when the connection is back
        channel = self._channel(topic)

        def on_notify(_connection: Any, _pid: int, _channel: str, payload: str) -> None:
            self._receive(topic, payload)

        await self._listener.add_listener(channel, on_notify)

    async def _unlisten(self, topic: str) -> None:
        if self._listener is None or self._listener.is_closed():
            return
        with contextlib.suppress(Exception):
            await self._listener.execute(f'UNLISTEN "{self._channel(topic)}"')

    def _receive(self, topic: str, payload: str) -> None:
        try:
            envelope = json.loads(payload)
        except ValueError:
            return
        if "part" in envelope:
            key = f"{envelope['from']}:{envelope['seq']}"
            parts = self._parts.setdefault(key, [])
            parts.append(envelope["part"])
            if len(parts) < envelope["of"]:
                while len(self._parts) > _MAX_PENDING:
                    self._parts.pop(next(iter(self._parts)))
                return
            del self._parts[key]
            try:
                envelope = {"event": json.loads("".join(parts))}
            except ValueError:
                return
        event = envelope.get("event")
        if isinstance(event, dict):
            self.deliver_locally(topic, event)

    async def publish(self, topic: str, event: Event) -> None:
        import asyncpg

        body = json.dumps(event, ensure_ascii=False)
        if len(body.encode()) <= PART_BYTES:
            payloads = [json.dumps({"event": event}, ensure_ascii=False)]
        else:
            chunks = [body[i : i + PART_BYTES // 4] for i in range(0, len(body), PART_BYTES // 4)]
            seq = secrets.token_hex(4)
            payloads = [
                json.dumps(
                    {"from": self._id, "seq": seq, "of": len(chunks), "part": chunk},
                    ensure_ascii=False,
                )
                for chunk in chunks
            ]
        async with self._publish_lock:
            for attempt in (1, 2):
                try:
                    if self._publisher is None or self._publisher.is_closed():
                        self._publisher = await asyncpg.connect(self.dsn, timeout=10)
                    async with self._publisher.transaction():  # all parts, in order
                        for payload in payloads:
                            await self._publisher.execute(
                                "SELECT pg_notify($1, $2)", self._channel(topic), payload
                            )
                    return
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    self._publisher = None
                    if attempt == 2:
                        raise
