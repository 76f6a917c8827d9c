"""The lean GPT-2 forward pass against transformers' own, on the tiny model:
prefill, decode, rows of different lengths in one batch, a cached prefix
loaded into a slot, a slot moved, and the int8 layers."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.engines import EngineUnavailable
from bot.engines.gpt2 import Gpt2Runner
from bot.engines.linears import Int8Conv1D, quantize_int8
from bot.engines.loading import load_causal_lm
from bot.engines.settings import ModelSource

ATOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load_causal_lm(ModelSource(str(tiny_model_dir), "cpu"))[0]


def _reference(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(input_ids=torch.tensor([ids])).logits[0]
    return logits


def test_prefill_and_decode_match_transformers(model: Any) -> None:
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    rows = [torch.randint(0, vocab, (n,)).tolist() for n in (3, 30, 11)]
    runner = Gpt2Runner(model, slots=4, max_len=64, device=torch.device("cpu"))
    with torch.inference_mode():
        logits = runner.prefill(0, [ids[:-2] for ids in rows], [0, 0, 0])
        for index, ids in enumerate(rows):
            expected = _reference(model, ids)
            assert torch.allclose(logits[index], expected[len(ids) - 3], atol=ATOL)
        for step in (2, 1):
            tokens = torch.tensor([ids[-step] for ids in rows])
            positions = torch.tensor([len(ids) - step for ids in rows])
            logits = runner.decode(tokens, positions)
            for index, ids in enumerate(rows):
                assert torch.allclose(logits[index], _reference(model, ids)[-step], atol=ATOL)


def test_a_cached_prefix_and_a_moved_slot_give_the_same_logits(model: Any) -> None:
    ids = torch.randint(0, model.config.vocab_size, (24,)).tolist()
    runner = Gpt2Runner(model, slots=3, max_len=64, device=torch.device("cpu"))
    with torch.inference_mode():
        runner.prefill(0, [ids[:16]], [0])
        prefix = runner.export(0, 16)
        assert prefix.shape[:2] == (model.config.n_layer, 2) and prefix.shape[-2] == 16
        runner.load(2, prefix)
        logits = runner.prefill(2, [ids[16:]], [16])
        assert torch.allclose(logits[0], _reference(model, ids)[-1], atol=ATOL)
        runner.move(2, 0, len(ids))
        logits = runner.decode(torch.tensor([5]), torch.tensor([len(ids)]))
        assert torch.allclose(logits[0], _reference(model, [*ids, 5])[-1], atol=ATOL)


def test_int8_layers_stay_close_to_fp32(tiny_model_dir: Path, model: Any) -> None:
    quantized = load_causal_lm(ModelSource(str(tiny_model_dir), "cpu"))[0]
    assert quantize_int8(quantized) == 4 * model.config.n_layer
    assert any(isinstance(module, Int8Conv1D) for module in quantized.modules())
    ids = torch.randint(0, model.config.vocab_size, (20,)).tolist()
    runner = Gpt2Runner(quantized, slots=1, max_len=32, device=torch.device("cpu"))
    with torch.inference_mode():
        logits = runner.prefill(0, [ids], [0])[0]
    expected = _reference(model, ids)[-1]
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.allclose(logits, _reference(quantized, ids)[-1], atol=ATOL)


def test_other_architectures_are_refused_with_the_key_to_change() -> None:
    class Other:
        config = None

    with pytest.raises(EngineUnavailable, match="GPT-2-family"):
        Gpt2Runner(Other(), slots=1, max_len=8, device=torch.device("cpu"))


def test_prefill_groups_rows_of_similar_length() -> None:
    from bot.engines.decoding import _length_groups

    assert _length_groups([5]) == [(0, 1)]
    assert _length_groups([10, 12, 15, 20]) == [(0, 4)]  # little padding: one pass
    # 30 cached rows with a few new tokens and 2 that missed their cache
    lengths = [8] * 30 + [200, 210]
    assert _length_groups(lengths) == [(0, 30), (30, 32)]
    for groups in (_length_groups(lengths), _length_groups(list(range(1, 300, 7)))):
        assert groups[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(groups))


def test_bf16_linears_stay_close_to_fp32(tiny_model_dir: Path, model: Any) -> None:
    from bot.engines.linears import Bf16Conv1D, quantize_linears

    fast = load_causal_lm(ModelSource(str(tiny_model_dir), "cpu"))[0]
    assert quantize_linears(fast, "bf16") == 4 * model.config.n_layer
    assert any(isinstance(module, Bf16Conv1D) for module in fast.modules())
    ids = torch.randint(0, model.config.vocab_size, (20,)).tolist()
    runner = Gpt2Runner(fast, slots=1, max_len=32, device=torch.device("cpu"))
    with torch.inference_mode():
        logits = runner.prefill(0, [ids], [0])[0]
    expected = _reference(model, ids)[-1]
    assert logits.dtype == torch.float32  # computed in bf16, handed back in fp32
    assert (logits - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.fixture(scope="module")
def bf16_model(tiny_model_dir: Path) -> Any:
    from bot.engines.linears import quantize_linears

    fast = load_causal_lm(ModelSource(str(tiny_model_dir), "cpu"))[0]
    quantize_linears(fast, "bf16")
    return fast


def _close(logits: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 logits against fp32 ones: within 2% of the largest, and the same
    distribution to within a total variation of 1%."""
    assert (logits - expected).abs().max() < 0.02 * expected.abs().max()
    variation = (logits.softmax(-1) - expected.softmax(-1)).abs().sum(-1) / 2
    assert variation.max() < 0.01


