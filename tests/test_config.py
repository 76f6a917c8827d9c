"""Config: defaults, the documented file, env overrides, one-line errors, secrets."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bot.config import Config, ConfigError, load_config, read_secret
from bot.logging_setup import redact

REPO = Path(__file__).resolve().parents[1]


def test_embedded_defaults_match_the_design() -> None:
    config = Config()
    assert config.storage.url == "sqlite+aiosqlite:///data/bot.db"
    assert config.web.host == "127.0.0.1" and config.web.port == 8080
    assert config.bot.history_scope == "user"
    assert config.text.model == "models/chitchat-gpt2"
    assert config.telegram.token_env == "TELEGRAM_BOT_TOKEN"
    assert config.discord.token_env == "DISCORD_BOT_TOKEN"


def test_config_toml_documents_every_key() -> None:
    """Every key of every section is present (and commented) in config.toml."""
    text = (REPO / "config.toml").read_text()
    data = tomllib.loads(text)
    for section, model in Config.model_fields.items():
        fields = model.annotation.model_fields  # type: ignore[union-attr]
        assert set(data[section]) == set(fields), section
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("["):
            assert "#" in line, f"undocumented key: {line}"


def test_shipped_config_equals_the_defaults() -> None:
    assert load_config(REPO / "config.toml", environ={}).model_dump() == Config().model_dump()


def test_env_overrides_any_key(tmp_path: Path) -> None:
    path = tmp_path / "bot.toml"
    path.write_text("[text]\ntemperature = 0.5\n[web]\nport = 9000\n")
    config = load_config(
        path,
        environ={
            "AIGC_BOT__TEXT__TEMPERATURE": "0.7",
            "AIGC_BOT__WEB__ALLOWED_ORIGINS": '["https://shop.example"]',
            "AIGC_BOT__DRAW__ENABLED": "false",
            "AIGC_BOT__BOT__HISTORY_SCOPE": "chat",
        },
    )
    assert config.text.temperature == 0.7
    assert config.web.port == 9000
    assert config.web.allowed_origins == ["https://shop.example"]
    assert config.draw.enabled is False
    assert config.bot.history_scope == "chat"


def test_config_env_var_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('[bot]\nname = "helpdesk"\n')
    assert load_config(environ={"AIGC_BOT_CONFIG": str(path)}).bot.name == "helpdesk"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[text]\ntemperature = -1\n", "text.temperature must be > 0 (got -1)"),
        ('[bot]\nhistory_scope = "everyone"\n', "bot.history_scope must be 'user' or 'chat'"),
        ("[web]\nport = 70000\n", "web.port must be <= 65535 (got 70000)"),
        ("[text]\ntemprature = 1\n", "text.temprature is not a known key"),
        ('[storage]\nurl = "mysql://x"\n', "storage.url must start with sqlite+aiosqlite://"),
        ("[text\n", "not valid TOML"),
        (
            '[web]\ntrusted_proxies = ["nginx"]\n',
            'web.trusted_proxies must be IP addresses or networks, e.g. ["127.0.0.1", '
            "\"10.0.0.0/8\"] (got ['nginx'])",
        ),
    ],
)
def test_bad_values_name_key_value_and_expectation(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml", environ={})


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[text]\ntemperature = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "--config", str(path), "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "aigc-bot: config error: text.temperature must be > 0 (got -1)"
    ]
    assert "Traceback" not in result.stderr


def test_secrets_come_from_the_named_env_var_and_never_print(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_TG_TOKEN", "123456:very-secret-token")
    secret = read_secret("MY_TG_TOKEN")
    assert secret is not None
    assert secret.get_secret_value() == "123456:very-secret-token"
    assert "very-secret" not in repr(secret) and "very-secret" not in str(secret)
    assert redact("GET https://api.telegram.org/bot123456:very-secret-token/getMe") == (
        "GET https://api.telegram.org/bot[REDACTED]/getMe"
    )
    assert read_secret("UNSET_TOKEN_VARIABLE") is None


def test_secret_values_in_the_config_file_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "leaky.toml"
    path.write_text('[telegram]\ntoken = "123:abc"\n')
    with pytest.raises(ConfigError, match=r"telegram\.token is not a known key"):
        load_config(path, environ={})
