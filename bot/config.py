"""Configuration: `config.toml` validated by pydantic, overridden by env vars.

Every key has a default, so an empty file is a valid config. Any key can be
overridden with `AIGC_BOT__SECTION__KEY=value`. Secrets are never config
values: a section names the env var that holds its token (`token_env`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

ENV_PREFIX = "AIGC_BOT__"
CONFIG_ENV = "AIGC_BOT_CONFIG"
DEFAULT_CONFIG_PATH = Path("config.toml")


class ConfigError(Exception):
    """A config that cannot be used; the message is one line for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class BotSection(Section):
    name: str = "aigc-bot"
    history_scope: Literal["user", "chat"] = "user"
    group_messages: Literal["addressed", "all"] = "addressed"
    data_dir: Path = Path("data")
    max_input_chars: Annotated[int, Field(gt=0)] = 2000
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 10.0
    welcome: str = "Hi! I'm a chat bot. Talk to me, or type /help to see what I can do."


class StorageSection(Section):
    url: str = "sqlite+aiosqlite:///data/bot.db"
    busy_timeout_ms: Annotated[int, Field(ge=0)] = 5000
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value


class TextSection(Section):
    engine: Literal["local", "remote"] = "local"
    model: str = "models/chitchat-gpt2"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantize: Literal["none", "int8"] = "none"
    max_new_tokens: Annotated[int, Field(gt=0, le=1024)] = 48
    max_history_tokens: Annotated[int, Field(gt=0)] = 256
    temperature: Annotated[float, Field(gt=0)] = 0.8
    top_k: Annotated[int, Field(ge=0)] = 40
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.9
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.2
    greedy: bool = False
    stream_interval_ms: Annotated[float, Field(ge=0)] = 150.0
    threads: Annotated[int, Field(ge=0)] = 0
    max_batch_size: Annotated[int, Field(gt=0)] = 32
    batch_wait_ms: Annotated[float, Field(ge=0)] = 10.0
    kv_cache_mb: Annotated[int, Field(ge=0)] = 256
    fallback_reply: str = "Sorry, I have nothing to say to that. Could you put it another way?"
    remote_url: str = "http://127.0.0.1:8000/v1"
    remote_model: str = ""
    api_key_env: str = "AIGC_BOT_TEXT_API_KEY"
    request_timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("fallback_reply")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class DrawSection(Section):
    enabled: bool = True
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    load: Literal["lazy", "start"] = "lazy"
    attention_slicing: bool = False
    cpu_offload: bool = False
    default_steps: Annotated[int, Field(gt=0)] = 25
    max_steps: Annotated[int, Field(gt=0)] = 50
    default_width: Annotated[int, Field(gt=0)] = 512
    default_height: Annotated[int, Field(gt=0)] = 512
    max_width: Annotated[int, Field(gt=0)] = 768
    max_height: Annotated[int, Field(gt=0)] = 768
    guidance: Annotated[float, Field(ge=0, le=30)] = 7.5
    max_queue: Annotated[int, Field(gt=0)] = 16
    progress_every_s: Annotated[float, Field(ge=0)] = 2.0
    retry_load_after_s: Annotated[float, Field(ge=0)] = 60.0

    @field_validator("default_width", "default_height", "max_width", "max_height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8 or value < 64:
            raise ValueError("must be a multiple of 8, at least 64")
        return value

    @field_validator("max_steps", "max_width", "max_height")
    @classmethod
    def _not_below_default(cls, value: int, info: ValidationInfo) -> int:
        default = info.data.get(str(info.field_name).replace("max_", "default_"))
        if default is not None and value < default:
            name = str(info.field_name).replace("max_", "default_")
            raise ValueError(f"must be >= draw.{name} ({default})")
        return value


class LimitsSection(Section):
    messages_per_minute: Annotated[int, Field(ge=0)] = 20
    draws_per_hour: Annotated[int, Field(ge=0)] = 10


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


class Config(Section):
    bot: BotSection = Field(default_factory=BotSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    text: TextSection = Field(default_factory=TextSection)
    draw: DrawSection = Field(default_factory=DrawSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    web: WebSection = Field(default_factory=WebSection)
    telegram: TelegramSection = Field(default_factory=TelegramSection)
    discord: DiscordSection = Field(default_factory=DiscordSection)

    def resolve_path(self, path: Path) -> Path:
        """Relative data paths are relative to the working directory."""
        return path if path.is_absolute() else Path.cwd() / path


def read_secret(env_name: str) -> SecretStr | None:
    """The value of the env var a section names, as a secret that never prints."""
    value = os.environ.get(env_name, "").strip() if env_name else ""
    if not value:
        return None
    from bot.logging_setup import register_secret

    register_secret(value)
    return SecretStr(value)


def _parse_env_value(raw: str) -> Any:
    """JSON when it parses (numbers, booleans, lists), else the plain string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{name}: expected {ENV_PREFIX}SECTION__KEY")
        section, key = parts
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section} must be a table")
        target[key] = _parse_env_value(raw)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key} is not a known key"
    if kind == "missing":
        return f"{key} is required"
    for prefix in ("Input should be ", "Value error, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    replacements = {
        "greater than or equal to ": ">= ",
        "less than or equal to ": "<= ",
        "greater than ": "> ",
        "less than ": "< ",
    }
    for long, short in replacements.items():
        message = message.replace(long, short)
    if not message.startswith("must "):
        message = f"must be {message}"
    return f"{key} {message} (got {error.get('input')!r})"


def config_path(explicit: str | Path | None = None, environ: dict[str, str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = (os.environ if environ is None else environ).get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read, override and validate the config; raise `ConfigError` with one line."""
    environ = dict(os.environ if environ is None else environ)
    resolved = config_path(path, environ)
    data: dict[str, Any] = {}
    if resolved.exists():
        try:
            data = tomllib.loads(resolved.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{resolved}: not valid TOML ({exc})") from None
        except OSError as exc:
            raise ConfigError(f"{resolved}: cannot be read ({exc.strerror})") from None
    elif path is not None or CONFIG_ENV in environ:
        raise ConfigError(f"{resolved}: no such config file")
    _apply_env_overrides(data, environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(_describe(first) + suffix) from None
