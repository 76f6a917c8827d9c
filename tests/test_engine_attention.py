"""Each way a decode step can attend (`bot.engines.gpt2.DECODE_ATTENTION`) gives
transformers' logits, in fp32 and in bf16, with rows of different lengths and
rows joining in the same pass; and which way a CPU gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bot.engines import gpt2
from bot.engines.gpt2 import DECODE_ATTENTION, SDPA, SPAN, WHOLE_WIDTH, Gpt2Runner
from bot.engines.loading import load_causal_lm
from bot.engines.settings import ModelSource


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load_causal_lm(ModelSource(str(tiny_model_dir), "cpu"))[0]


@pytest.fixture(scope="module")
def bf16_model(tiny_model_dir: Path) -> Any:
    from bot.engines.linears import quantize_linears, runs_bf16

    fast = load_causal_lm(ModelSource(str(tiny_model_dir), "cpu"))[0]
    quantize_linears(fast, "bf16")
    if not runs_bf16(fast):
        pytest.skip(
            "no oneDNN bf16 products here: they need oneDNN in torch and a CPU "
            "with AVX-512 or AVX-NE-CONVERT"
        )
    return fast


def _reference(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(input_ids=torch.tensor([ids])).logits[0]
    return logits


def _close(logits: torch.Tensor, expected: torch.Tensor, *, bf16: bool) -> None:
    if not bf16:
        assert torch.allclose(logits, expected, atol=1e-4)
        return
    assert (logits - expected).abs().max() < 0.02 * expected.abs().max()
    variation = (logits.softmax(-1) - expected.softmax(-1)).abs().sum(-1) / 2
    assert variation.max() < 0.01


@pytest.mark.parametrize("way", DECODE_ATTENTION)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_every_decode_attention_matches_transformers(
    way: str, bf16: bool, model: Any, request: pytest.FixtureRequest
) -> None:
    """Three rows of different lengths decode three steps; in the second, two
    rows join (one after a cached prefix, one into a slot a longer row left its
    keys in) in the same pass. Every row's logits at every step are
    transformers' (to within bf16's error in bf16)."""
    runs = request.getfixturevalue("bf16_model") if bf16 else model
    torch.manual_seed(5)
    vocab = model.config.vocab_size
    running = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 41, 17)]
    joining = [torch.randint(0, vocab, (n,)).tolist() for n in (9, 30)]
    runner = Gpt2Runner(runs, slots=6, max_len=64, device=torch.device("cpu"))
    runner.decode_attention = way
    with torch.inference_mode():
        runner.prefill(3, [torch.randint(0, vocab, (50,)).tolist()], [0])  # stale keys
        runner.prefill(0, running, [0, 0, 0])
        runner.prefill(4, [joining[1][:20]], [0])  # the second newcomer's cached prefix
        rows = [list(ids) for ids in running]
        for step in range(3):
            prefills: list[gpt2.Prefill] = (
                [(3, [joining[0]], [0]), (4, [joining[1][20:]], [20])] if step == 1 else []
            )
            fed = [(7 + 5 * index + step) % vocab for index in range(len(rows))]
            logits = runner.decode(
                torch.tensor(fed), torch.tensor([len(ids) for ids in rows]), prefills
            )
            rows = [[*ids, token] for ids, token in zip(rows, fed, strict=True)]
            if prefills:
                rows += [list(ids) for ids in joining]
            assert logits.shape == (len(rows), vocab)
            for index, ids in enumerate(rows):
                _close(logits[index], _reference(model, ids)[-1], bf16=bf16)


def test_a_cpu_without_amx_attends_over_the_whole_width_in_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(gpt2, "amx_available", lambda: False)
    assert gpt2.decode_attention(cpu, half=True) == WHOLE_WIDTH
    assert gpt2.decode_attention(cpu, half=False) == SPAN
    assert gpt2.decode_attention(cuda, half=False) == SDPA
    monkeypatch.setattr(gpt2, "amx_available", lambda: True)
    assert gpt2.decode_attention(cpu, half=True) == SDPA
    assert gpt2.decode_attention(cpu, half=False) == SPAN


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "fast"),
    [(True, True, True), (False, True, True), (True, False, True), (False, False, False)],
)
def test_bf16_counts_as_fast_with_amx_or_avx512_bf16(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, fast: bool
) -> None:
    from bot.engines import linears

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert linears.amx_available() is amx
    assert linears.bf16_is_fast() is fast
