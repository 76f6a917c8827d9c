"""The training loop: GPT-2 from scratch (with its own BPE) or fine-tuned from `--base`.

Output layout (`--output DIR`):

* `DIR/` — the best model so far by held-out loss, as `save_pretrained`
  (safetensors) plus its tokenizer: what `text.model` points at.
* `DIR/checkpoint/` — the latest training state (model, optimizer, schedule,
  position in the epoch, RNG); a new run with the same `--output` resumes from
  it unless `--fresh` is given. Delete it once training is done.
* `DIR/training.json` — the command, sizes, wall time and metrics.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bot.engines import EngineUnavailable
from bot.training import data as data_mod
from bot.training.evaluate import _autocast, dialogue_nll, perplexity
from bot.training.pieces import (
    Schedule,
    load_pretrained,
    make_optimizer,
    new_model,
    positions,
    progress_bar,
    save_model,
    train_tokenizer,
    write_summary,
)

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainOptions:
    data: str = data_mod.CHITCHAT
    output: str = "models/chitchat-gpt2"
    base: str | None = None
    vocab_size: int = 8192
    block_size: int = 256
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    dropout: float = 0.1
    epochs: float = 3.0
    max_steps: int = 0
    max_minutes: float = 0.0
    batch_tokens: int = 4096
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    val_fraction: float = 0.05
    eval_every: int = 200
    checkpoint_every: int = 200
    loss_on: str = "all"  # "all" turns or "bot" turns only
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    fresh: bool = False
    progress: bool = True
    command: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    output: Path
    step: int
    train_loss: float
    val_loss: float | None
    val_perplexity: float | None
    parameters: int
    seconds: float
    losses: list[float]
    interrupted: bool = False


def train(options: TrainOptions, log: Any = None) -> TrainResult:
    """Train per `options`; `log` gets one-line status messages (default: stderr)."""
    import torch

    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        return _train(options, log or (lambda message: print(message, file=sys.stderr, flush=True)))
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide


def _train(options: TrainOptions, say: Any) -> TrainResult:
    import torch

    if options.loss_on not in ("all", "bot"):
        raise EngineUnavailable(f"--loss-on must be 'all' or 'bot', not {options.loss_on!r}")
    from bot.engines.loading import resolve_device

    device = resolve_device(options.device)
    output = Path(options.output)
    checkpoint_dir = output / CHECKPOINT
    resume = (checkpoint_dir / STATE_FILE).is_file() and not options.fresh

    dialogues = data_mod.load_dialogues(options.data)
    train_dialogues, val_dialogues = data_mod.split(dialogues, options.val_fraction, options.seed)
    say(
        f"data: {len(dialogues)} dialogues from {options.data} "
        f"({len(train_dialogues)} train, {len(val_dialogues)} held out)"
    )

    random.seed(options.seed)
    torch.manual_seed(options.seed)
    if resume:
        say(f"resuming from {checkpoint_dir} (pass --fresh to start over)")
        model, tokenizer = load_pretrained(str(checkpoint_dir), "checkpoint")
        state = torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=False)
    else:
        if options.fresh and checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        state = None
        if options.base:
            model, tokenizer = load_pretrained(options.base, "--base")
        else:
            tokenizer = train_tokenizer(train_dialogues, options)
            model = new_model(tokenizer, options)
    block_size = min(options.block_size, positions(model))
    model.to(device)
    model.train()

    bot_only = options.loss_on == "bot"
    train_examples = data_mod.encode_dialogues(
        tokenizer, train_dialogues, block_size, bot_only=bot_only
    )
    val_examples = data_mod.encode_dialogues(
        tokenizer, val_dialogues, block_size, bot_only=bot_only
    )
    n_params = sum(p.numel() for p in model.parameters())
    n_tokens = sum(len(e.input_ids) for e in train_examples)
    steps_per_epoch = len(data_mod.batches(train_examples, options.batch_tokens, seed=options.seed))
    total_steps = options.max_steps or max(1, math.ceil(options.epochs * steps_per_epoch))
    say(
        f"model: {n_params / 1e6:.2f}M parameters, "
        f"{model.config.n_layer} layers x {model.config.n_embd} dims, "
        f"vocab {len(tokenizer)}, context {block_size}; {n_tokens} training tokens, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps on {device}"
    )

    optimizer = make_optimizer(model, options)
    schedule = Schedule(optimizer, options, total_steps)
    scaler = None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda")

    step, epoch, batch_in_epoch = 0, 0, 0
    best_val = math.inf
    elapsed_before = 0.0
    losses: list[float] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best_val, elapsed_before = state["best_val"], state["elapsed"]
        losses = state.get("losses", [])
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        say(f"resumed at step {step} (epoch {epoch}, best held-out loss {best_val:.4f})")
    output.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    last_checkpoint = start
    pad_id = tokenizer.eos_token_id
    progress = progress_bar(options.progress, total_steps, step)
    ema = losses[-1] if losses else None
    window_tokens, window_start = 0, time.monotonic()
    interrupted = False
    val_loss = None if math.isinf(best_val) else best_val

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - start

    def save_checkpoint() -> None:
        tmp = output / f"{CHECKPOINT}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "best_val": best_val,
                "elapsed": elapsed(),
                "losses": losses,
                "python_rng": random.getstate(),
                "torch_rng": torch.get_rng_state(),
                "options": asdict(options),
            },
            tmp / STATE_FILE,
        )
        if checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        os.replace(tmp, checkpoint_dir)

    def evaluate_and_keep_best() -> None:
        nonlocal best_val, val_loss
        if not val_examples:
            return
        nll, count = dialogue_nll(model, val_examples, device, options.batch_tokens)
        val_loss = nll / count
        improved = val_loss < best_val
        if improved:
            best_val = val_loss
            save_model(model, tokenizer, output)
        progress.write(
            f"step {step}: held-out loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}"
            + (" (best, saved)" if improved else "")
        )

    previous_sigterm = _sigterm_as_interrupt()
    try:
        while step < total_steps:
            groups = data_mod.batches(
                train_examples, options.batch_tokens, seed=options.seed + epoch
            )
            while batch_in_epoch < len(groups) and step < total_steps:
                group = groups[batch_in_epoch]
                batch = {
                    k: v.to(device)
                    for k, v in data_mod.collate([train_examples[i] for i in group], pad_id).items()
                }
                schedule.set(step, elapsed())
                with _autocast(device):
                    loss = model(**batch).loss
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_in_epoch += 1
                value = float(loss.detach())
                ema = value if ema is None else 0.98 * ema + 0.02 * value
                losses.append(value)
                window_tokens += int(batch["attention_mask"].sum())
                now = time.monotonic()
                progress.update(1)
                if step % 10 == 0 or step == total_steps:
                    rate = window_tokens / max(now - window_start, 1e-6)
                    progress.set_postfix(
                        loss=f"{ema:.3f}", tok_s=f"{rate:.0f}", lr=f"{schedule.last:.1e}"
                    )
                    window_tokens, window_start = 0, now
                if options.eval_every and step % options.eval_every == 0:
                    evaluate_and_keep_best()
                if (
                    options.checkpoint_every and step % options.checkpoint_every == 0
                ) or now - last_checkpoint > 600:
                    save_checkpoint()
                    last_checkpoint = now
                if options.max_minutes and elapsed() > options.max_minutes * 60:
                    progress.write(f"--max-minutes {options.max_minutes:g} reached at step {step}")
                    total_steps = step
            if batch_in_epoch >= len(groups):
                epoch += 1
                batch_in_epoch = 0
    except KeyboardInterrupt:
        interrupted = True
        progress.write(
            f"interrupted at step {step}; saving a checkpoint — run the same command to resume"
        )
    finally:
        progress.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)

    if interrupted:
        save_checkpoint()
    else:
        if not options.eval_every or step % options.eval_every != 0:
            evaluate_and_keep_best()
        if not val_examples:
            save_model(model, tokenizer, output)
        save_checkpoint()
    seconds = elapsed()
    result = TrainResult(
        output=output,
        step=step,
        train_loss=ema if ema is not None else float("nan"),
        val_loss=None if math.isinf(best_val) else best_val,
        val_perplexity=None if math.isinf(best_val) else perplexity(best_val, 1),
        parameters=n_params,
        seconds=seconds,
        losses=losses,
        interrupted=interrupted,
    )
    write_summary(
        output,
        options,
        result,
        model,
        tokenizer,
        block_size,
        len(train_dialogues),
        len(val_dialogues),
        n_tokens,
        device,
    )
    return result


def _sigterm_as_interrupt() -> Any:
    """While training, SIGTERM (e.g. `kill`) saves a checkpoint like Ctrl-C does."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)
