"""Reading `config.toml`, applying `AIGC_BOT__SECTION__KEY` overrides, and
validating it into one-line errors; reading secrets from the environment."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from bot.config.root import Config

ENV_PREFIX = "AIGC_BOT__"
CONFIG_ENV = "AIGC_BOT_CONFIG"
DEFAULT_CONFIG_PATH = Path("config.toml")


class ConfigError(Exception):
    """A config that cannot be used; the message is one line for the user."""


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
    except (ValueError, RecursionError):
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
    key = ".".join(
        str(part) if str(part).isidentifier() else repr(str(part)) for part in error["loc"]
    )
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
        except RecursionError:
            raise ConfigError(f"{resolved}: not valid TOML (nested too deeply)") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{resolved}: not valid TOML (not UTF-8 at byte {exc.start})"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{resolved}: cannot be read ({exc.strerror})") from None
    elif path is not None or CONFIG_ENV in environ:
        raise ConfigError(f"{resolved}: no such config file")
    _apply_env_overrides(data, environ)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(_describe(dict(first)) + suffix) from None
    _register_url_password(config.storage.url)
    return config.with_source_dir(resolved.resolve().parent if resolved.exists() else Path.cwd())


def _register_url_password(url: str) -> None:
    """A password in `[storage] url` is a secret too: redacted wherever it shows up."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from bot.logging_setup import register_secret

    try:
        password = make_url(url).password
    except ArgumentError:
        return
    if password:
        register_secret(str(password))
