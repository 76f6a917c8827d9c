"""The visitor's address, also behind a reverse proxy.

Behind nginx or a load balancer every request comes from the proxy, so a
per-address limit would count all visitors as one. The proxy names the real
client in `X-Forwarded-For`, but anyone can send that header: it is believed
only when the direct peer is a proxy listed in `web.trusted_proxies`, and only
as far as the chain of trusted proxies goes. Walking the list from the right,
the first address that is not a trusted proxy is the client (the rule of
Werkzeug's ProxyFix and uvicorn's `forwarded_allow_ips`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

__all__ = ["ClientAddress"]

UNKNOWN = "unknown"


class ClientAddress:
    """`resolve(request)` → the address to count a visitor under."""

    def __init__(self, trusted_proxies: Sequence[str] = ()) -> None:
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in trusted_proxies]

    def is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def resolve(self, request: Any) -> str:
        peer = str(request.remote or UNKNOWN)
        if not self.networks or not self.is_trusted(peer):
            return peer
        hops: list[str] = [
            str(hop).strip()
            for header in request.headers.getall("X-Forwarded-For", [])
            for hop in header.split(",")
            if hop.strip()
        ]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop
        # every hop is a trusted proxy: the leftmost is the nearest to the client
        return str(hops[0]) if hops else peer