def test_bf16_runner_computes_in_bf16_and_stays_close_to_fp32(model: Any, bf16_model: Any) -> None:
    """Prefill and decode with bf16 products, attention and cache (what
    text.quantize = "auto" runs on a CPU with AMX): the logits of rows of
    different lengths in one batch stay close to transformers' fp32 ones."""
    from bot.engines.linears import runs_bf16

    if not runs_bf16(bf16_model):
        pytest.skip(
            "no oneDNN bf16 products here: they need oneDNN in torch and a CPU "
            "with AVX-512 or AVX-NE-CONVERT"
        )
    torch.manual_seed(1)
    vocab = model.config.vocab_size
    rows = [torch.randint(0, vocab, (n,)).tolist() for n in (3, 30, 11)]
    runner = Gpt2Runner(bf16_model, slots=4, max_len=64, device=torch.device("cpu"))
    assert runner.half and runner.keys.dtype == torch.bfloat16
    assert runner.nbytes == 4 * Gpt2Runner.slot_bytes(bf16_model, 64)  # half an fp32 slot
    with torch.inference_mode():
        logits = runner.prefill(0, [ids[:-2] for ids in rows], [0, 0, 0])
        assert logits.dtype == torch.float32
        for index, ids in enumerate(rows):
            _close(logits[index], _reference(model, ids)[len(ids) - 3])
        for step in (2, 1):
            tokens = torch.tensor([ids[-step] for ids in rows])
            positions = torch.tensor([len(ids) - step for ids in rows])
            logits = runner.decode(tokens, positions)
            for index, ids in enumerate(rows):
                _close(logits[index], _reference(model, ids)[-step])


