"""`[bot]`, `[storage]` and `[limits]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from bot.config.section import Section, platform_ids


class BotSection(Section):
    name: str = "aigc-bot"
    history_scope: Literal["user", "chat"] = "user"
    group_messages: Literal["addressed", "all"] = "addressed"
    data_dir: Path = Path("data")
    max_input_chars: Annotated[int, Field(gt=0)] = 2000
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 10.0
    welcome: str = "Hi! I'm a chat bot. Talk to me, or type /help to see what I can do."
    #: Per chat, another history_scope: {"telegram:-1001234" = "chat"}.
    chat_history_scope: dict[str, Literal["user", "chat"]] = Field(default_factory=dict)
    #: People who may use the admin commands, as "<platform>:<user id>".
    admins: list[str] = Field(default_factory=list)

    _admins = field_validator("admins", mode="before")(platform_ids)

    @field_validator("chat_history_scope", mode="before")
    @classmethod
    def _chat_keys(cls, value: object) -> object:
        if isinstance(value, dict):
            platform_ids(list(value))
        return value

    def scope_for(self, platform: str, chat_id: str) -> Literal["user", "chat"]:
        """The history scope of one chat: its override, else `history_scope`."""
        return self.chat_history_scope.get(f"{platform}:{chat_id}", self.history_scope)


class StorageSection(Section):
    url: str = "sqlite+aiosqlite:///data/bot.db"
    busy_timeout_ms: Annotated[int, Field(ge=0)] = 5000
    echo: bool = False
    #: Conversations whose newest turns are kept in memory between messages
    #: (least recently used first out); 0 = read them from the database every time.
    history_cache: Annotated[int, Field(ge=0)] = 1000
    #: Redis for events between processes (pub/sub); "" = PostgreSQL LISTEN/NOTIFY
    #: on PostgreSQL, in-process on SQLite.
    redis_url: str = ""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError('must start with redis://, rediss:// or unix:// (or be "")')
        return value

    @field_validator("url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value


class LimitsSection(Section):
    """Per-user, per-chat and global budgets; 0 means no limit. Daily ones
    reset at midnight UTC and are counted in the database."""

    messages_per_minute: Annotated[int, Field(ge=0)] = 20
    draws_per_hour: Annotated[int, Field(ge=0)] = 10
    messages_per_day: Annotated[int, Field(ge=0)] = 0
    tokens_per_day: Annotated[int, Field(ge=0)] = 0
    draws_per_day: Annotated[int, Field(ge=0)] = 0
    chat_messages_per_minute: Annotated[int, Field(ge=0)] = 0
    global_tokens_per_day: Annotated[int, Field(ge=0)] = 0
