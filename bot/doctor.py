"""`aigc-bot doctor`: is this installation ready to run? Never prints a secret."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bot.config import Config, config_path
from bot.engines.loading import looks_local, model_missing_message


def _line(ok: bool | None, what: str, detail: str) -> str:
    mark = {True: "ok  ", False: "FAIL", None: "--  "}[ok]
    return f"[{mark}] {what}: {detail}"


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
    if config.text.engine == "remote":
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

    for section in ("telegram", "discord"):
        settings = getattr(config, section)
        is_set = bool(os.environ.get(settings.token_env, "").strip())
        state = "set" if is_set else "not set"
        enabled = "enabled" if settings.enabled and is_set else "off"
        print(
            _line(
                is_set or None,
                f"{section} token",
                f"${settings.token_env} {state} ({section} {enabled})",
            )
        )
    web = config.web
    print(_line(None, "web", f"{'on' if web.enabled else 'off'}, http://{web.host}:{web.port}/"))
    return 1 if failures else 0
