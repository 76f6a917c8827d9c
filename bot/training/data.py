"""Dialogue data: the chitchat corpus or the user's JSONL, split and tokenized.

A dialogue is a list of turns (strings) whose speakers alternate. It is encoded
exactly as the text engine encodes a prompt (`bot.engines.prompt.encode_turn`):
every turn followed by the tokenizer's EOS, so `t1 <eos> t2 <eos> ...`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.engines import EngineUnavailable

CHITCHAT = "chitchat"


class DataError(EngineUnavailable):
    """A dialogue file the user can fix; the message names the file and line."""


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def load_chitchat() -> list[list[str]]:
    """The Chit Chat Challenge corpus (PyPI `chitchat-dataset`, MIT).

    Consecutive messages of one speaker are merged into one turn, so turns
    alternate; conversations with a single speaker are dropped.
    """
    try:
        import chitchat_dataset
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise DataError(
            "the chitchat corpus needs the `chitchat-dataset` package: pip install chitchat-dataset"
        ) from exc
    with open(
        chitchat_dataset.ConversationDataset.__init__.__defaults__[0], encoding="utf-8"
    ) as fh:
        raw = json.load(fh)
    dialogues: list[list[str]] = []
    for key in sorted(raw):
        turns: list[str] = []
        speakers: list[str] = []
        for group in raw[key].get("messages", []):
            for message in group:
                text = _clean(message.get("text", ""))
                sender = message.get("sender", "")
                if not text:
                    continue
                if speakers and speakers[-1] == sender:
                    turns[-1] = f"{turns[-1]} {text}"
                else:
                    turns.append(text)
                    speakers.append(sender)
        if len(set(speakers)) >= 2 and len(turns) >= 2:
            dialogues.append(turns)
    return dialogues


def load_jsonl(path: str | Path) -> list[list[str]]:
    """One dialogue per line: `{"turns": ["hi", "hello!", ...]}`, speakers alternating.

    Blank lines are skipped; anything else that is not such an object raises
    `DataError` naming the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dialogue file")
    dialogues: list[list[str]] = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f'{where}: not valid JSON ({exc.msg}); expected {{"turns": [...]}}'
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("turns"), list):
                raise DataError(
                    f'{where}: expected an object with a "turns" list, '
                    'e.g. {"turns": ["hi", "hello!"]}'
                )
            turns = record["turns"]
            if not all(isinstance(turn, str) for turn in turns):
                raise DataError(f'{where}: every item of "turns" must be a string')
            turns = [_clean(turn) for turn in turns]
            if len(turns) < 2 or not all(turns):
                raise DataError(f"{where}: a dialogue needs at least two non-empty turns")
            dialogues.append(turns)
    if not dialogues:
        raise DataError(f"{path}: no dialogues in the file")
    return dialogues


def load_dialogues(source: str) -> list[list[str]]:
    return load_chitchat() if source == CHITCHAT else load_jsonl(source)


def split(
    dialogues: Sequence[list[str]], val_fraction: float, seed: int
) -> tuple[list[list[str]], list[list[str]]]:
    """(train, validation): a seeded shuffle of whole dialogues, so no
    conversation is in both. At least one dialogue goes to each side."""
    order = list(range(len(dialogues)))
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction))) if val_fraction > 0 else 0
    val = [dialogues[i] for i in order[:n_val]]
    train = [dialogues[i] for i in order[n_val:]]
    return train, val


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken


def encode_dialogues(
    tokenizer: Any, dialogues: Iterable[Sequence[str]], block_size: int, *, bot_only: bool = False
) -> list[Example]:
    """Cut each dialogue into windows of whole turns of at most `block_size`
    tokens (a single longer turn keeps its first `block_size` tokens).

    Loss is on every token of every turn, EOS included (that is how the model
    learns to stop), or with `bot_only` on the replies only: turns 2, 4, ...
    of each dialogue (the first turn is the user's).
    """
    examples: list[Example] = []
    # windows are cut below; silence the tokenizer's "longer than the maximum" warning
    saved_max, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)
    try:
        _encode_into(examples, tokenizer, dialogues, block_size, bot_only)
    finally:
        tokenizer.model_max_length = saved_max
    return examples


def _encode_into(
    examples: list[Example],
    tokenizer: Any,
    dialogues: Iterable[Sequence[str]],
    block_size: int,
    bot_only: bool,
) -> None:
    from bot.engines.prompt import encode_turn

    for dialogue in dialogues:
        ids: list[int] = []
        labels: list[int] = []
        prev_len = 0
        for index, turn in enumerate(dialogue):
            turn_ids = encode_turn(tokenizer, turn)[:block_size]
            if turn_ids[-1] != tokenizer.eos_token_id:
                turn_ids[-1] = tokenizer.eos_token_id
            turn_labels = [-100] * len(turn_ids) if bot_only and index % 2 == 0 else list(turn_ids)
            if ids and len(ids) + len(turn_ids) > block_size:
                if any(label != -100 for label in labels):
                    examples.append(Example(ids, labels))
                # the next window starts with the previous turn as context
                prev_start = len(ids) - prev_len
                ids, labels = ids[prev_start:], [-100] * prev_len
                if len(ids) + len(turn_ids) > block_size:
                    ids, labels = [], []
            ids += turn_ids
            labels += turn_labels
            prev_len = len(turn_ids)
        if any(label != -100 for label in labels) and len(ids) > 1:
            examples.append(Example(ids, labels))


def batches(
    examples: Sequence[Example], batch_tokens: int, seed: int, *, shuffle: bool = True
) -> list[list[int]]:
    """Indices of examples grouped by similar length, each batch holding at most
    `batch_tokens` tokens once padded; the batch order is shuffled by `seed`."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        length = len(examples[index].input_ids)
        if current and max(longest, length) * (len(current) + 1) > batch_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        groups.append(current)
    if shuffle:
        random.Random(seed).shuffle(groups)
    return groups


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
