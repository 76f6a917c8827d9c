"""Property tests (hypothesis) for the parsers every message goes through.

* the splitter (adapters.splitting): nothing lost, every part fits, code
  blocks kept whole when they can be;
* the command parser (bot.commands): never raises, round-trips;
* the /draw options (bot.draw.options): only `DrawUsageError`, and what is
  resolved always lies within the config's limits;
* config loading (bot.config): random TOML and env overrides give a `Config`
  or a one-line `ConfigError`, never a traceback.

Runs are deterministic (`derandomize=True`, no example database) and small
enough for CI. Inputs that once broke a property (a splitter that looped, a
/draw number too long for int(), config values that crashed the loader) are
kept as plain tests at the end of each part.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters.splitting import FENCE, split_message
from bot.commands import Command, parse_command
from bot.config import Config, ConfigError, DrawSection, load_config
from bot.draw.options import (
    MAX_GUIDANCE,
    MAX_SEED,
    DrawOptions,
    DrawUsageError,
    parse_draw_args,
    resolve,
)

ROOT = Path(__file__).resolve().parents[1]


def quick(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# -- the splitter --------------------------------------------------------------------

LIMITS = st.integers(16, 160)
_PIECES = st.sampled_from(
    ["\n", "\n\n", " ", "  ", "\t", "word", "a", "é", "😀", "👩‍👩‍👧", "x" * 40, "`", "``"]
)
PROSE = st.lists(st.one_of(_PIECES, st.text(max_size=5)), max_size=60).map("".join)
WITH_FENCES = st.lists(
    st.one_of(_PIECES, st.sampled_from(["```", "```py\n", "\n```\n", "````"])), max_size=60
).map("".join)


def squashed(text: str) -> str:
    """The text without whitespace and backticks: what re-fencing a long code
    block may add to (fences, newlines, a repeated language tag) but never
    take from."""
    return re.sub(r"[\s`]", "", text)


def is_subsequence(short: str, long: str) -> bool:
    rest = iter(long)
    return all(char in rest for char in short)


@quick(250)
@given(st.one_of(PROSE, st.text(max_size=300)), LIMITS)
def test_split_loses_nothing_and_every_part_fits(text: str, limit: int) -> None:
    assume(FENCE not in text)
    parts = split_message(text, limit)
    assert "".join(parts) == text
    assert all(0 < len(part) <= limit for part in parts)


@quick(400)
@given(WITH_FENCES, LIMITS)
def test_split_with_code_fences_loses_nothing_and_adds_only_fences(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(0 < len(part) <= limit for part in parts)
    original, joined = squashed(text), squashed("".join(parts))
    assert is_subsequence(original, joined)
    # at most a language tag (32 characters) more for each re-opened fence
    assert len(joined) - len(original) <= 32 * max(0, len(parts) - 1)


_WORD = st.text(alphabet="abcdé😀", min_size=1, max_size=8)
_PARAGRAPH = st.lists(
    st.tuples(_WORD, st.sampled_from([" ", "\n", "\n\n"])), min_size=1, max_size=30
).map(lambda words: "".join(word + gap for word, gap in words))
_CODE_LINE = st.text(alphabet="xyz =()", max_size=12)
_BLOCK = st.tuples(st.sampled_from(["", "py", "js"]), st.lists(_CODE_LINE, min_size=1, max_size=4))
DOCUMENTS = st.lists(
    st.one_of(
        _PARAGRAPH, _BLOCK.map(lambda block: f"```{block[0]}\n" + "\n".join(block[1]) + "\n```\n")
    ),
    min_size=1,
    max_size=12,
).map("".join)


@quick(300)
@given(DOCUMENTS, st.integers(80, 200))
def test_split_never_cuts_inside_a_code_block_that_fits_in_a_part(text: str, limit: int) -> None:
    """Blocks here are at most ~62 characters, so a cut outside them is always possible."""
    parts = split_message(text, limit)
    assert "".join(parts) == text
    for part in parts:
        assert part.count(FENCE) % 2 == 0, (limit, parts)


_HANG_PROBE = """
import sys
from adapters.splitting import split_message
for text, limit in ((sys.argv[1] + "a" * 3000, 2000), ("```" + "b" * 50 + "\\nxyz " * 30, 16)):
    parts = split_message(text, limit)
    assert all(len(part) <= limit for part in parts)
