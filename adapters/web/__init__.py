"""The web channel: the JSON API, Server-Sent Events and the chat widget."""

from adapters.web.channel import WebChannel
from adapters.web.http import token_hash

__all__ = ["WebChannel", "token_hash"]
