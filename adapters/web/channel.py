"""The web channel: the JSON API and the chat widget on the bot's aiohttp server.

`POST /api/sessions` issues a random bearer token (only its SHA-256 is
stored); `POST /api/messages` answers a message, as one JSON document or, with
`Accept: text/event-stream`, as Server-Sent Events while the reply is
generated, and honours `Idempotency-Key` (a retry returns the first answer and
stores nothing twice); `GET /api/messages` returns the session's current
conversation; `GET /api/events` streams replies pushed to the visitor later
(adapters.web.events). `GET /` is a demo page (`web.demo_page`) and
`GET /widget.js` the embeddable widget (files in adapters/web/static). Errors
are JSON `{"error": ...}`. Sessions, history, pictures and health come from
`Services.web` (bot.web_services), never from storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from aiohttp import web

from adapters.web.client_address import ClientAddress
from adapters.web.events import PushHub, WebOutbound
from adapters.web.http import (
    LASTING,
    CorsPolicy,
    EventStream,
    error_response,
    json_error,
    json_errors,
    reply_event,
    token_hash,
    wants_event_stream,
)
from bot.channels import ChannelState, Handler, Services
from bot.errors import Unavailable
from bot.limits import SlidingWindowLimiter
from bot.messages import Incoming, Reply
from bot.metrics import CONTENT_TYPE_LATEST
from bot.text_safety import safe_text

__all__ = ["PLATFORM", "STATIC_DIR", "WebChannel", "json_error", "token_hash"]

log = logging.getLogger(__name__)

PLATFORM = "web"
STATIC_DIR = Path(__file__).with_name("static")
#: name -> (file, Cache-Control) of the widget's files.
STATIC_FILES = {
    "/": ("index.html", "no-cache"),
    "/widget.js": ("widget.js", "public, max-age=300"),
    "/widget.css": ("widget.css", "public, max-age=300"),
}
#: A comment line this often keeps proxies from closing a quiet event stream.
HEARTBEAT_S = 15.0
_BAD_BODY = 'the body must be JSON like {"text": "..."}'
#: `Idempotency-Key`: printable ASCII, at most this long.
IDEMPOTENCY_KEY_MAX = 200
_NO_SESSION = "missing or unknown session; create one with POST /api/sessions"


class WebChannel:
    name: ClassVar[str] = "web"
    in_run: ClassVar[bool] = True

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config
        self.handle: Handler = services.handle
        self.web = services.web
        self.metrics = services.metrics
        self.session_limiter = SlidingWindowLimiter(self.config.web.sessions_per_minute, 60.0)
        self.client_address = ClientAddress(self.config.web.trusted_proxies).resolve
        self.cors = CorsPolicy(self.config.web.allowed_origins, self.config.web.public_url)
        self.media_base = self.config.web.public_url.rstrip("/")
        self.heartbeat_s = HEARTBEAT_S
        self.outbound = WebOutbound(services.bus, self.media_base)
        self.pushes = PushHub(services.bus)
        self.health = ChannelState()
        self.app = self.build_app()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @classmethod
    def create(cls, services: Services) -> WebChannel | None:
        if not services.config.web.enabled:
            log.info("web channel is off: [web] enabled = false")
            return None
        return cls(services)

    def build_app(self) -> web.Application:
        max_body = self.config.web.max_body_bytes
        app = web.Application(
            client_max_size=max_body, middlewares=[self.cors.middleware, json_errors(max_body)]
        )
        app.on_response_prepare.append(self.cors.add_headers)
        app.router.add_post("/api/sessions", self.create_session)
        app.router.add_post("/api/messages", self.post_message)
        app.router.add_get("/api/messages", self.get_messages)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get(r"/media/{draw_id:[A-Za-z0-9_-]+}.png", self.media)
        for path in STATIC_FILES:
            if path != "/" or self.config.web.demo_page:
                app.router.add_get(path, self.static)
        if self.services.operator_desk is not None:
            from adapters.web.operator import add_operator_routes

            add_operator_routes(app, self.services)
        return app

    async def start(self) -> None:
        await self.pushes.start()
        self.services.delivery.attach(self.outbound)
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.web.host, self.config.web.port)
        await site.start()
        server = site._server  # the bound port when port = 0
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.web.port
        self.health = ChannelState("up")
        log.info("web channel on http://%s:%s/", self.config.web.host, self.port)

    async def stop(self) -> None:
        self.services.delivery.detach(self.outbound)
        await self.pushes.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.health = ChannelState("off", "stopped")

    # -- helpers ---------------------------------------------------------------

    async def _session_user(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return await self.web.session_user(token_hash(token.strip()))

    async def _read_text(self, request: web.Request) -> str | web.Response:
        try:
            body = await request.json()
        except (ValueError, LookupError):  # bad JSON, bad bytes, an unknown charset
            return json_error(400, _BAD_BODY)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return json_error(400, _BAD_BODY)
        text: str = safe_text(body["text"])
        if not text.strip():
            return json_error(400, "text must not be empty")
        limit = self.config.bot.max_input_chars
        if len(text.strip()) > limit:
            size = len(text.strip())
            message = f"That message is too long ({size:,} characters; the limit is {limit:,})."
            return json_error(413, message)
        return text

    def incoming(self, user_id: str, text: str, idempotency_key: str | None = None) -> Incoming:
        return Incoming(
            platform=PLATFORM,
            chat_id=user_id,
            user_id=user_id,
            user_name="web visitor",
            text=text,
            message_id=idempotency_key,
            answer_duplicates=True,
        )

    @staticmethod
    def _idempotency_key(request: web.Request) -> str | web.Response | None:
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return None
        key = key.strip()
        if not key or len(key) > IDEMPOTENCY_KEY_MAX or not key.isascii() or not key.isprintable():
            return json_error(
                400, f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters"
            )
        return "idem:" + key

    async def _with_heartbeats(
        self, replies: AsyncIterator[Reply]
    ) -> AsyncGenerator[Reply | None, None]:
        """The replies, with a None whenever none came for `heartbeat_s` seconds."""
        iterator = aiter(replies)
        step: asyncio.Future[Reply] | None = None
        try:
            while True:
                step = step or asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({step}, timeout=self.heartbeat_s)
                if not done:
                    yield None
                    continue
                try:
                    reply = step.result()
                except StopAsyncIteration:
                    step = None
                    return
                step = None
                yield reply
        finally:
            if step is not None:
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- routes --------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        wait = self.session_limiter.acquire(self.client_address(request))
        if wait is not None:
            return json_error(
                429,
                f"Too many new chats from your address. Please wait {wait:.0f} s and try again.",
                retry_after=wait,
            )
        token = secrets.token_urlsafe(32)
        user_id = "w" + secrets.token_hex(12)
        await self.web.create_session(token_hash(token), user_id)
        return web.json_response({"session": token, "user_id": user_id}, status=201)

    async def post_message(self, request: web.Request) -> web.StreamResponse:
        user_id = await self._session_user(request)
        if user_id is None:
            return json_error(401, _NO_SESSION)
        key = self._idempotency_key(request)
        if isinstance(key, web.Response):
            return key
        text = await self._read_text(request)
        if isinstance(text, web.Response):
            return text
        replies = self.handle(self.incoming(user_id, text, key))
        if wants_event_stream(request):
            return await self._stream(request, replies)
        lasting: list[dict[str, Any]] = []
        async with contextlib.aclosing(replies):
            async for reply in replies:
                event, payload = reply_event(reply, self.media_base)
                if event == "error":
                    return error_response(payload)
                if event in LASTING:
                    lasting.append(payload)
        return web.json_response({"replies": lasting})

    async def _stream(
        self, request: web.Request, replies: AsyncGenerator[Reply, None]
    ) -> web.StreamResponse:
        """Send each reply as an event; an error before the first event is a
        plain HTTP error, later ones are `error` events. Ends with `done`."""
        stream = EventStream(request)
        lasting: list[dict[str, Any]] = []
        async with contextlib.aclosing(self._with_heartbeats(replies)) as events:
            async for reply in events:
                if reply is None:
                    await stream.comment("keep-alive")
                    continue
                event, payload = reply_event(reply, self.media_base)
                if event == "error" and not stream.started:
                    return error_response(payload)
                if event in LASTING:
                    lasting.append(payload)
                await stream.send(event, payload)
        await stream.send("done", {"replies": lasting})
        return await stream.finish()

    async def get_messages(self, request: web.Request) -> web.Response:
        user_id = await self._session_user(request)
        if user_id is None:
            return json_error(401, _NO_SESSION)
        if self.web.banned(user_id):
            return json_error(403, self.config.access.banned_answer)
        history = await self.web.history(user_id, limit=500)
        return web.json_response({"messages": [entry.as_dict() for entry in history]})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """`GET /api/events`: replies pushed to this visitor, as Server-Sent Events."""
        user_id = await self._session_user(request)
        if user_id is None:
            return json_error(401, _NO_SESSION)
        if self.web.banned(user_id):
            return json_error(403, self.config.access.banned_answer)
        return await self.pushes.stream(request, user_id, self.heartbeat_s)

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            problems = await self.web.problems()
        except Unavailable:
            problems = ["database unreachable"]
        if problems:
            return web.json_response(
                {"status": "unavailable", "problems": problems},
                status=503,
                headers={"Retry-After": "10"},
            )
        return web.json_response({"status": "ok"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def media(self, request: web.Request) -> web.StreamResponse:
        path = await self.web.picture(request.match_info["draw_id"])
        if path is None or not await asyncio.to_thread(path.is_file):
            return json_error(404, "no such picture")
        return web.FileResponse(path, headers={"Cache-Control": "private, max-age=86400"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name, cache = STATIC_FILES[request.path]
        return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": cache})
