"""The command lines README.md documents work as written (#16.1).

Every `aigc-bot ...` form in the "Command line" table and in the ```sh
blocks is read from the README itself (so rows added later are checked too,
and only a form that does not parse fails), and parsed by the real parser:
as written, with optional `[...]` parts left out and put in, and with
`--config PATH --log-level DEBUG` placed before the subcommand, right after
it, and at the end. Then two forms run for real: `aigc-bot run --config PATH`
serves /healthz on the port the file names and exits 0 on SIGTERM, and
`aigc-bot export --config PATH --platform web --user U` prints what that run
stored.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
from pathlib import Path

import aiohttp
import pytest
from support.eventually import eventually
from support.net import free_port
from support.process import AIGC_BOT

from bot.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG = "/tmp/aigc-bot-readme/config.toml"
#: Placeholders the README writes in capitals, and what stands in for them.
PLACEHOLDERS = {"PATH": CONFIG, "N": "1", "P": "web", "U": "x", "ID": "x", "WxH": "64x64"}
_SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "(", ")"}


def command_line_section(text: str) -> str:
    match = re.search(r"^## Command line\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md has no '## Command line' section"
    return match.group(1)


def table_spans(section: str) -> list[str]:
    """Code spans in the section's table rows (`\\|` is a pipe inside a cell)."""
    spans = []
    for line in section.splitlines():
        if line.lstrip().startswith("|"):
            spans += [span.replace("\\|", "|") for span in re.findall(r"`([^`]+)`", line)]
    return spans


def sh_blocks(text: str) -> list[str]:
    """Each command of every ```sh block, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```(?:sh|bash|shell)\s*\n(.*?)^```", text, re.M | re.S):
        commands += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def expand_optional(form: str) -> list[str]:
    """`a [b] [c]` -> `a`, `a b` and `a c`: without the optional parts, and
    with each one (two of them may exclude each other)."""
    pieces = re.split(r"\s*\[([^\[\]]*)\]", form)
    fixed, optional = pieces[0::2], pieces[1::2]

    def keeping(kept: int | None) -> str:
        text = fixed[0]
        for index, part in enumerate(optional):
            text += (" " + part if index == kept else "") + fixed[index + 1]
        return text

    return list(dict.fromkeys([keeping(None), *map(keeping, range(len(optional)))]))


def aigc_bot_argvs(command: str) -> list[list[str]]:
    """The arguments after `aigc-bot` in each pipeline part that runs it."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    argvs, current = [], []
    for token in [*tokens, ";"]:
        if token in _SHELL_OPERATORS:
            words = [w for w in current if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)]
            if words and Path(words[0]).name == "aigc-bot":
                argvs.append(words[1:])
            current = []
        else:
            current.append(token)
    return argvs


def documented_forms(text: str) -> list[list[str]]:
    sources = table_spans(command_line_section(text)) + sh_blocks(text)
    forms: list[list[str]] = []
    for source in sources:
        for variant in expand_optional(source):
            for argv in aigc_bot_argvs(variant):
                argv = [PLACEHOLDERS.get(word, word) for word in argv]
                if argv and argv not in forms and not {"-h", "--help"} & set(argv):
                    forms.append(argv)
    return forms


def without_globals(argv: list[str]) -> list[str]:
    """The form without the global options it already has (they are placed anew)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--config", "--log-level"):
            skip = True
        elif not word.startswith(("--config=", "--log-level=")):
            kept.append(word)
    return kept


def subcommand_depth(argv: list[str]) -> int:
    """How many leading words name (sub)commands, e.g. 2 for `faq eval`."""
    parser, depth = build_parser(), 0
    while depth < len(argv):
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions or argv[depth] not in actions[0].choices:  # type: ignore[attr-defined]
            break
        parser = actions[0].choices[argv[depth]]  # type: ignore[attr-defined]
        depth += 1
    return depth


FORMS = documented_forms(README.read_text(encoding="utf-8"))
GLOBALS = ["--config", CONFIG, "--log-level", "DEBUG"]


def test_the_readme_documents_the_main_forms() -> None:
    commands = {argv[0] for argv in FORMS}
    assert {"run", "chat", "export", "forget", "doctor"} <= commands, FORMS
    assert ["run", "--config", CONFIG] in FORMS  # `aigc-bot run [--config PATH]`


def test_forms_are_read_the_way_a_shell_reads_them() -> None:
    readme = """
## Command line

| command | what |
|---|---|
| `aigc-bot new-thing [--flag X]` | new row |
| `printf 'a\\n' \\| .venv/bin/aigc-bot chat` | piped |

