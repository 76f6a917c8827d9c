"""A fake Telegram Bot API server for end-to-end tests (aiohttp, 127.0.0.1).

It speaks enough of the Bot API for python-telegram-bot: `getMe`,
`getUpdates` (long polling with offset confirmation and `allowed_updates`),
`setWebhook`/`deleteWebhook`/`getWebhookInfo` (with a webhook set, updates
are POSTed to it in order, with the secret token header), `sendMessage`,
`sendChatAction`, `sendPhoto` (multipart), `editMessageText`, `deleteMessage`,
`setMyCommands`, `close`, `logOut`. Tests push user messages with
`private_message`/`group_message`/..., read what the bot sent from `calls`,
and can make the next calls of a method fail (`fail_next`: 429 with
`retry_after`, 502, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

BOT_ID = 777000111
BOT_USERNAME = "aigc_test_bot"
_MENTION = re.compile(r"(?<![\w@])@\w+")
_JSON_FIELDS = ("reply_parameters", "commands", "allowed_updates", "entities", "reply_markup")


@dataclass
class Call:
    """One Bot API request the bot made, answered or failed."""

    method: str
    params: dict[str, Any]
    at: float
    status: int = 200
    result: Any = None

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        return int(value) if value is not None else None

    @property
    def text(self) -> str | None:
        return self.params.get("text")

    @property
    def reply_to(self) -> int | None:
        """The message this one replies to, however PTB spelled it."""
        parameters = self.params.get("reply_parameters")
        if isinstance(parameters, dict):
            return int(parameters["message_id"])
        value = self.params.get("reply_to_message_id")
        return int(value) if value is not None else None

    @property
    def message_id(self) -> int | None:
        return self.result.get("message_id") if isinstance(self.result, dict) else None


@dataclass
class _Failure:
    status: int
    description: str
    parameters: dict[str, Any] | None
    times: int


@dataclass
class FakeBotApi:
    token: str
    username: str = BOT_USERNAME
    bot_id: int = BOT_ID
    calls: list[Call] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    webhook_url: str = ""
    webhook_secret: str | None = None
    allowed_updates: list[str] = field(default_factory=list)
    port: int = 0
    #: The highest update id the bot has confirmed (asked past with `offset`).
    confirmed: int = 0

    def __post_init__(self) -> None:
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._changed = asyncio.Condition()
        self._failures: dict[str, list[_Failure]] = {}
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._webhook_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._webhook_task: asyncio.Task[None] | None = None

    # -- lifetime ---------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        """Listen on `port` (0: any free one)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._webhook_task = asyncio.create_task(self._deliver_webhooks())

    async def close(self) -> None:
        self._closing = True
        await self._notify()
        if self._webhook_task is not None:
            self._webhook_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._webhook_task
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def bot_user(self) -> dict[str, Any]:
        return {"id": self.bot_id, "is_bot": True, "first_name": "AIGC", "username": self.username}

    # -- what the bot did -------------------------------------------------------------

    def sent(self, method: str = "sendMessage", chat_id: int | None = None) -> list[Call]:
        """Successful calls of `method` (to one chat), in order."""
        return [
            call
            for call in self.calls
            if call.method == method
            and call.status == 200
            and (chat_id is None or call.chat_id == chat_id)
        ]

    def texts(self, chat_id: int) -> list[str]:
        return [call.text or "" for call in self.sent("sendMessage", chat_id)]

    def called(self, method: str) -> bool:
        return any(call.method == method for call in self.calls)

    async def wait_until(self, condition: Callable[[], bool], within: float = 15.0) -> None:
        """Until `condition()` holds; raises TimeoutError with what was sent so far."""
        try:
            async with asyncio.timeout(within):
                async with self._changed:
                    await self._changed.wait_for(condition)
        except TimeoutError:
            methods = [f"{c.method}:{c.status}" for c in self.calls if c.method != "getUpdates"]
            raise TimeoutError(
                f"condition not met in {within} s; calls so far: {methods}"
            ) from None

    async def settle(self, seconds: float = 0.5) -> None:
        """Give the bot time to do something it should not do."""
        await asyncio.sleep(seconds)

    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        retry_after: int | None = 1,
        times: int = 1,
        description: str | None = None,
    ) -> None:
        parameters = {"retry_after": retry_after} if status == 429 and retry_after else None
        text = description or (
            f"Too Many Requests: retry after {retry_after}" if status == 429 else "Bad Gateway"
        )
        self._failures.setdefault(method.lower(), []).append(
            _Failure(status, text, parameters, times)
        )

    # -- what users do ----------------------------------------------------------------

    def private_message(self, user_id: int, text: str, **extra: Any) -> dict[str, Any]:
        return self.push(self.message(self.private_chat(user_id), user_id, text=text, **extra))

    def group_message(
        self, chat_id: int, user_id: int, text: str, *, reply_to: Call | None = None, **extra: Any
    ) -> dict[str, Any]:
        if reply_to is not None:
            extra["reply_to_message"] = {
                "message_id": reply_to.message_id,
                "date": int(time.time()),
                "chat": self.group_chat(chat_id),
                "from": self.bot_user,
                "text": reply_to.text,
            }
        return self.push(self.message(self.group_chat(chat_id), user_id, text=text, **extra))

    def sticker(self, chat: dict[str, Any], user_id: int) -> dict[str, Any]:
        sticker = {
            "file_id": "sticker-1",
            "file_unique_id": "s1",
            "type": "regular",
            "width": 512,
            "height": 512,
            "is_animated": False,
            "is_video": False,
        }
        return self.push(self.message(chat, user_id, sticker=sticker))

    def voice(self, chat: dict[str, Any], user_id: int) -> dict[str, Any]:
        voice = {"file_id": "voice-1", "file_unique_id": "v1", "duration": 2}
        return self.push(self.message(chat, user_id, voice=voice))

    def edit(self, message: dict[str, Any], text: str) -> None:
        edited = {**message, "text": text, "edit_date": int(time.time())}
        edited["entities"] = _entities(text)
        self.push(edited, kind="edited_message")

    @staticmethod
    def private_chat(user_id: int) -> dict[str, Any]:
        return {"id": user_id, "type": "private", "first_name": f"User{user_id}"}

    @staticmethod
    def group_chat(chat_id: int) -> dict[str, Any]:
        return {"id": chat_id, "type": "supergroup", "title": f"Group {chat_id}"}

    def message(self, chat: dict[str, Any], user_id: int, **content: Any) -> dict[str, Any]:
        message: dict[str, Any] = {
            "message_id": self._next_message_id(chat["id"]),
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"},
            **content,
        }
        if "text" in content and "entities" not in content:
            entities = _entities(content["text"])
            if entities:
                message["entities"] = entities
        return message

    def push(self, message: dict[str, Any], kind: str = "message") -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), kind: message}
        if self.webhook_url:
            self._webhook_queue.put_nowait(update)
        else:
            self._updates.append(update)
            asyncio.get_running_loop().create_task(self._notify())
        return message

    # -- the API ----------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params = await _params(request)
        call = Call(method, params, time.monotonic())
        failures = self._failures.get(method.lower())
        if failures:
            failure = failures[0]
            failure.times -= 1
            if failure.times <= 0:
                failures.pop(0)
            call.status = failure.status
            await self._record(call)
            return _error(failure.status, failure.description, failure.parameters)
        handler = getattr(self, f"_api_{method.lower()}", None)
        if handler is None:
            return _error(404, "Not Found: method not found")
        if method.lower() != "getupdates":
            await self._record(call)
        call.result = await handler(params)
        await self._notify()
        return web.json_response({"ok": True, "result": call.result})

    async def _api_getme(self, params: dict[str, Any]) -> Any:
        return {
            **self.bot_user,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def _api_getupdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        limit = int(params.get("limit") or 100)
        if params.get("allowed_updates"):
            self.allowed_updates = list(params["allowed_updates"])
        if offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
            self.confirmed = max(self.confirmed, offset - 1)
        await self._record(Call("getUpdates", params, time.monotonic()))

        def ready() -> bool:
            return self._closing or any(self._wanted(u) for u in self._updates)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(ready)
        return [u for u in self._updates if self._wanted(u)][:limit]

    def _wanted(self, update: dict[str, Any]) -> bool:
        allowed = self.allowed_updates or ["message", "edited_message", "channel_post"]
        return any(kind in update for kind in allowed)

    async def _api_sendmessage(self, params: dict[str, Any]) -> Any:
        return self._bot_message(params, text=params["text"])

    async def _api_editmessagetext(self, params: dict[str, Any]) -> Any:
        chat_id = int(params["chat_id"])
        return {
            "message_id": int(params["message_id"]),
            "date": int(time.time()),
            "edit_date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": self.bot_user,
            "text": params["text"],
        }

    async def _api_sendphoto(self, params: dict[str, Any]) -> Any:
        photo = params.get("photo")
        if not isinstance(photo, bytes) or not photo.startswith(b"\x89PNG"):
            raise web.HTTPBadRequest(text="photo must be an uploaded PNG")
        size = {"file_id": "photo-1", "file_unique_id": "p1", "width": 64, "height": 64}
        extra = {"caption": params["caption"]} if params.get("caption") else {}
        return self._bot_message(params, photo=[size], **extra)

    async def _api_deletemessage(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_sendchataction(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_setmycommands(self, params: dict[str, Any]) -> Any:
        self.commands = list(params.get("commands") or [])
        return True

    async def _api_deletewebhook(self, params: dict[str, Any]) -> Any:
        self.webhook_url = ""
        return True

    async def _api_setwebhook(self, params: dict[str, Any]) -> Any:
        self.webhook_url = params["url"]
        self.webhook_secret = params.get("secret_token")
        if params.get("allowed_updates"):
            self.allowed_updates = list(params["allowed_updates"])
        return True

    async def _api_getwebhookinfo(self, params: dict[str, Any]) -> Any:
        return {
            "url": self.webhook_url,
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }

    async def _api_close(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_logout(self, params: dict[str, Any]) -> Any:
        return True

    # -- helpers ----------------------------------------------------------------------

    def _bot_message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        return {
            "message_id": self._next_message_id(chat_id),
            "date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": self.bot_user,
            **content,
        }

    def _chat(self, chat_id: int) -> dict[str, Any]:
        return self.private_chat(chat_id) if chat_id > 0 else self.group_chat(chat_id)

    def _next_message_id(self, chat_id: int) -> int:
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    async def _record(self, call: Call) -> None:
        self.calls.append(call)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _deliver_webhooks(self) -> None:
        """POST pushed updates to the webhook one at a time, like Telegram."""
        async with aiohttp.ClientSession() as session:
            while True:
                update = await self._webhook_queue.get()
                headers = {"X-Telegram-Bot-Api-Secret-Token": self.webhook_secret or ""}
                for _ in range(50):
                    try:
                        async with session.post(
                            self.webhook_url, json=update, headers=headers
                        ) as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)


def _entities(text: str) -> list[dict[str, Any]]:
    """What Telegram marks up in a user's text: a leading /command and @mentions."""

    def utf16(index: int) -> int:
        return len(text[:index].encode("utf-16-le")) // 2

    entities = []
    command = re.match(r"/\w+(@\w+)?", text)
    if command:
        entities.append({"type": "bot_command", "offset": 0, "length": utf16(command.end())})
    for match in _MENTION.finditer(text):
        start = utf16(match.start())
        entities.append({"type": "mention", "offset": start, "length": utf16(match.end()) - start})
    return entities


async def _params(request: web.Request) -> dict[str, Any]:
    """Form fields (urlencoded or multipart, as PTB sends them) or a JSON body;
    structured fields decoded from their JSON strings, uploads as bytes."""
    if request.content_type == "application/json":
        return dict(await request.json())
    params: dict[str, Any] = {}
    for name, value in (await request.post()).items():
        if isinstance(value, web.FileField):
            params[name] = value.file.read()
        elif name in _JSON_FIELDS and isinstance(value, str):
            params[name] = json.loads(value)
        else:
            params[name] = value
    return params


def _error(status: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=status)