"""


def test_split_ends_when_a_fence_is_followed_by_a_very_long_line() -> None:
    try:
        result = subprocess.run(
            [sys.executable, "-c", _HANG_PROBE, "echo: ```"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("split_message did not return within 5 s")
    assert result.returncode == 0, result.stderr


# -- the command parser ------------------------------------------------------------

NAMES = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1
)
ARGS = st.text(max_size=80)


@quick(500)
@given(st.text(max_size=200))
def test_the_command_parser_never_raises(text: str) -> None:
    command = parse_command(text)
    if command is None:
        return
    assert text.strip().startswith("/")
    assert re.fullmatch(r"[a-z0-9_]+", command.name)
    assert command.args == command.args.strip()


@quick(500)
@given(NAMES, st.one_of(st.none(), NAMES), ARGS, st.sampled_from([" ", "\n", "\t", "  "]))
def test_commands_round_trip(name: str, bot: str | None, args: str, gap: str) -> None:
    text = f"/{name}" + (f"@{bot}" if bot else "") + (gap + args if args.strip() else "")
    assert parse_command(text) == Command(name.lower(), args.strip(), bot)
    # and a parsed command written out again parses to itself
    parsed = parse_command(text)
    assert parsed is not None
    again = f"/{parsed.name}" + (f" {parsed.args}" if parsed.args else "")
    assert parse_command(again) == Command(parsed.name, parsed.args, None)


@quick(300)
@given(st.text(max_size=100))
def test_text_that_does_not_start_with_a_slash_is_never_a_command(text: str) -> None:
    assume(not text.strip().startswith("/"))
    assert parse_command(text) is None


# -- /draw options --------------------------------------------------------------------

_DRAW_TOKENS = st.one_of(
    st.sampled_from(
        [
            "--seed",
            "--steps",
            "--size",
            "--negative",
            "--guidance",
            "—seed",
            "–steps",
            "--seed=",
            "--size=",
            "--cfg",
            "--n",
            "--neg",
            "--no",
            "--help",
            "--bogus",
            '"',
            "'",
            "“",
            "”",
            "„",
            "‘",
            "’",
            "«",
            "»",
            "512x768",
            "1×1",
            "99999x1",
            "0",
            "-1",
            "+5",
            "1_000",
            "7,5",
            "nan",
            "inf",
            "1e309",
            "٣",
            "𝟗",
            "cat's",
            "\n",
        ]
    ),
    st.text(max_size=6),
    st.integers(-(10**6), 10**30).map(str),
)
DRAW_ARGS = st.one_of(st.lists(_DRAW_TOKENS, max_size=12).map(" ".join), st.text(max_size=80))


@st.composite
def draw_sections(draw: Any) -> DrawSection:
    eights = st.integers(8, 160)
    default_steps = draw(st.integers(1, 100))
    default_width, default_height = draw(eights) * 8, draw(eights) * 8
    return DrawSection(
        default_steps=default_steps,
        max_steps=default_steps + draw(st.integers(0, 100)),
        default_width=default_width,
        default_height=default_height,
        max_width=default_width + draw(st.integers(0, 160)) * 8,
        max_height=default_height + draw(st.integers(0, 160)) * 8,
        guidance=draw(st.floats(0, 30)),
    )


def assert_within_limits(options: DrawOptions, section: DrawSection) -> None:
    chosen = resolve(options, section)
    assert 1 <= chosen.steps <= section.max_steps
    assert 64 <= chosen.width <= section.max_width and chosen.width % 8 == 0
    assert 64 <= chosen.height <= section.max_height and chosen.height % 8 == 0
    assert 0 <= chosen.guidance <= MAX_GUIDANCE
    assert 0 <= chosen.seed <= MAX_SEED
    assert chosen.prompt.strip() and chosen.prompt == " ".join(chosen.prompt.split())


@quick(600)
@given(DRAW_ARGS, draw_sections())
def test_draw_options_raise_only_usage_errors_and_resolve_within_limits(
    args: str, section: DrawSection
) -> None:
    try:
        options = parse_draw_args(args)
    except DrawUsageError as exc:
        assert str(exc).startswith(exc.reason) and "Usage:" in str(exc)
        return
    assert_within_limits(options, section)


_PLAIN = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\"'“”„‘’«»"),
    min_size=1,
    max_size=30,
)


@quick(300)
@given(
    _PLAIN.filter(lambda text: bool(text.strip())),
    st.one_of(st.none(), st.integers(0, MAX_SEED)),
    st.one_of(st.none(), st.integers(1, 10_000)),
    st.one_of(st.none(), st.tuples(st.integers(1, 99_999), st.integers(1, 99_999))),
    st.one_of(st.none(), st.floats(0, MAX_GUIDANCE)),
    st.one_of(st.just(""), _PLAIN),
    draw_sections(),
)
def test_draw_options_round_trip(
    prompt: str,
    seed: int | None,
    steps: int | None,
    size: tuple[int, int] | None,
    guidance: float | None,
    negative: str,
    section: DrawSection,
) -> None:
    words = [f'"{prompt}"']
    if seed is not None:
        words += ["--seed", str(seed)]
    if steps is not None:
        words.append(f"--steps={steps}")
    if size is not None:
        words += ["--size", f"{size[0]}x{size[1]}"]
    if guidance is not None:
        words += ["--guidance", repr(guidance)]
    if negative.strip():
        words += ["--negative", f'"{negative}"']
    options = parse_draw_args(" ".join(words))
    assert options == DrawOptions(
        prompt=" ".join(prompt.split()),
        seed=seed,
        steps=steps,
        width=size[0] if size else None,
        height=size[1] if size else None,
        negative=" ".join(negative.split()),
        guidance=guidance,
    )
    assert_within_limits(options, section)


@pytest.mark.parametrize("option", ["--seed", "--steps"])
def test_a_number_with_thousands_of_digits_is_a_usage_error(option: str) -> None:
    with pytest.raises(DrawUsageError):
        parse_draw_args(f"a cat {option} {'9' * 5000}")


# -- config loading -------------------------------------------------------------------

SECTIONS: dict[str, list[str]] = {
    name: list(field.annotation.model_fields)  # type: ignore[union-attr]
    for name, field in Config.model_fields.items()
}
_CHARS = st.characters(blacklist_categories=("Cs",))
_SMALL = st.text(_CHARS, max_size=20)
_KEY = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=10)
_SCALARS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    _SMALL,
    st.sampled_from(
        [
            "auto",
            "UTC",
            "Europe/Berlin",
            "cuda",
            "http://x",
            "ws://x",
            "redis://x",
            "sqlite+aiosqlite:///x.db",
            "postgresql+asyncpg://u:p@h/db",
            "telegram:1",
            "Mon-Fri 09:00-17:00",
            "(a",
            "1e999",
            "NaN",
            "[]",
            "{}",
        ]
    ),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEY, inner, max_size=3)),
    max_leaves=6,
)
DOCS = st.fixed_dictionaries(
    {},
    optional={
        name: st.dictionaries(st.one_of(st.sampled_from(keys), _KEY), _VALUES, max_size=4)
        for name, keys in SECTIONS.items()
    },
)
ENVIRON = st.dictionaries(
    st.tuples(
        st.sampled_from(list(SECTIONS)),
        st.sampled_from(sorted({k for keys in SECTIONS.values() for k in keys})),
    ).map(lambda pair: f"AIGC_BOT__{pair[0].upper()}__{pair[1].upper()}"),
    st.one_of(_SMALL, _VALUES.map(lambda value: json.dumps(value, ensure_ascii=False))),
    max_size=3,
)


def toml_value(value: Any) -> str:
    """TOML for a value (JSON's string escapes are TOML's; NaN and Infinity
    are not TOML, so such a file is a TOML error, which is fine here)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    pairs = (f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items())
    return "{" + ", ".join(pairs) + "}"


