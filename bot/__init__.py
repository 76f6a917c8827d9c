"""aigc-bot core: configuration, the conversation manager and the engines.

Nothing in this package imports a chat-platform SDK; adapters depend on it,
never the other way round.
"""

__version__ = "0.1.0"
