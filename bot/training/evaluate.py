"""Perplexity of a causal LM on dialogues in the engine's format."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bot.training.data import Example, batches, collate


def dialogue_nll(
    model: Any, examples: Sequence[Example], device: Any, batch_tokens: int = 4096
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of scored tokens) over
    every labelled token of `examples`, the model in eval mode for the call."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    pad_id = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    with torch.no_grad():
        for group in batches(examples, batch_tokens, seed=0, shuffle=False):
            batch = {
                k: v.to(device) for k, v in collate([examples[i] for i in group], pad_id).items()
            }
            with _autocast(device):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            logits = logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((labels != -100).sum())
    model.train(was_training)
    return total, count


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")


def _autocast(device: Any) -> Any:
    import contextlib

    import torch

    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
