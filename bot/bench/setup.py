"""What every bench run shares: its config, the model, the users' messages, a
progress bar, and the description of the machine it ran on."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from bot.config import Config


def bench_config(base: Config, model: str, db_path: Path, **text: Any) -> Config:
    """`base` with the model, a temporary SQLite database, the local engine, no
    rate limit (a bench user sends 20 messages a minute and more) and no draw."""
    return base.model_copy(
        update={
            "bot": base.bot.model_copy(update={"data_dir": db_path.parent}),
            "storage": base.storage.model_copy(update={"url": f"sqlite+aiosqlite:///{db_path}"}),
            "text": base.text.model_copy(update={"model": model, "engine": "local", **text}),
            "limits": base.limits.model_copy(update={"messages_per_minute": 0}),
            "draw": base.draw.model_copy(update={"enabled": False}),
        }
    )


def resolve_model(requested: str | None, config: Config, workdir: Path) -> tuple[str, str]:
    """(model to load, how it was chosen)."""
    from bot.engines.loading import looks_local

    if requested:
        return requested, "--model"
    name = config.text.model
    if looks_local(name) and not Path(name).expanduser().is_dir():
        from bot.testing.tiny_models import build_tiny_gpt2

        path = build_tiny_gpt2(workdir / "tiny-gpt2")
        return str(path), f"tiny test model ({name} is missing)"
    return name, "text.model"


def user_scripts(dialogues: list[list[str]], users: int, turns: int) -> list[list[str]]:
    """`turns` messages for each user: the first speaker's turns of one held-out
    dialogue each, cycled, at most 160 characters (cut at a word)."""
    if not dialogues:
        from bot.testing.tiny_models import sample_lines

        lines = sample_lines()
        return [
            [lines[(user * 37 + turn * 11) % len(lines)] for turn in range(turns)]
            for user in range(users)
        ]
    scripts = []
    for user in range(users):
        own = dialogues[user % len(dialogues)][0::2]
        scripts.append([_shorten(own[turn % len(own)]) for turn in range(turns)])
    return scripts


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] or text[:limit]


class Progress:
    """A tqdm bar on stderr when wanted, else nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="msg", file=sys.stderr, dynamic_ncols=True, mininterval=0.5
            )

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(name)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def parameter_count(model: Any) -> int:
    """The model's weights, counted once also where the engine swapped a layer
    for a quantized or bf16 copy (whose weights are buffers, not parameters)."""
    from bot.engines.linears import Bf16Conv1D, Int8Conv1D

    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Bf16Conv1D):
            total += module.weight.numel() + module.bias.numel()
        elif isinstance(module, Int8Conv1D):
            total += module.weight8.numel() + module.bias.numel()
    return int(total)


def describe_model(name: str, model: Any, tokenizer: Any) -> dict[str, Any]:
    config = model.config
    return {
        "path": name,
        "parameters": parameter_count(model),
        "layers": getattr(config, "n_layer", None),
        "embedding": getattr(config, "n_embd", None),
        "vocab": len(tokenizer),
        "context": getattr(config, "n_positions", None),
    }


def describe_device(device: Any, model: Any) -> dict[str, Any]:
    import torch

    described: dict[str, Any] = {
        "type": device.type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described
