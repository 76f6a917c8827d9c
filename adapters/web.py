"""The web channel: the JSON API (and the widget) on the bot's aiohttp server.

`POST /api/sessions` issues a random bearer token (only its SHA-256 is
stored); `POST /api/messages` answers a message; `GET /api/messages` returns
the session's current conversation. Errors are JSON `{"error": ...}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from aiohttp import web

from bot.channels import Handler, Services
from bot.limits import SlidingWindowLimiter
from bot.messages import Image, Incoming, Notice, NoticeKind, Text
from bot.metrics import CONTENT_TYPE_LATEST
from storage import StorageUnavailable, Store

log = logging.getLogger(__name__)

PLATFORM = "web"
_STATUS_FOR_NOTICE = {
    NoticeKind.EMPTY: 400,
    NoticeKind.TOO_LONG: 413,
    NoticeKind.RATE_LIMITED: 429,
    NoticeKind.BUSY: 429,
    NoticeKind.UNAVAILABLE: 503,
    NoticeKind.ERROR: 500,
}
_EPHEMERAL = {NoticeKind.QUEUED, NoticeKind.PROGRESS}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def json_error(status: int, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers)


def reply_json(reply: Text | Image | Notice) -> dict[str, Any]:
    if isinstance(reply, Image):
        return {"type": "image", "url": f"/media/{reply.draw_id}.png", "seed": reply.seed, "caption": reply.caption}
    if isinstance(reply, Notice):
        return {"type": "notice", "text": reply.text}
    return {"type": "text", "text": reply.text}


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413 from the body limit) as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason)
    except StorageUnavailable:
        return json_error(503, "storage unavailable, try again shortly", retry_after=10)


class WebChannel:
    name: ClassVar[str] = "web"
    in_run: ClassVar[bool] = True

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config
        self.handle: Handler = services.handle
        self.store: Store = services.store
        self.metrics = services.metrics
        self.session_limiter = SlidingWindowLimiter(self.config.web.sessions_per_minute, 60.0)
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
        app = web.Application(
            client_max_size=self.config.web.max_body_bytes, middlewares=[json_errors]
        )
        app.router.add_post("/api/sessions", self.create_session)
        app.router.add_post("/api/messages", self.post_message)
        app.router.add_get("/api/messages", self.get_messages)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get(r"/media/{draw_id:[A-Za-z0-9_-]+}.png", self.media)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.web.host, self.config.web.port)
        await site.start()
        server = site._server  # noqa: SLF001 - the bound port when port = 0
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.web.port
        log.info("web channel on http://%s:%s/", self.config.web.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- helpers ---------------------------------------------------------------

    async def _session_user(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return await self.store.web_session_user(token_hash(token.strip()))

    @staticmethod
    def client_address(request: web.Request) -> str:
        return request.remote or "unknown"

    async def _read_text(self, request: web.Request) -> str | web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return json_error(400, "the body must be JSON like {\"text\": \"...\"}")
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return json_error(400, "the body must be JSON like {\"text\": \"...\"}")
        text: str = body["text"]
        if not text.strip():
            return json_error(400, "text must not be empty")
        limit = self.config.bot.max_input_chars
        if len(text.strip()) > limit:
            return json_error(413, f"text is too long ({len(text)} characters; the limit is {limit})")
        return text

    def incoming(self, user_id: str, text: str) -> Incoming:
        return Incoming(
            platform=PLATFORM,
            chat_id=user_id,
            user_id=user_id,
            user_name="web visitor",
            text=text,
            message_id=secrets.token_hex(8),
        )

    # -- routes --------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        wait = self.session_limiter.acquire(self.client_address(request))
        if wait is not None:
            return json_error(429, "too many new sessions from this address", retry_after=wait)
        token = secrets.token_urlsafe(32)
        user_id = "w" + secrets.token_hex(12)
        await self.store.create_web_session(token_hash(token), user_id)
        return web.json_response({"session": token, "user_id": user_id}, status=201)

    async def post_message(self, request: web.Request) -> web.StreamResponse:
        user_id = await self._session_user(request)
        if user_id is None:
            return json_error(401, "missing or unknown session; create one with POST /api/sessions")
        text = await self._read_text(request)
        if isinstance(text, web.Response):
            return text
        replies: list[dict[str, Any]] = []
        async for reply in self.handle(self.incoming(user_id, text)):
            if isinstance(reply, Notice):
                status = _STATUS_FOR_NOTICE.get(reply.kind)
                if status is not None:
                    return json_error(status, reply.text, retry_after=reply.retry_after)
                if reply.kind in _EPHEMERAL:
                    continue
                replies.append(reply_json(reply))
            elif isinstance(reply, Text) and reply.final or isinstance(reply, Image):
                replies.append(reply_json(reply))
        return web.json_response({"replies": replies})

    async def get_messages(self, request: web.Request) -> web.Response:
        user_id = await self._session_user(request)
        if user_id is None:
            return json_error(401, "missing or unknown session; create one with POST /api/sessions")
        history = await self.store.active_history(PLATFORM, user_id, user_id, limit=500)
        return web.json_response({"messages": [message.as_dict() for message in history]})

    async def healthz(self, request: web.Request) -> web.Response:
        problems = []
        if not self.services.engine_ready():
            problems.append("text engine not ready")
        try:
            await self.store.ping()
        except StorageUnavailable:
            problems.append("database unreachable")
        if problems:
            return web.json_response({"status": "unavailable", "problems": problems}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def media(self, request: web.Request) -> web.StreamResponse:
        path = await self.store.draw_image_path(request.match_info["draw_id"])
        if path is None or not Path(path).is_file():
            return json_error(404, "no such picture")
        return web.FileResponse(path, headers={"Cache-Control": "private, max-age=86400"})
