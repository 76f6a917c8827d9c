"""The operator API and console on the web channel's server (handoff to people).

    GET  /operator                                   the console (static page)
    GET  /api/operator/me                            {"operator": name}: checks a token
    GET  /api/operator/conversations?state=...       waiting|claimed|bot|all
    GET  /api/operator/conversations/{id}            the conversation and its messages
    POST /api/operator/conversations/{id}/claim      200, or 409 if another operator has it
    POST /api/operator/conversations/{id}/release    back to the bot; 409 likewise
    POST /api/operator/conversations/{id}/messages   {"text"}: the user gets it on their platform
    GET  /api/operator/events                        Server-Sent Events of conversation changes

Every API call carries `Authorization: Bearer <operator token>` (401 without,
or with any other token: a web visitor's session token is no operator's).
Too many bad tokens from one address get 429 for a while. Everything comes
through `Services.operator_desk` (bot.handoff.OperatorDesk), never storage;
errors are JSON `{"error": ...}`.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from adapters.web.client_address import ClientAddress
from adapters.web.http import EventStream, json_error
from bot.channels import Services
from bot.handoff import Conflict, InvalidRequest, NotFound, OperatorDesk
from bot.limits import SlidingWindowLimiter

__all__ = ["add_operator_routes"]

#: A comment this often keeps proxies from closing a quiet event stream.
HEARTBEAT_S = 15.0
#: Bad tokens one address may try per minute before it must wait.
BAD_TOKENS_PER_MINUTE = 20
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STATIC = {
    "/operator": ("operator.html", PAGE_HEADERS),
    "/operator.js": ("operator.js", {"Cache-Control": "no-cache"}),
    "/operator.css": ("operator.css", {"Cache-Control": "no-cache"}),
}
STATIC_DIR = Path(__file__).with_name("static")
_CONVERSATION = r"/api/operator/conversations/{conversation_id:\d{1,18}}"
_CLOSE = {"type": "_close"}


def add_operator_routes(app: web.Application, services: Services) -> None:
    assert services.operator_desk is not None
    routes = OperatorRoutes(services.operator_desk, services)
    router = app.router
    for path in STATIC:
        router.add_get(path, routes.static)
    router.add_get("/api/operator/me", routes.me)
    router.add_get("/api/operator/conversations", routes.conversations)
    router.add_get(_CONVERSATION, routes.transcript)
    router.add_post(_CONVERSATION + "/claim", routes.claim)
    router.add_post(_CONVERSATION + "/release", routes.release)
    router.add_post(_CONVERSATION + "/messages", routes.post_message)
    router.add_get("/api/operator/events", routes.events)
    app.on_shutdown.append(routes.shutdown)


class OperatorRoutes:
    def __init__(self, desk: OperatorDesk, services: Services) -> None:
        self.desk = desk
        self.heartbeat_s = HEARTBEAT_S
        self.client_address = ClientAddress(services.config.web.trusted_proxies).resolve
        self._bad_tokens = SlidingWindowLimiter(BAD_TOKENS_PER_MINUTE, 60.0)
        self._blocked: dict[str, float] = {}
        self._streams: set[Any] = set()
        self._closing = False

    # -- authentication ------------------------------------------------------------

    def _operator(self, request: web.Request) -> str | web.Response:
        """The signed-in operator's name, or the error response to send."""
        address = self.client_address(request)
        now = time.monotonic()
        blocked_until = self._blocked.get(address, 0.0)
        if blocked_until > now:
            return json_error(429, "too many bad operator tokens; wait", blocked_until - now)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        name = self.desk.authenticate(token) if scheme.lower() == "bearer" else None
        if name is not None:
            return name
        wait = self._bad_tokens.acquire(address)
        if wait is not None:
            if len(self._blocked) > 10_000:
                self._blocked = {k: v for k, v in self._blocked.items() if v > now}
            self._blocked[address] = now + wait
            return json_error(429, "too many bad operator tokens; wait", wait)
        response = json_error(401, "missing or unknown operator token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="operator"'
        return response

    # -- routes ----------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.StreamResponse:
        name, headers = STATIC[request.path]
        return web.FileResponse(STATIC_DIR / name, headers=headers)

    async def me(self, request: web.Request) -> web.Response:
        """Who the token belongs to: the console checks a token with it."""
        operator = self._operator(request)
        if isinstance(operator, web.Response):
            return operator
        return web.json_response({"operator": operator})

    async def conversations(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        if isinstance(operator, web.Response):
            return operator
        try:
            views = await self.desk.list(request.query.get("state", "all"))
        except InvalidRequest as exc:
            return json_error(exc.status, str(exc))
        return web.json_response({"conversations": [view.as_dict() for view in views]})

    async def transcript(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        if isinstance(operator, web.Response):
            return operator
        try:
            transcript = await self.desk.transcript(_conversation_id(request))
        except NotFound as exc:
            return json_error(404, str(exc))
        return web.json_response(transcript.as_dict())

    async def claim(self, request: web.Request) -> web.Response:
        return await self._change(request, "claim")

    async def release(self, request: web.Request) -> web.Response:
        return await self._change(request, "release")

    async def _change(self, request: web.Request, what: str) -> web.Response:
        operator = self._operator(request)
        if isinstance(operator, web.Response):
            return operator
        conversation_id = _conversation_id(request)
        try:
            if what == "claim":
                view = await self.desk.claim(conversation_id, operator)
            else:
                view = await self.desk.release(conversation_id, operator)
        except NotFound as exc:
            return json_error(404, str(exc))
        except Conflict as exc:
            return _conflict(exc)
        return web.json_response({"conversation": view.as_dict()})

    async def post_message(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        if isinstance(operator, web.Response):
            return operator
        bad_body = 'the body must be JSON like {"text": "..."}'
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return json_error(400, bad_body)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return json_error(400, bad_body)
        try:
            answered = await self.desk.reply(_conversation_id(request), operator, body["text"])
        except NotFound as exc:
            return json_error(404, str(exc))
        except Conflict as exc:
            return _conflict(exc)
        except InvalidRequest as exc:
            return json_error(exc.status, str(exc))
        return web.json_response(
            {
                "conversation": answered.conversation.as_dict(),
                "message": answered.message.as_dict(),
                "delivered": answered.delivered,
            }
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Conversation changes as Server-Sent Events: `ready` once listening,
        then `conversation` and `message` events (data as in bot.handoff.views)."""
        operator = self._operator(request)
        if isinstance(operator, web.Response):
            return operator
        stream = EventStream(request)
        async with self.desk.events() as events:
            self._streams.add(events)
            try:
                await stream.send("ready", {"operator": operator})
                while not stream.gone and not self._closing:
                    try:
                        event = await asyncio.wait_for(events.get(), self.heartbeat_s)
                    except TimeoutError:
                        await stream.comment("keep-alive")
                        continue
                    kind = event.get("type")
                    if kind in ("conversation", "message"):
                        await stream.send(str(kind), event)
            finally:
                self._streams.discard(events)
        return await stream.finish()

    async def shutdown(self, app: web.Application) -> None:
        """The server is stopping: end the event streams, so it need not wait for them."""
        self._closing = True
        for events in list(self._streams):
            events.offer(_CLOSE)


def _conversation_id(request: web.Request) -> int:
    return int(request.match_info["conversation_id"])


def _conflict(exc: Conflict) -> web.Response:
    return web.json_response(
        {"error": str(exc), "conversation": exc.conversation.as_dict()}, status=409
    )
