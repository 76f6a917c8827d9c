"""Configuration: `config.toml` validated by pydantic, overridden by env vars.

Every key has a default, so an empty file is a valid config. Any key can be
overridden with `AIGC_BOT__SECTION__KEY=value`. Secrets are never config
values: a section names the env var that holds its token (`token_env`).
One module per family of sections; `loading` reads and validates.
"""

from bot.config.core import BotSection, LimitsSection, StorageSection
from bot.config.engines import DrawSection, TextSection
from bot.config.governance import AccessSection, ModerationSection
from bot.config.handoff import HandoffSection
from bot.config.knowledge import KnowledgeSection
from bot.config.loading import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    ConfigError,
    config_path,
    load_config,
    read_secret,
)
from bot.config.platforms import DiscordSection, TelegramSection, WebSection
from bot.config.root import Config
from bot.config.section import Section

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "AccessSection",
    "BotSection",
    "Config",
    "ConfigError",
    "DiscordSection",
    "DrawSection",
    "HandoffSection",
    "KnowledgeSection",
    "LimitsSection",
    "ModerationSection",
    "Section",
    "StorageSection",
    "TelegramSection",
    "TextSection",
    "WebSection",
    "config_path",
    "load_config",
    "read_secret",
]
