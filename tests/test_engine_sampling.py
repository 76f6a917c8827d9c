"""`BatchDecoder._sample`: EOS is impossible for rows below `min_new_tokens`
(all of a batch's rows, or some), and possible for the others."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bot.engines.decoding import BatchDecoder, DecodeRequest, _Row
from bot.engines.prefix_cache import PrefixCache
from bot.engines.settings import SamplingSettings

EOS, VOCAB = 3, 16


def _decoder(**sampling: object) -> BatchDecoder:
    runner = SimpleNamespace(slots=4, vocab=VOCAB, device=torch.device("cpu"))
    return BatchDecoder(
        runner,  # type: ignore[arg-type]
        tokenizer=None,
        eos_id=EOS,
        prefix_cache=PrefixCache(0),
        settings=SamplingSettings(**sampling),  # type: ignore[arg-type]
    )


def _rows(steps: list[int]) -> list[_Row]:
    rows = []
    for count in steps:
        row = _Row(DecodeRequest([1, 2], "", lambda text, done: None), [1, 2])
        row.steps = count
        rows.append(row)
    return rows


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_eos_waits_for_min_new_tokens_row_by_row(penalty: float) -> None:
    decoder = _decoder(greedy=True, min_new_tokens=6, repetition_penalty=penalty)
    logits = torch.zeros((4, VOCAB))
    logits[:, EOS] = 10.0  # EOS by far the likeliest
    logits[:, 7] = 1.0  # then token 7
    kept = logits.clone()
    assert decoder._sample(_rows([0, 5, 6, 10]), logits) == [7, 7, EOS, EOS]
    assert decoder._sample(_rows([0, 1, 2, 5]), logits) == [7, 7, 7, 7]  # all of them early
    assert decoder._sample(_rows([6, 7, 8, 9]), logits) == [EOS] * 4
    assert torch.equal(logits, kept)  # the runner's logits are left as they were


def test_without_min_new_tokens_eos_is_always_possible() -> None:
    decoder = _decoder(greedy=True)
    logits = torch.zeros((2, VOCAB))
    logits[:, EOS] = 10.0
    assert decoder._sample(_rows([0, 0]), logits) == [EOS, EOS]
