"""Tiny models built locally in seconds, for tests and benchmarks (no download).

`build_tiny_gpt2(path)` trains a byte-level BPE on a few hundred synthetic
lines and saves an untrained 2-layer, 64-dim GPT-2 with it, loadable by the
text engine exactly like a real checkpoint.
"""

from __future__ import annotations

import itertools
from pathlib import Path

SUBJECTS = ["I", "you", "we", "my friend", "the weather", "the movie", "my dog", "this bot"]
VERBS = ["like", "love", "hate", "watch", "visit", "cook", "read about", "talk about"]
OBJECTS = ["pizza", "music", "the park", "old books", "coffee", "the news", "rainy days", "cats"]
ENDINGS = ["today.", "every day!", "sometimes?", "a lot.", "with friends.", "at night."]


def sample_lines(count: int = 400) -> list[str]:
    combos = itertools.product(SUBJECTS, VERBS, OBJECTS, ENDINGS)
    return [" ".join(parts) for parts in itertools.islice(combos, count)]


def build_tiny_gpt2(
    path: str | Path, *, n_positions: int = 512, seed: int = 0, train_steps: int = 40
) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sample_lines(),
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=n_positions,
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    if train_steps:
        _fit(model, tokenizer, train_steps)
    model.save_pretrained(path)
    return path


def _fit(model: object, tokenizer: object, steps: int) -> None:
    """A few optimiser steps on dialogue-formatted sample lines, so greedy
    decoding gives varied, multi-token replies that end with EOS."""
    import torch

    lines = sample_lines()
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    sequences = []
    for first, second in itertools.pairwise(lines[::7]):
        ids = tokenizer(first)["input_ids"] + [eos] + tokenizer(second)["input_ids"] + [eos]  # type: ignore[operator]
        sequences.append(ids)
    width = max(len(ids) for ids in sequences)
    batch = torch.full((len(sequences), width), eos)
    labels = torch.full((len(sequences), width), -100)
    for row, ids in enumerate(sequences):
        batch[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)  # type: ignore[attr-defined]
    model.train()  # type: ignore[attr-defined]
    for _ in range(steps):
        loss = model(input_ids=batch, labels=labels).loss  # type: ignore[operator]
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()  # type: ignore[attr-defined]
