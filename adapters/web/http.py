"""HTTP plumbing of the web channel: JSON errors, CORS, and reply events.

A reply from the manager becomes one *event* (`typing`, `partial`, `text`,
`image`, `notice`, `progress`, `error`); the JSON form of `POST /api/messages`
collects the lasting ones into `{"replies": [...]}`, the Server-Sent Events
form sends each as it comes (see `EventStream`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from bot.errors import Unavailable
from bot.messages import Image, NoticeKind, Reply, Text, Typing

log = logging.getLogger(__name__)

RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Notices that end a request with an HTTP error (or an `error` event once streaming).
STATUS_FOR_NOTICE = {
    NoticeKind.EMPTY: 400,
    NoticeKind.TOO_LONG: 413,
    NoticeKind.RATE_LIMITED: 429,
    NoticeKind.FORBIDDEN: 403,
    NoticeKind.BUSY: 429,
    NoticeKind.UNAVAILABLE: 503,
    NoticeKind.ERROR: 500,
}
#: Notices that are replaced by the next one of the same request (queue position, progress).
EPHEMERAL = {NoticeKind.QUEUED, NoticeKind.PROGRESS}
#: Events that the JSON form returns in `replies`.
LASTING = {"text", "image", "notice"}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def retry_after_header(retry_after: float | None) -> dict[str, str] | None:
    return {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None


def json_error(status: int, message: str, retry_after: float | None = None) -> web.Response:
    return web.json_response(
        {"error": message}, status=status, headers=retry_after_header(retry_after)
    )


def reply_event(reply: Reply, media_base: str = "") -> tuple[str, dict[str, Any]]:
    """The event name and JSON payload for one reply."""
    if isinstance(reply, Typing):
        return "typing", {}
    if isinstance(reply, Text):
        if not reply.final:
            return "partial", {"text": reply.text}
        text: dict[str, Any] = {"type": "text", "text": reply.text}
        if reply.source is not None:
            text["source"] = reply.source.as_dict()
        if reply.role != "bot":
            text["role"] = reply.role
        return "text", text
    if isinstance(reply, Image):
        url = f"{media_base}/media/{reply.draw_id}.png"
        return "image", {"type": "image", "url": url, "seed": reply.seed, "caption": reply.caption}
    status = STATUS_FOR_NOTICE.get(reply.kind)
    if status is not None:
        error: dict[str, Any] = {"error": reply.text, "status": status}
        if reply.retry_after:
            error["retry_after"] = max(1, round(reply.retry_after))
        return "error", error
    notice = {"type": "notice", "text": reply.text, "kind": str(reply.kind)}
    if reply.kind in EPHEMERAL:
        return "progress", {**notice, "ref": reply.ref}
    return "notice", notice


def error_response(payload: dict[str, Any]) -> web.Response:
    """An `error` event as the HTTP error the JSON form answers with."""
    return json_error(payload["status"], payload["error"], payload.get("retry_after"))


# -- middlewares -------------------------------------------------------------------


def json_errors(max_body_bytes: int) -> Any:
    """A middleware answering aiohttp's own errors (404, 405, 413 from the body
    limit) and an unreachable database as JSON."""

    @web.middleware
    async def middleware(request: web.Request, handler: RouteHandler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.reason
            if exc.status == 413:
                message = f"the request body is too large (the limit is {max_body_bytes} bytes)"
            return json_error(exc.status, message)
        except Unavailable as exc:
            return json_error(503, "storage unavailable, try again shortly", exc.retry_after)

    return middleware


def _origin_of(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""


class CorsPolicy:
    """`[web] allowed_origins` for the API: [] = same origin only, "*" = any.

    A browser request from another origin carries `Origin`; when that origin is
    allowed it gets the CORS headers (and preflights an answer), otherwise the
    API refuses it with 403 — so a page elsewhere cannot even create sessions
    through a "simple" request. Static files (the widget, pictures) are open.
    """

    ALLOW_HEADERS = "Authorization, Content-Type, Accept"
    ALLOW_METHODS = "GET, POST, OPTIONS"

    def __init__(self, allowed_origins: Iterable[str], public_url: str = "") -> None:
        self.any = False
        self.origins: set[str] = set()
        for entry in allowed_origins:
            if entry.strip() == "*":
                self.any = True
            elif (origin := _origin_of(entry)) or entry.strip() == "null":
                self.origins.add(origin or "null")
            else:
                log.warning("web.allowed_origins: %r is not an origin (https://host[:port])", entry)
        self.public_origin = _origin_of(public_url) if public_url else ""

    def cross_origin(self, request: web.BaseRequest) -> str | None:
        """The `Origin` of a browser's API call from another origin, else None."""
        origin = request.headers.get("Origin", "").lower()
        if not origin or not request.path.startswith("/api/"):
            return None
        if urlsplit(origin).netloc == request.host.lower() or origin == self.public_origin:
            return None
        return origin

    def allows(self, origin: str) -> bool:
        return self.any or origin in self.origins

    @web.middleware
    async def middleware(self, request: web.Request, handler: RouteHandler) -> web.StreamResponse:
        origin = self.cross_origin(request)
        if origin is None:
            return await handler(request)
        if not self.allows(origin):
            return json_error(403, f"origin {origin} may not use this API ([web] allowed_origins)")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": self.ALLOW_METHODS,
                    "Access-Control-Allow-Headers": self.ALLOW_HEADERS,
                    "Access-Control-Max-Age": "600",
                },
            )
        return await handler(request)

    async def add_headers(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """`on_response_prepare`: a streamed response sends its headers before
        the middleware sees it, so the CORS headers go on here."""
        origin = self.cross_origin(request)
        if origin is not None and self.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers["Vary"] = "Origin"


# -- Server-Sent Events ------------------------------------------------------------


def wants_event_stream(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


class EventStream:
    """A `text/event-stream` response, started on the first event.

    If the client goes away the stream stops writing but the caller keeps
    consuming replies, so the answer is still stored and shows up in the
    history when the visitor comes back.
    """

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache, no-transform",
                "X-Accel-Buffering": "no",
                **(headers or {}),
            }
        )
        self.started = False
        self.gone = False

    async def _write(self, chunk: str) -> None:
        if self.gone:
            return
        try:
            if not self.started:
                self.started = True
                await self.response.prepare(self.request)
            await self.response.write(chunk.encode())
        except ConnectionError:
            self.gone = True

    async def send(self, event: str, data: dict[str, Any]) -> None:
        await self._write(f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n")

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n")

    async def finish(self) -> web.StreamResponse:
        if not self.gone:
            try:
                await self.response.write_eof()
            except ConnectionError:
                self.gone = True
        return self.response
