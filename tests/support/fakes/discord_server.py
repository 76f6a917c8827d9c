"""A fake Discord — REST API and gateway — on 127.0.0.1, for end-to-end tests.

One aiohttp server answers what discord.py calls under `/api/v10` (login,
application info, `/gateway/bot`, command sync, channel messages, typing,
interaction callbacks, webhook follow-ups, DMs) and speaks the gateway
protocol on `/gateway`: HELLO, IDENTIFY -> READY + GUILD_CREATE (per shard),
HEARTBEAT -> ACK. Tests inject MESSAGE_CREATE and INTERACTION_CREATE events
with `dispatch` and read what the bot did from `requests`.

Like Discord, it echoes the bot's own messages back as MESSAGE_CREATE, and it
can rate-limit message posts (429 with `retry_after`), reject the token, or
close the gateway with a code (4014: disallowed intents).
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
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

T = TypeVar("T")
DISCORD_EPOCH_MS = 1420070400000
NOW = datetime.now(UTC).isoformat()


def _user(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "global_name": name.title(),
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON with exactly `application/json` (discord.py reads nothing else as JSON)."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


_BUCKET_HEADERS = {
    "X-RateLimit-Limit": "5",
    "X-RateLimit-Remaining": "4",
    "X-RateLimit-Reset-After": "1.000",
    "X-RateLimit-Bucket": "fake-message-bucket",
}


@dataclass
class Recorded:
    """One REST request the bot made."""

    method: str
    path: str
    query: dict[str, str]
    json: Any = None
    files: list[tuple[str, bytes]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    #: When it reached the server, counted from 0 (requests are listed when answered).
    arrival: int = 0


class FakeDiscord:
    """`api_base` and `gateway_url` go into `[discord]`; the rest is for asserts."""

    def __init__(
        self,
        *,
        token: str = "fake-token",
        shards: int = 1,
        rate_limit_posts: int = 0,
        gateway_close_code: int | None = None,
        announce_gateway: bool = True,
    ) -> None:
        self.token = token
        self.shards = shards
        self.rate_limit_posts = rate_limit_posts
        self.gateway_close_code = gateway_close_code
        self.announce_gateway = announce_gateway
        #: Channels where posting answers 403 Missing Permissions.
        self.forbidden_channels: set[int] = set()
        #: Message posts (counted from 1) that are answered 429 once.
        self.rate_limit_post_numbers: set[int] = set()

        self._posts = 0
        self._ids = itertools.count(1)
        self._arrivals = itertools.count()
        self.bot = _user(self.snowflake(), "aigc", bot=True)
        self.human = _user(self.snowflake(), "alice")
        self.other_bot = _user(self.snowflake(), "otherbot", bot=True)
        self.app_id = self.snowflake()
        self.guild_id = self.snowflake()
        self.bot_role_id = self.snowflake()
        self.channel_id = self.snowflake()  # general
        self.other_channel_id = self.snowflake()  # random
        self.third_channel_id = self.snowflake()  # off-topic
        self.thread_id = self.snowflake()  # a thread in general
        self.dm_channel_id = self.snowflake()
        self.requests: list[Recorded] = []
        self.unknown: list[str] = []
        self.identified: list[dict[str, Any]] = []
        self.sessions: dict[int, web.WebSocketResponse] = {}
        self._sequence: dict[int, int] = {}
        self._messages: dict[int, dict[str, Any]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifetime ------------------------------------------------------------------

    async def start(self, port: int = 0) -> FakeDiscord:
        """Listen on `port` (0: any free one)."""
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for ws in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- helpers for tests ---------------------------------------------------------

    def snowflake(self) -> int:
        """Unique, increasing, with a plausible creation time."""
        millis = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (millis << 22) + next(self._ids)

    def shard_of(self, guild_id: int | None) -> int:
        return 0 if guild_id is None else (guild_id >> 22) % self.shards

    def posts(self, channel_id: int | None = None) -> list[Recorded]:
        """Messages the bot posted, to one channel or anywhere, in the order they arrived."""
        pattern = re.compile(r"/channels/(\d+)/messages$")
        found = []
        for request in self.requests:
            match = pattern.fullmatch(request.path)
            if request.method == "POST" and match and request.json is not None:
                if channel_id is None or int(match[1]) == channel_id:
                    found.append(request)
        return sorted(found, key=lambda request: request.arrival)

    def calls(self, method: str, pattern: str) -> list[Recorded]:
        regex = re.compile(pattern)
        return [r for r in self.requests if r.method == method and regex.fullmatch(r.path)]

    async def wait_for(self, probe: Callable[[], T], within_s: float = 15.0) -> T:
        """Poll `probe` until it returns something truthy."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            value = probe()
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting; requests so far: {self.summary()}")
            await asyncio.sleep(0.02)

    def summary(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    async def dispatch(self, event: str, data: dict[str, Any], shard: int = 0) -> None:
        ws = self.sessions[shard]
        self._sequence[shard] = self._sequence.get(shard, 0) + 1
        await ws.send_json({"op": 0, "t": event, "s": self._sequence[shard], "d": data})

    def member(self, user: dict[str, Any], roles: list[str] | None = None) -> dict[str, Any]:
        return {
            "user": user,
            "roles": roles or [],
            "joined_at": NOW,
            "deaf": False,
            "mute": False,
            "flags": 0,
        }

    async def user_message(
        self,
        content: str,
        *,
        channel_id: int | None = None,
        dm: bool = False,
        author: dict[str, Any] | None = None,
        mention_bot: bool = False,
        reply_to: dict[str, Any] | None = None,
        mention_everyone: bool = False,
        mention_bot_role: bool = False,
    ) -> dict[str, Any]:
        """Send MESSAGE_CREATE as if a person wrote `content`; returns the payload."""
        author = author or self.human
        channel = self.dm_channel_id if dm else (channel_id or self.channel_id)
        message: dict[str, Any] = {
            "id": str(self.snowflake()),
            "channel_id": str(channel),
            "author": author,
            "content": content,
            "timestamp": NOW,
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": mention_everyone,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "flags": 0,
            "type": 0,
        }
        if not dm:
            message["guild_id"] = str(self.guild_id)
            message["member"] = {k: v for k, v in self.member(author).items() if k != "user"}
        if mention_bot:
            message["mentions"].append({**self.bot, "member": self.member(self.bot)})
        if mention_bot_role:
            message["mention_roles"].append(str(self.bot_role_id))
        if reply_to is not None:
            message["type"] = 19
            message["message_reference"] = {
                "type": 0,
                "message_id": reply_to["id"],
                "channel_id": reply_to["channel_id"],
                **({"guild_id": str(self.guild_id)} if not dm else {}),
            }
            message["referenced_message"] = reply_to
        await self.dispatch("MESSAGE_CREATE", message, self.shard_of(None if dm else self.guild_id))
        return message

    async def slash_command(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        dm: bool = False,
        channel_id: int | None = None,
    ) -> dict[str, Any]:
        """Send INTERACTION_CREATE for `/name` with string/int options."""
        kinds = {str: 3, int: 4, bool: 5, float: 10}
        data: dict[str, Any] = {
            "id": str(self.snowflake()),
            "name": name,
            "type": 1,
            "options": [
                {"name": key, "type": kinds[type(value)], "value": value}
                for key, value in (options or {}).items()
            ],
        }
        channel = self.dm_channel_id if dm else (channel_id or self.channel_id)
        interaction: dict[str, Any] = {
            "id": str(self.snowflake()),
            "application_id": str(self.app_id),
            "type": 2,
            "data": data,
            "channel_id": str(channel),
            "channel": {"id": str(channel), "type": 1 if dm else 0},
            "token": f"interaction-token-{self.snowflake()}",
            "version": 1,
            "locale": "en-US",
            "app_permissions": "2147483647",
            "entitlements": [],
            "attachment_size_limit": 8 * 1024 * 1024,
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 1 if dm else 0,
        }
        if dm:
            interaction["user"] = self.human
        else:
            interaction["guild_id"] = str(self.guild_id)
            interaction["guild_locale"] = "en-US"
            interaction["member"] = {**self.member(self.human), "permissions": "2147483647"}
        await self.dispatch(
            "INTERACTION_CREATE", interaction, self.shard_of(None if dm else self.guild_id)
        )
        return interaction

    # -- gateway -------------------------------------------------------------------

    def _guild(self) -> dict[str, Any]:
        def text_channel(channel_id: int, name: str, position: int) -> dict[str, Any]:
            return {
                "id": str(channel_id),
                "type": 0,
                "name": name,
                "position": position,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "topic": None,
                "last_message_id": None,
                "rate_limit_per_user": 0,
            }

        role = {"color": 0, "hoist": False, "position": 0, "mentionable": False, "flags": 0}
        return {
            "id": str(self.guild_id),
            "name": "Test Guild",
            "icon": None,
            "owner_id": self.human["id"],
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "features": [],
            "emojis": [],
            "stickers": [],
            "roles": [
                {
                    **role,
                    "id": str(self.guild_id),
                    "name": "@everyone",
                    "permissions": "274877975552",
                    "managed": False,
                },
                {
                    **role,
                    "id": str(self.bot_role_id),
                    "name": "aigc",
                    "position": 1,
                    "permissions": "274877975552",
                    "managed": True,
                    "tags": {"bot_id": self.bot["id"]},
                },
            ],
            "joined_at": NOW,
            "large": False,
            "unavailable": False,
            "member_count": 2,
            "members": [self.member(self.bot, [str(self.bot_role_id)]), self.member(self.human)],
            "channels": [
                text_channel(self.channel_id, "general", 0),
                text_channel(self.other_channel_id, "random", 1),
                text_channel(self.third_channel_id, "off-topic", 2),
            ],
            "threads": [
                {
                    "id": str(self.thread_id),
                    "type": 11,
                    "name": "a thread",
                    "guild_id": str(self.guild_id),
                    "parent_id": str(self.channel_id),
                    "owner_id": self.human["id"],
                    "last_message_id": None,
                    "rate_limit_per_user": 0,
                    "message_count": 0,
                    "member_count": 1,
                    "flags": 0,
                    "thread_metadata": {
                        "archived": False,
                        "auto_archive_duration": 1440,
                        "archive_timestamp": NOW,
                        "locked": False,
                    },
                }
            ],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    async def _identify(self, ws: web.WebSocketResponse, payload: dict[str, Any]) -> None:
        if payload.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        self.identified.append(payload)
        if self.gateway_close_code is not None:
            await ws.close(code=self.gateway_close_code, message=b"Disallowed intent(s).")
            return
        shard_id, count = payload.get("shard", [0, 1])
        self.sessions[shard_id] = ws
        guild_here = self.shard_of(self.guild_id) == shard_id
        ready = {
            "v": 10,
            "user": self.bot,
            "guilds": [{"id": str(self.guild_id), "unavailable": True}] if guild_here else [],
            "session_id": f"session-{shard_id}-{self.snowflake()}",
            "resume_gateway_url": self.gateway_url,
            "shard": [shard_id, count],
            "application": {"id": str(self.app_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
        }
        await self.dispatch("READY", ready, shard_id)
        if guild_here:
            await self.dispatch("GUILD_CREATE", self._guild(), shard_id)

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        async for frame in ws:
            if frame.type is not WSMsgType.TEXT:
                continue
            message = json.loads(frame.data)
            if message["op"] == 1:
                await ws.send_json({"op": 11, "d": None})
            elif message["op"] == 2:
                await self._identify(ws, message["d"])
            elif message["op"] == 6:  # RESUME: start over
                await ws.send_json({"op": 9, "d": False})
        for shard, session in list(self.sessions.items()):
            if session is ws:
                del self.sessions[shard]
        return ws

    # -- REST ----------------------------------------------------------------------

    def _bot_message(self, channel_id: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": str(self.snowflake()),
            "channel_id": channel_id,
            "author": self.bot,
            "content": body.get("content") or "",
            "timestamp": NOW,
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "flags": body.get("flags", 0) or 0,
            "type": 19 if body.get("message_reference") else 0,
            **extra,
        }
        if body.get("message_reference"):
            message["message_reference"] = body["message_reference"]
        if int(channel_id) != self.dm_channel_id and "webhook_id" not in extra:
            message["guild_id"] = str(self.guild_id)
            message["member"] = {k: v for k, v in self.member(self.bot).items() if k != "user"}
        self._messages[int(message["id"])] = message
        return message

    async def _read_body(self, request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            files = [
                (part.filename, part.file.read())
                for key, part in form.items()
                if key.startswith("files[") and hasattr(part, "file")
            ]
            payload = form.get("payload_json")
            return (json.loads(payload) if isinstance(payload, str) else None), files
        raw = await request.read()
        return (json.loads(raw) if raw else None), []

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body, files = await self._read_body(request)
        recorded = Recorded(
            request.method,
            path,
            dict(request.query),
            body,
            files,
            dict(request.headers),
            next(self._arrivals),
        )
        authorized = request.headers.get("Authorization") == f"Bot {self.token}"
        webhook_call = path.startswith(("/interactions/", "/webhooks/"))
        if not authorized and not webhook_call:
            self.requests.append(recorded)
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        if request.method == "POST" and (post := re.fullmatch(r"/channels/(\d+)/messages", path)):
            if int(post[1]) in self.forbidden_channels:
                self.requests.append(recorded)
                return _json({"message": "Missing Permissions", "code": 50013}, status=403)
            self._posts += 1
            limited = self._posts in self.rate_limit_post_numbers
            self.rate_limit_post_numbers.discard(self._posts)
            if self.rate_limit_posts > 0 or limited:
                self.rate_limit_posts = max(0, self.rate_limit_posts - 1)
                recorded.path += " (429)"
                self.requests.append(recorded)
                return _json(
                    {"message": "You are being rate limited.", "retry_after": 0.3, "global": False},
                    status=429,
                    headers={"Via": "1.1 google", "Retry-After": "1", "X-RateLimit-Scope": "user"},
                )
        self.requests.append(recorded)
        response = self._route(request.method, path, body, dict(request.query))
        if response is None:
            self.unknown.append(f"{request.method} {path}")
            return _json({"message": "404: Not Found", "code": 0}, status=404)
        if isinstance(response, web.StreamResponse):
            return response
        message = response.pop("__echo__", None) if isinstance(response, dict) else None
        if message is not None:
            guild = None if int(message["channel_id"]) == self.dm_channel_id else self.guild_id
            asyncio.get_running_loop().create_task(
                self.dispatch("MESSAGE_CREATE", message, self.shard_of(guild))
            )
        # Like Discord: message posts name their bucket and what is left of it,
        # so discord.py sends several at once while the bucket allows.
        limits = _BUCKET_HEADERS if request.method == "POST" and "/messages" in path else None
        return _json(response, headers=limits)

    def _route(self, method: str, path: str, body: Any, query: dict[str, str]) -> Any:
        if method == "GET" and path == "/users/@me":
            return self.bot
        if method == "GET" and path == "/oauth2/applications/@me":
            return {
                "id": str(self.app_id),
                "name": "aigc",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.human,
                "verify_key": "0" * 64,
                "flags": 0,
                "team": None,
            }
        if method == "GET" and path == "/gateway/bot":
            url = self.gateway_url if self.announce_gateway else "ws://127.0.0.1:9/not-here"
            limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
            return {"url": url, "shards": self.shards, "session_start_limit": limit}
        if method == "PUT" and re.fullmatch(r"/applications/\d+(/guilds/\d+)?/commands", path):
            guild = re.search(r"/guilds/(\d+)/", path)
            return [
                {
                    "type": 1,
                    "options": [],
                    **command,
                    "id": str(self.snowflake()),
                    "application_id": str(self.app_id),
                    "version": "1",
                    **({"guild_id": guild[1]} if guild else {}),
                }
                for command in body
            ]
        if method == "POST" and (match := re.fullmatch(r"/channels/(\d+)/messages", path)):
            message = self._bot_message(match[1], body)
            return {**message, "__echo__": message}
        if method == "PATCH" and (match := re.fullmatch(r"/channels/(\d+)/messages/(\d+)", path)):
            message = self._messages.setdefault(int(match[2]), self._bot_message(match[1], {}))
            message.update(content=body.get("content", message["content"]), edited_timestamp=NOW)
            return message
        if method == "POST" and re.fullmatch(r"/channels/\d+/typing", path):
            return web.Response(status=204)
        if method == "POST" and path == "/users/@me/channels":
            return {
                "id": str(self.dm_channel_id),
                "type": 1,
                "recipients": [self.human],
                "last_message_id": None,
            }
        if method == "POST" and (
            match := re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path)
        ):
            return {
                "interaction": {
                    "id": match[1],
                    "type": 2,
                    "response_message_loading": body["type"] == 5,
                    "response_message_ephemeral": bool(
                        (body.get("data") or {}).get("flags", 0) & 64
                    ),
                },
                "resource": {"type": body["type"]},
            }
        if method == "POST" and (match := re.fullmatch(r"/webhooks/(\d+)/([^/]+)", path)):
            return self._bot_message(
                str(self.channel_id), body, webhook_id=match[1], application_id=match[1]
            )
        if method == "PATCH" and (
            match := re.fullmatch(r"/webhooks/(\d+)/([^/]+)/messages/(\w+)", path)
        ):
            message = self._bot_message(str(self.channel_id), body, webhook_id=match[1])
            return message
        if method == "DELETE" and re.fullmatch(r"/webhooks/\d+/[^/]+/messages/@original", path):
            return web.Response(status=204)
        return None
