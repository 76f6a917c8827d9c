"""The CUDA path of the local engine (fp16, batching, prefix cache). Skipped
without a GPU; `bash bot/bench/gpu.sh` runs it on a machine that has one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import TextSection
from bot.engine_settings import local_engine_settings
from bot.engines import EngineUnavailable
from bot.engines.gpt2 import Gpt2Runner
from bot.engines.loading import load_causal_lm
from bot.engines.settings import ModelSource
from bot.engines.text import LocalTextEngine
from bot.testing.tiny_models import sample_lines

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _engine(model: Path, **values: Any) -> LocalTextEngine:
    settings = {"model": str(model), "device": "cuda", "greedy": True, "max_new_tokens": 16}
    settings.update(values)
    return LocalTextEngine(local_engine_settings(TextSection(**settings)))


def test_fp16_runner_matches_transformers_on_cuda(tiny_model_dir: Path) -> None:
    model, _, device = load_causal_lm(ModelSource(str(tiny_model_dir), "cuda"))
    assert device.type == "cuda" and next(model.parameters()).dtype == torch.float16
    ids = torch.randint(0, model.config.vocab_size, (20,)).tolist()
    runner = Gpt2Runner(model, slots=2, max_len=64, device=device)
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        logits = runner.prefill(0, [ids[:-1]], [0])[0].float()
        assert torch.allclose(logits, expected[-2], atol=2e-2, rtol=2e-2)
        step = runner.decode(
            torch.tensor([ids[-1]], device=device), torch.tensor([19], device=device)
        )
        assert torch.allclose(step[0].float(), expected[-1], atol=2e-2, rtol=2e-2)


async def test_batches_and_prefix_reuse_on_cuda(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, batch_wait_ms=50, kv_cache_mb=64)
    await engine.start()
    try:
        assert engine.device.type == "cuda"
        lines = sample_lines(8)
        replies = await asyncio.gather(
            *(engine.generate([line], conversation=f"c{i}") for i, line in enumerate(lines))
        )
        assert all(isinstance(reply, str) for reply in replies)
        assert max(engine.batch_sizes) > 1
        history = [lines[0], replies[0], "and then?"]
        await engine.generate(history, conversation="c0")
        cache = engine.prefix_cache
        assert cache is not None and cache.hits >= 1
        assert engine.kv_bytes <= 64 * 2**20
    finally:
        await engine.close()


async def test_int8_is_refused_on_cuda(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, quantize="int8")
    with pytest.raises(EngineUnavailable, match="CPU only"):
        await engine.start()
