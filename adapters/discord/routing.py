"""Where one Discord client sends its REST calls and opens its gateway.

discord.py builds every REST URL from the class attribute `Route.BASE` and
connects the gateway to `DiscordWebSocket.DEFAULT_GATEWAY` (or, when it
shards automatically, to the URL `GET /gateway/bot` announces). Changing those
class attributes would move every client in the process, so each client is
routed on its own instead:

* REST: the client's `HTTPClient.request` rewrites the URL of each route from
  `Route.BASE` to `[discord] api_base_url` (e.g. a nirn-proxy).
* Interaction callbacks and follow-ups go through discord.py's webhook adapter,
  which the library takes from the `async_context` ContextVar; the channel sets
  a rebasing adapter in the task that runs its client, and every task the
  client spawns (gateway readers, event handlers, slash commands) inherits it.
* Gateway: the client's `HTTPClient.ws_connect` replaces the host and path of
  the URL it is asked to open with `[discord] gateway_url` when that is set,
  else with the URL announced by `GET /gateway/bot` (through the same
  api_base_url) when discord.py would use its built-in default; the query
  (API version, encoding, compression) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import HTTPClient, Route
from discord.webhook.async_ import AsyncWebhookAdapter

DEFAULT_API_BASE = Route.BASE
DEFAULT_GATEWAY = DiscordWebSocket.DEFAULT_GATEWAY


@dataclass
class Endpoints:
    """The REST base and the gateway one client uses."""

    api_base: str = DEFAULT_API_BASE
    #: `[discord] gateway_url`: every gateway connection goes here when set.
    gateway_override: str = ""
    #: What `GET /gateway/bot` announced; replaces discord.py's default only.
    gateway_announced: str = ""

    def __post_init__(self) -> None:
        self.api_base = self.api_base.rstrip("/")

    @property
    def rebased(self) -> bool:
        return self.api_base != DEFAULT_API_BASE

    def rest(self, url: str) -> str:
        if self.rebased and url.startswith(DEFAULT_API_BASE):
            return self.api_base + url[len(DEFAULT_API_BASE) :]
        return url

    def gateway(self, url: str) -> str:
        requested = yarl.URL(url)
        if self.gateway_override:
            target = yarl.URL(self.gateway_override)
        elif self.gateway_announced and requested.host == DEFAULT_GATEWAY.host:
            target = yarl.URL(self.gateway_announced)
        else:
            return url
        return str(target.with_query({**target.query, **requested.query}))


def route_http(http: HTTPClient, endpoints: Endpoints) -> None:
    """Make this one HTTPClient use `endpoints` (instance attributes, no globals)."""
    request = http.request
    ws_connect = http.ws_connect

    async def routed_request(route: Route, **kwargs: Any) -> Any:
        route.url = endpoints.rest(route.url)
        return await request(route, **kwargs)

    async def routed_ws_connect(url: str, *, compress: int = 0) -> aiohttp.ClientWebSocketResponse:
        return await ws_connect(endpoints.gateway(url), compress=compress)

    http.request = routed_request  # type: ignore[method-assign]
    http.ws_connect = routed_ws_connect  # type: ignore[method-assign]


class RebasedWebhookAdapter(AsyncWebhookAdapter):
    """discord.py's webhook adapter with URLs moved to `endpoints.api_base`."""

    def __init__(self, endpoints: Endpoints) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.endpoints = endpoints

    async def request(self, route: Route, session: aiohttp.ClientSession, **kwargs: Any) -> Any:
        route.url = self.endpoints.rest(route.url)
        return await super().request(route, session, **kwargs)
