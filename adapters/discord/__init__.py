"""The Discord channel (discord.py): the client in `channel`, which messages
are for the bot in `addressing`, slash commands in `commands`, rendering and
delivery order in `outbound`, per-client REST/gateway routing in `routing`."""

from adapters.discord.channel import DiscordChannel

__all__ = ["DiscordChannel"]
