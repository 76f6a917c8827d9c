"""`aigc-bot doctor`: is this installation ready to run? Never prints a secret."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bot.config import Config, config_path
from bot.engine_settings import HYBRID, resolved_engine
from bot.engines.loading import looks_local, model_missing_message


def _line(ok: bool | None, what: str, detail: str) -> str:
    mark = {True: "ok  ", False: "FAIL", None: "--  "}[ok]
    return f"[{mark}] {what}: {detail}"


def _ct2_threads(configured: int) -> str:
    """How many threads CTranslate2 gets for `text.threads`, in words."""
    from bot.engines.ct2 import intra_threads

    threads = intra_threads(configured)
    if not threads:
        return "its default threads"
    return "1 thread" if threads == 1 else f"{threads} threads"


def _model_architecture(model: str) -> str | None:
    config_file = Path(model).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    return str(json.loads(config_file.read_text()).get("architectures", ["?"])[0])


def _model_index(model: str) -> bool:
    return (Path(model).expanduser() / "model_index.json").is_file()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def run_checks(config: Config, explicit_path: str | None) -> int:
    from storage import StorageUnavailable, Store

    failures = 0
    path = config_path(explicit_path)
    print(
        _line(
            True,
            "config",
            f"{path} valid" if path.exists() else "no file, using the embedded defaults",
        )
    )

    try:
        store = await Store.open(config.storage.url, busy_timeout_ms=config.storage.busy_timeout_ms)
        await store.ping()
        await store.close()
        print(
            _line(True, "database", f"{_safe_url(config.storage.url)} reachable, schema up to date")
        )
    except StorageUnavailable as exc:
        failures += 1
        print(_line(False, "database", f"{_safe_url(config.storage.url)}: {exc}"))

    model = config.text.model
    engine = resolved_engine(config.text)
    ct2 = f"CTranslate2 ({_ct2_threads(config.text.threads)})"
    if engine == "local":
        chosen = " (text.engine = 'auto' on this machine)" if config.text.engine == "auto" else ""
        print(_line(True, "text engine", f"local{chosen}"))
    if engine == HYBRID:  # only ever "auto"'s choice
        cache = config.bot.data_dir / "ctranslate2"
        print(
            _line(
                True,
                "text engine",
                f"local for large batches, {ct2} for small ones (converted models in "
                f"{cache}; text.engine = 'auto' on this machine)",
            )
        )
    if engine == "ctranslate2":
        from bot.engines.ct2 import ctranslate2_missing

        missing = ctranslate2_missing()
        if missing is not None:
            failures += 1
            print(_line(False, "text engine", missing))
        else:
            cache = config.bot.data_dir / "ctranslate2"
            chosen = (
                "; text.engine = 'auto' on this machine" if config.text.engine == "auto" else ""
            )
            print(_line(True, "text engine", f"{ct2}, converted models in {cache}{chosen}"))
    if engine == "remote":
        print(_line(None, "text model", f"remote engine at {config.text.remote_url}"))
    elif looks_local(model):
        arch = _model_architecture(model)
        if arch is not None:
            print(_line(True, "text model", f"{model} ({arch})"))
        else:
            failures += 1
            print(_line(False, "text model", model_missing_message("text.model", model)))
    else:
        print(
            _line(
                None, "text model", f"hub id {model!r}: downloaded on first start (needs network)"
            )
        )

    draw = config.draw
    if not draw.enabled:
        print(_line(None, "draw model", "off ([draw] enabled = false)"))
    elif looks_local(draw.model):
        if _model_index(draw.model):
            print(_line(True, "draw model", draw.model))
        else:
            failures += 1
            detail = "no model_index.json there (a diffusers directory is expected)"
            print(_line(False, "draw model", f"draw.model {draw.model!r}: {detail}"))
    else:
        print(
            _line(
                None,
                "draw model",
                f"hub id {draw.model!r}: downloaded on the first /draw (needs network)",
            )
        )

    import torch

    if torch.cuda.is_available():
        print(_line(True, "GPU", f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"))
    else:
        print(_line(None, "GPU", f"none, using the CPU (torch {torch.__version__})"))

    for section, check in (("telegram", _telegram_token), ("discord", _discord_token)):
        settings = getattr(config, section)
        token = os.environ.get(settings.token_env, "").strip()
        if not token:
            print(_line(None, f"{section} token", f"${settings.token_env} not set ({section} off)"))
            continue
        if not settings.enabled:
            detail = f"${settings.token_env} set, but [{section}] enabled = false"
            print(_line(None, f"{section} token", detail))
            continue
        ok, detail = await check(settings, token)
        failures += 0 if ok else 1
        print(_line(ok, f"{section} token", f"${settings.token_env} {detail}"))

    if config.knowledge.faq:
        from bot.knowledge import KnowledgeError, load_faq

        path = config.relative_to_config(config.knowledge.faq)
        try:
            faq = load_faq(path)
            print(_line(True, "knowledge", f"{path}: {len(faq.entries)} entries"))
        except KnowledgeError as exc:
            failures += 1
            print(_line(False, "knowledge", str(exc)))

    if config.handoff.enabled:
        operators = _operator_names(config.handoff.operator_tokens_env)
        detail = (
            f"{len(operators)} operator(s) in ${config.handoff.operator_tokens_env}"
            if operators
            else f"${config.handoff.operator_tokens_env} not set: nobody can use /operator"
        )
        print(_line(bool(operators) or None, "handoff", detail))
    web = config.web
    print(_line(None, "web", f"{'on' if web.enabled else 'off'}, http://{web.host}:{web.port}/"))
    return 1 if failures else 0


_CHECK_TIMEOUT = 8.0


async def _ask(url: str, headers: dict[str, str] | None = None) -> tuple[int | None, Any, str]:
    """(status, JSON body or None, problem) of one GET; status None when unreachable."""
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=_CHECK_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, headers=headers) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                return response.status, body, ""
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, None, type(exc).__name__


async def _telegram_token(settings: Any, token: str) -> tuple[bool, str]:
    """Ask the Bot API who the token belongs to (getMe)."""
    where = urlsplit(settings.base_url).netloc
    status, body, problem = await _ask(f"{settings.base_url}{token}/getMe")
    if status is None:
        return False, f"set, but the Bot API at {where} cannot be reached ({problem})"
    if status == 200 and isinstance(body, dict) and body.get("ok"):
        return True, f"accepted by {where} (@{body['result'].get('username', '?')})"
    if status in (401, 404):
        return False, f"rejected by {where}: get a new token from @BotFather"
    return False, f"set, but {where} answered {status}"


async def _discord_token(settings: Any, token: str) -> tuple[bool, str]:
    """Ask Discord who the token belongs to (GET /users/@me)."""
    where = urlsplit(settings.api_base_url).netloc
    status, body, problem = await _ask(
        f"{settings.api_base_url}/users/@me", {"Authorization": f"Bot {token}"}
    )
    if status is None:
        return False, f"set, but Discord at {where} cannot be reached ({problem})"
    if status == 200 and isinstance(body, dict):
        return True, f"accepted by {where} ({body.get('username', '?')})"
    if status == 401:
        return False, (
            f"rejected by {where}: copy a fresh one from the Developer Portal (Bot > Reset Token)"
        )
    return False, f"set, but {where} answered {status}"


def _operator_names(env_name: str) -> list[str]:
    raw = os.environ.get(env_name, "")
    return [pair.split(":", 1)[0].strip() for pair in raw.split(",") if ":" in pair]
