"""The Telegram channel (python-telegram-bot): inbound updates in `channel`,
rendering, pacing and delivery order in `outbound`."""

from adapters.telegram.channel import TEXT_ONLY, TelegramChannel

__all__ = ["TEXT_ONLY", "TelegramChannel"]
