"""The dialogue format shared by the engine, training and evaluation.

Turns are joined by the tokenizer's EOS token, DialoGPT style:
`turn1 <eos> turn2 <eos> ... user_turn <eos>`, and the model continues with
the bot's turn up to its own EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_turn(tokenizer: Any, turn: str) -> list[int]:
    ids: list[int] = tokenizer(turn, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def encode_dialogue(tokenizer: Any, turns: Sequence[str], budget: int) -> list[int]:
    """Encode the newest turns that fit in `budget` tokens.

    Whole turns are dropped from the oldest; if the newest turn alone is too
    long, its last `budget` tokens are kept (the end of a message is what the
    reply answers).
    """
    kept: list[list[int]] = []
    used = 0
    for turn in reversed(turns):
        ids = encode_turn(tokenizer, turn)
        if used + len(ids) > budget:
            if not kept:
                kept.append(ids[-budget:])
            break
        kept.append(ids)
        used += len(ids)
    return [token for ids in reversed(kept) for token in ids]
