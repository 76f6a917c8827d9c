"""The pieces of one training run: tokenizer, model, optimizer and its
schedule, progress bar, saving, and the run's summary (bot.training.trainer
runs the loop)."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.engines import EngineUnavailable

if TYPE_CHECKING:
    from bot.training.trainer import TrainOptions, TrainResult


def train_tokenizer(dialogues: list[list[str]], options: TrainOptions) -> Any:
    from bot.training.tokenizer import train_tokenizer

    return train_tokenizer(dialogues, options.vocab_size, options.block_size)


def new_model(tokenizer: Any, options: TrainOptions) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    if options.n_embd % options.n_head:
        raise EngineUnavailable(
            f"--n-embd {options.n_embd} must be a multiple of --n-head {options.n_head}"
        )
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=options.block_size,
        n_embd=options.n_embd,
        n_layer=options.n_layer,
        n_head=options.n_head,
        resid_pdrop=options.dropout,
        embd_pdrop=options.dropout,
        attn_pdrop=options.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def load_pretrained(name: str, what: str) -> tuple[Any, Any]:
    """Model and tokenizer from a directory or a hub id (the engines' loader);
    errors name `what`."""
    from bot.engines.loading import load_pretrained_lm, looks_local

    if looks_local(name):
        missing = f"{what} {name!r} does not exist: pass a model directory or a hub id"
    else:
        missing = (
            f"{what} {name!r} could not be loaded from the Hugging Face hub (no network?): "
            f"pass {what} a local model directory"
        )
    return load_pretrained_lm(
        name, missing=missing, invalid=f"{what} {name!r} is not a loadable model"
    )


def positions(model: Any) -> int:
    config = model.config
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", 1024
    )
    return int(positions or 1024)


def make_optimizer(model: Any, options: TrainOptions) -> Any:
    import torch

    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and "wpe" not in name else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": options.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.98), eps=1e-8)


class Schedule:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak.

    Progress is the larger of steps done / planned steps and, with
    `--max-minutes`, training time / time limit, so a time-limited run still
    ends at the low learning rate whatever the machine's speed."""

    def __init__(self, optimizer: Any, options: TrainOptions, total_steps: int) -> None:
        self.optimizer = optimizer
        self.peak = options.lr
        self.min_ratio = options.min_lr_ratio
        self.total = total_steps
        self.seconds = options.max_minutes * 60
        self.warmup = min(options.warmup_steps, max(1, total_steps // 10))
        self.last = self.peak

    def set(self, step: int, elapsed: float) -> float:
        if step < self.warmup:
            factor = (step + 1) / self.warmup
        else:
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            if self.seconds:
                progress = max(progress, elapsed / self.seconds)
            progress = min(1.0, progress)
            factor = self.min_ratio + (1 - self.min_ratio) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        self.last = self.peak * factor
        for group in self.optimizer.param_groups:
            group["lr"] = self.last
        return self.last


def save_model(model: Any, tokenizer: Any, output: Path) -> None:
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
    )


def write_summary(
    output: Path,
    options: TrainOptions,
    result: TrainResult,
    model: Any,
    tokenizer: Any,
    block_size: int,
    n_train: int,
    n_val: int,
    n_tokens: int,
    device: Any,
) -> None:
    summary = {
        "command": shlex.join(options.command) if options.command else None,
        "options": {k: v for k, v in asdict(options).items() if k != "command"},
        "parameters": result.parameters,
        "layers": model.config.n_layer,
        "embedding": model.config.n_embd,
        "heads": model.config.n_head,
        "vocab_size": len(tokenizer),
        "context": block_size,
        "train_dialogues": n_train,
        "heldout_dialogues": n_val,
        "train_tokens_per_epoch": n_tokens,
        "steps": result.step,
        "wall_seconds": round(result.seconds, 1),
        "device": str(device),
        "final_train_loss_ema": round(result.train_loss, 4),
        "best_heldout_loss": None if result.val_loss is None else round(result.val_loss, 4),
        "best_heldout_perplexity": None
        if result.val_loss is None
        else round(math.exp(result.val_loss), 2),
        "interrupted": result.interrupted,
    }
    (output / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
