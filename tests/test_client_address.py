"""Whose address a web request is counted under, with and without trusted proxies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from multidict import CIMultiDict

from adapters.web.client_address import ClientAddress


def request(peer: str | None, *forwarded: str) -> SimpleNamespace:
    headers: CIMultiDict[str] = CIMultiDict()
    for value in forwarded:
        headers.add("X-Forwarded-For", value)
    return SimpleNamespace(remote=peer, headers=headers)


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert ClientAddress().resolve(request("198.51.100.7", "203.0.113.5")) == "198.51.100.7"
    assert ClientAddress().resolve(request(None)) == "unknown"


def test_an_untrusted_peer_cannot_claim_another_address() -> None:
    resolve = ClientAddress(["10.0.0.0/8"]).resolve
    assert resolve(request("198.51.100.7", "203.0.113.5")) == "198.51.100.7"


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        (["203.0.113.5"], "203.0.113.5"),
        # a visitor's own header is kept left of what the proxy appends
        (["1.2.3.4, 203.0.113.5"], "203.0.113.5"),
        # two trusted proxies in a chain, header split over two lines
        (["1.2.3.4, 203.0.113.5", "10.1.2.3"], "203.0.113.5"),
        (["10.9.9.9, 10.1.2.3"], "10.9.9.9"),  # nothing but proxies: the farthest
        ([], "10.0.0.1"),  # no header: the proxy itself
        (["2001:db8::1"], "2001:db8::1"),
    ],
)
def test_behind_trusted_proxies_the_nearest_untrusted_hop_is_the_client(
    forwarded: list[str], client: str
) -> None:
    assert ClientAddress(["10.0.0.0/8"]).resolve(request("10.0.0.1", *forwarded)) == client


def test_ipv4_mapped_and_ipv6_peers_match_their_networks() -> None:
    resolve = ClientAddress(["127.0.0.1", "::1"]).resolve
    assert resolve(request("::ffff:127.0.0.1", "203.0.113.5")) == "203.0.113.5"
    assert resolve(request("::1", "203.0.113.6")) == "203.0.113.6"
