"""The dialogue format shared by the engine, training and evaluation.

Turns are joined by the tokenizer's EOS token, DialoGPT style:
`turn1 <eos> turn2 <eos> ... user_turn <eos>`, and the model continues with
the bot's turn up to its own EOS.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: On average, how many turns lie between two possible prompt starts.
ANCHOR_EVERY = 4


def encode_turn(tokenizer: Any, turn: str) -> list[int]:
    ids: list[int] = tokenizer(turn, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def is_anchor(turn: str, every: int) -> bool:
    """About one turn in `every` is an anchor, decided by its content alone."""
    return zlib.crc32(turn.encode("utf-8", "replace")) % every == 0


def encode_dialogue(
    tokenizer: Any, turns: Sequence[str], budget: int, *, anchor_every: int = ANCHOR_EVERY
) -> list[int]:
    """The prompt's token ids: `fit_dialogue` with the tokenizer's turns."""
    return fit_dialogue(
        turns, budget, lambda turn: encode_turn(tokenizer, turn), anchor_every=anchor_every
    )


def fit_dialogue(
    turns: Sequence[str],
    budget: int,
    encode: Callable[[str], list[T]],
    *,
    anchor_every: int = ANCHOR_EVERY,
) -> list[T]:
    """The newest turns that fit in `budget` units, each turn `encode(turn)`
    (a list of units, e.g. token ids ending with EOS), concatenated.

    Whole turns are dropped from the oldest; if the newest turn alone is too
    long, its last `budget` tokens are kept (the end of a message is what the
    reply answers).

    Once history no longer fits, the prompt starts at the oldest *anchor* turn
    that fits rather than at the oldest turn that fits. That start stays put
    while the conversation grows (until it no longer fits), so the next turns'
    prompts share their beginning and the engine can reuse its cached keys and
    values, instead of every turn shifting the window and recomputing it all.
    Anchors are chosen by content (a checksum, as in rsync's chunking), so the
    choice does not depend on how much history the caller loaded.
    """
    used = 0
    kept: list[tuple[str, list[T]]] = []
    for turn in reversed(turns):
        ids = encode(turn)
        if used + len(ids) > budget:
            if not kept:
                return ids[-budget:]
            break
        kept.append((turn, ids))
        used += len(ids)
    kept.reverse()
    if len(kept) < len(turns) and anchor_every > 1:
        for index, (turn, _) in enumerate(kept[:-1]):
            if is_anchor(turn, anchor_every):
                kept = kept[index:]
                break
    return [token for _, ids in kept for token in ids]