def test_bf16_cached_prefix_moved_slot_and_batch_stay_close(model: Any, bf16_model: Any) -> None:
    """The bf16 cache exported, loaded into another slot and moved gives the
    logits recomputation gives; a row decoded in a batch stays close to the
    same row decoded alone."""
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (24,)).tolist()
    runner = Gpt2Runner(bf16_model, slots=3, max_len=64, device=torch.device("cpu"))
    with torch.inference_mode():
        runner.prefill(0, [ids[:16]], [0])
        prefix = runner.export(0, 16)
        assert prefix.dtype == runner.keys.dtype
        runner.load(2, prefix)
        logits = runner.prefill(2, [ids[16:]], [16])
        _close(logits[0], _reference(model, ids)[-1])
        runner.move(2, 0, len(ids))
        alone = runner.decode(torch.tensor([5]), torch.tensor([len(ids)]))[0]
        _close(alone, _reference(model, [*ids, 5])[-1])
        other = torch.randint(0, model.config.vocab_size, (40,)).tolist()
        runner.move(0, 1, len(ids) + 1)
        runner.prefill(0, [other], [0])  # a longer row in slot 0, ours in slot 1
        batch = runner.decode(torch.tensor([7, 9]), torch.tensor([40, len(ids) + 1]))
        _close(batch[1], _reference(model, [*ids, 5, 9])[-1])


def test_a_decode_step_with_prefills_in_the_same_pass(model: Any) -> None:
    """Rows joining a running batch are prefilled in the decode step's pass:
    each row's logits are those of transformers, the decoding rows' and the
    joining rows' (two groups of different widths, one of them after a cached
    prefix) alike."""
    torch.manual_seed(3)
    vocab = model.config.vocab_size
    running = [torch.randint(0, vocab, (n,)).tolist() for n in (9, 20)]
    joining = [torch.randint(0, vocab, (n,)).tolist() for n in (4, 6, 17)]
    runner = Gpt2Runner(model, slots=5, max_len=64, device=torch.device("cpu"))
    with torch.inference_mode():
        runner.prefill(0, [ids[:-1] for ids in running], [0, 0])
        runner.prefill(4, [joining[2][:10]], [0])  # a cached prefix of the third newcomer
        logits = runner.decode(
            torch.tensor([ids[-1] for ids in running]),
            torch.tensor([len(ids) - 1 for ids in running]),
            [(2, joining[:2], [0, 0]), (4, [joining[2][10:]], [10])],
        )
    assert logits.shape == (5, vocab)
    for index, ids in enumerate(running + joining):
        assert torch.allclose(logits[index], _reference(model, ids)[-1], atol=ATOL)


def test_padded_token_counts_are_few_and_close() -> None:
    """oneDNN compiles a kernel per row count: a pass's tokens are rounded up
    to one of a few sizes, never by more than an eighth."""
    from bot.engines.gpt2 import _padded

    sizes = [_padded(tokens) for tokens in range(1, 8193)]
    assert sizes[:64] == list(range(1, 65))  # decode steps run as they are
    assert all(size >= tokens and size <= tokens * 1.125 for tokens, size in enumerate(sizes, 1))
    assert sizes == sorted(sizes) and len(set(sizes)) < 130


def test_a_padded_bf16_pass_with_prefills_stays_close(model: Any, bf16_model: Any) -> None:
    """A bf16 pass of more than 64 tokens is padded: the padding rows change
    nothing in the real rows' logits or cache."""
    torch.manual_seed(4)
    vocab = model.config.vocab_size
    running = [torch.randint(0, vocab, (n,)).tolist() for n in (9, 20)]
    joining = [torch.randint(0, vocab, (n,)).tolist() for n in (37, 33)]  # 2 + 74 tokens
    runner = Gpt2Runner(bf16_model, slots=4, max_len=64, device=torch.device("cpu"))
    with torch.inference_mode():
        runner.prefill(0, [ids[:-1] for ids in running], [0, 0])
        logits = runner.decode(
            torch.tensor([ids[-1] for ids in running]),
            torch.tensor([len(ids) - 1 for ids in running]),
            [(2, joining, [0, 0])],
        )
        for index, ids in enumerate(running + joining):
            _close(logits[index], _reference(model, ids)[-1])
        step = runner.decode(torch.tensor([3] * 4), torch.tensor([9, 20, 37, 33]))
        for index, ids in enumerate(running + joining):
            _close(step[index], _reference(model, [*ids, 3])[-1])
