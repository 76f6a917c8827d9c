"""A byte-level BPE tokenizer trained on the dialogues, saved in the GPT-2 layout."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

EOS = "<|endoftext|>"


def train_tokenizer(
    dialogues: Iterable[Sequence[str]], vocab_size: int, model_max_length: int
) -> Any:
    """Byte-level BPE (as GPT-2's) with one special token, `<|endoftext|>`,
    which is BOS, EOS, UNK and PAD. Byte-level means any text encodes."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        (turn for dialogue in dialogues for turn in dialogue),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,  # the documented way to wrap it
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
    )
