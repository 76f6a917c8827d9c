"""`[web]`, `[telegram]` and `[discord]`."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from bot.config.section import Section


class WebSection(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    allowed_origins: list[str] = Field(default_factory=list)
    max_body_bytes: Annotated[int, Field(gt=0)] = 64 * 1024
    sessions_per_minute: Annotated[int, Field(ge=0)] = 10
    public_url: str = ""
    trusted_proxies: list[str] = Field(default_factory=list)
    demo_page: bool = True

    @field_validator("trusted_proxies")
    @classmethod
    def _ip_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    'must be IP addresses or networks, e.g. ["127.0.0.1", "10.0.0.0/8"]'
                ) from None
        return [entry.strip() for entry in value]


class TelegramSection(Section):
    enabled: bool = True
    token_env: str = "TELEGRAM_BOT_TOKEN"
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str = ""
    webhook_listen: str = "0.0.0.0"
    webhook_port: Annotated[int, Field(ge=0, le=65535)] = 8443
    webhook_secret_env: str = "TELEGRAM_WEBHOOK_SECRET"
    poll_interval_s: Annotated[float, Field(ge=0)] = 0.0
    edited_messages: Literal["ignore", "answer"] = "ignore"
    #: In groups, a message starting with one of these is for the bot too, e.g. ["bot,"].
    keywords: list[str] = Field(default_factory=list)


class DiscordSection(Section):
    enabled: bool = True
    token_env: str = "DISCORD_BOT_TOKEN"
    api_base_url: str = "https://discord.com/api/v10"
    gateway_url: str = ""
    shard_count: int | Literal["auto"] = "auto"
    respond_to: Literal["mention", "all"] = "mention"
    channels: list[str] = Field(default_factory=list)
    channel_respond_to: dict[str, Literal["mention", "all"]] = Field(default_factory=dict)
    command_guild_id: str = ""
    #: In guild channels, a message starting with one of these is for the bot too.
    keywords: list[str] = Field(default_factory=list)

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_ids(cls, value: Any) -> Any:
        if isinstance(value, list):
            value = [str(item) if isinstance(item, int) else item for item in value]
            if not all(isinstance(item, str) and item.isdigit() for item in value):
                raise ValueError("must be a list of channel ids (digits)")
        return value

    @field_validator("channel_respond_to")
    @classmethod
    def _channel_keys(cls, value: dict[str, str]) -> dict[str, str]:
        if not all(key.isdigit() for key in value):
            raise ValueError('must map channel ids (digits) to "mention" or "all"')
        return value

    @field_validator("command_guild_id", mode="before")
    @classmethod
    def _guild_id(cls, value: Any) -> Any:
        value = str(value) if isinstance(value, int) else value
        if isinstance(value, str) and value and not value.isdigit():
            raise ValueError('must be a guild id (digits) or ""')
        return value

    @field_validator("shard_count")
    @classmethod
    def _shards(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError('must be "auto" or a number >= 1')
        return value

    @field_validator("api_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("gateway_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        if value and not value.startswith(("ws://", "wss://")):
            raise ValueError('must start with ws:// or wss:// (or be "")')
        return value