## Next
```sh
FOO=1 aigc-bot train --epochs 3 \\
    --output models/m   # a comment
make run
```
"""
    assert documented_forms(readme) == [
        ["new-thing"],
        ["new-thing", "--flag", "X"],
        ["chat"],
        ["train", "--epochs", "3", "--output", "models/m"],
    ]


def test_a_form_that_does_not_parse_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse(["new-thing", "--flag", "X"])


def parse(argv: list[str]) -> object:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`aigc-bot {shlex.join(argv)}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("form", FORMS, ids=[shlex.join(form) for form in FORMS])
def test_each_documented_form_parses(form: list[str]) -> None:
    parse(form)
    bare = without_globals(form)
    depth = subcommand_depth(bare)
    assert depth >= 1, f"`aigc-bot {shlex.join(form)}` names no subcommand"
    placements = {
        "before the subcommand": GLOBALS + bare,
        "after the subcommand": bare[:1] + GLOBALS + bare[1:],
        "after the whole command": bare[:depth] + GLOBALS + bare[depth:],
        "at the end": bare + GLOBALS,
    }
    for where, argv in placements.items():
        args = parse(argv)
        assert getattr(args, "config", None) == CONFIG, (where, argv)
        assert getattr(args, "log_level", None) == "DEBUG", (where, argv)


# -- real runs -----------------------------------------------------------------------


def write_config(tmp_path: Path, tiny_model_dir: Path, port: int) -> Path:
    path = tmp_path / "elsewhere" / "bot.toml"
    path.parent.mkdir()
    path.write_text(
        f"""
[bot]
data_dir = "{tmp_path / "data"}"
shutdown_grace_s = 2

[storage]
url = "sqlite+aiosqlite:///{tmp_path / "readme.db"}"

[text]
model = "{tiny_model_dir}"
max_new_tokens = 8
greedy = true

[draw]
enabled = false

[web]
port = {port}

[telegram]
enabled = false

[discord]
enabled = false
""",
        encoding="utf-8",
    )
    return path


async def healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/healthz", timeout=aiohttp.ClientTimeout(2)) as r:
                return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_run_and_export_with_the_config_after_the_subcommand(
    bot_env: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {key: value for key, value in bot_env.items() if not key.startswith("AIGC_BOT")}
    port = free_port()
    config = write_config(tmp_path, tiny_model_dir, port)
    url = f"http://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        AIGC_BOT,
        "run",
        "--config",
        str(config),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:

        async def serving() -> bool:
            assert process.returncode is None, "aigc-bot run exited early"
            return await healthy(url)

        await eventually(serving, within=120, every=0.1)
        async with aiohttp.ClientSession(base_url=url) as http:
            async with http.post("/api/sessions") as response:
                session = await response.json()
            auth = {"Authorization": f"Bearer {session['session']}"}
            async with http.post("/api/messages", json={"text": "hi"}, headers=auth) as r:
                assert r.status == 200, await r.text()
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode(errors="replace")

    exporter = await asyncio.create_subprocess_exec(
        AIGC_BOT,
        "export",
        "--config",
        str(config),
        "--platform",
        "web",
        "--user",
        session["user_id"],
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(exporter.communicate(), 120)
    assert exporter.returncode == 0, err.decode(errors="replace")
    document = json.loads(out)
    assert document["platform"] == "web" and document["user_id"] == session["user_id"]
    [conversation] = document["conversations"]
    assert [m["role"] for m in conversation["messages"]] == ["user", "bot"]
    assert conversation["messages"][0]["text"] == "hi"


async def test_run_stops_promptly_on_sigterm_while_discord_cannot_be_reached(
    bot_env: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {key: value for key, value in bot_env.items() if not key.startswith("AIGC_BOT")}
    nowhere = free_port()
    env.update(
        {
            "DISCORD_BOT_TOKEN": "readme-test-token",
            "AIGC_BOT__DISCORD__ENABLED": "true",
            "AIGC_BOT__DISCORD__API_BASE_URL": f"http://127.0.0.1:{nowhere}/api/v10",
            # no model to load: the remote engine is enough to serve /healthz
            "AIGC_BOT__TEXT__ENGINE": "remote",
        }
    )
    port = free_port()
    config = write_config(tmp_path, tiny_model_dir, port)
    process = await asyncio.create_subprocess_exec(
        AIGC_BOT,
        "run",
        "--config",
        str(config),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def answering() -> bool:
            assert process.returncode is None, "aigc-bot run exited early"
            try:
                async with aiohttp.ClientSession() as http:
                    url = f"http://127.0.0.1:{port}/healthz"
                    async with http.get(url, timeout=aiohttp.ClientTimeout(2)) as response:
                        return response.status in (200, 503)  # 503: Discord is down
            except (aiohttp.ClientError, TimeoutError):
                return False

        await eventually(answering, within=60, every=0.1)
        process.send_signal(signal.SIGTERM)
        # shutdown_grace_s is 2 and nothing is in flight
        assert await asyncio.wait_for(process.wait(), 8) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
