"""The Telegram channel (python-telegram-bot): lifetime and updates in
`channel`, which messages are for the bot in `inbound`, pacing and rendering
in `outbound`."""

from adapters.telegram.channel import TelegramChannel

__all__ = ["TelegramChannel"]