def toml_document(document: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, items in document.items():
        lines.append(f"[{section}]")
        lines += [
            f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in items.items()
        ]
    return "\n".join(lines) + "\n"


def load_or_one_line_error(path: Path, environ: dict[str, str]) -> Config | None:
    """The Config, or None after checking the ConfigError is one line."""
    try:
        return load_config(path, environ=environ)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, message
        return None


@quick(300)
@given(DOCS, ENVIRON)
def test_config_is_a_config_or_a_one_line_error(
    tmp_path: Path, document: dict[str, dict[str, Any]], environ: dict[str, str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml_document(document), encoding="utf-8")
    environ = {name: value.replace("\x00", "") for name, value in environ.items()}
    config = load_or_one_line_error(path, environ)
    if config is not None:
        assert isinstance(config, Config)
        assert config.draw.max_steps >= config.draw.default_steps


@quick(200)
@given(st.text(_CHARS, max_size=200))
def test_any_text_as_config_toml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    load_or_one_line_error(path, {})


_CONFIG_CRASHES = {
    "timezone_is_a_folder": (
        '[handoff]\ntimezone = "Europe"\n',
        {},
        "bot/config/handoff.py _zone catches ZoneInfoNotFoundError and ValueError, but "
        "ZoneInfo('Europe') (a folder of tzdata) raises IsADirectoryError",
    ),
    "timezone_too_long": (
        f'[handoff]\ntimezone = "{"a" * 300}"\n',
        {},
        "bot/config/handoff.py _zone: ZoneInfo of a 300-character name raises OSError "
        "(File name too long), which it does not catch",
    ),
    "pattern_repeat_too_large": (
        '[moderation]\nblocked_patterns = ["a{4294967296}"]\n',
        {},
        "bot/config/governance.py _compiles catches re.error only; re.compile raises "
        "OverflowError for a repeat count this large",
    ),
    "pattern_nested_too_deep": (
        '[moderation]\nblocked_patterns = ["' + "(" * 1000 + "a" + ")" * 1000 + '"]\n',
        {},
        "bot/config/governance.py _compiles: re.compile raises RecursionError on 1,000 "
        "nested groups",
    ),
    "toml_nested_too_deep": (
        "[bot]\nname = " + "[" * 3000 + "]" * 3000 + "\n",
        {},
        "bot/config/loading.py load_config catches tomllib.TOMLDecodeError only; tomllib "
        "raises RecursionError on deeply nested arrays",
    ),
    "env_json_nested_too_deep": (
        "",
        {"AIGC_BOT__BOT__NAME": "[" * 100_000},
        "bot/config/loading.py _parse_env_value catches ValueError only; json.loads raises "
        "RecursionError on deeply nested arrays (it should fall back to the plain string)",
    ),
    "key_with_a_newline": (
        '[bot]\n"a\\nb" = 1\n',
        {},
        "bot/config/loading.py _describe writes the key as it is, so a TOML key holding a "
        "newline makes a ConfigError of two lines (repr the key parts that are not identifiers)",
    ),
}


@pytest.mark.parametrize(
    ("text", "environ"),
    [
        pytest.param(text, environ, id=name)
        for name, (text, environ, _what_crashed) in _CONFIG_CRASHES.items()
    ],
)
def test_configs_that_crashed_the_loader_are_one_line_errors(
    tmp_path: Path, text: str, environ: dict[str, str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    load_or_one_line_error(path, environ)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[bot]\nname = "caf\xe9"\n')
    load_or_one_line_error(path, {})
