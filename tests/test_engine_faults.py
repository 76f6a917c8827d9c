"""The local engine when things go wrong or run long: a failing forward pass,
out of memory, a stream closed early, memory bounded by `kv_cache_mb`, and no
deprecated transformers API on the decode path."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import TextSection
from bot.engine_settings import local_engine_settings
from bot.engines import EngineUnavailable, final_text
from bot.engines.decoding import BatchDecoder, DecodeRequest
from bot.engines.text import LocalTextEngine
from bot.testing.tiny_models import sample_lines


@pytest.fixture
def start_engine(tiny_model_dir: Path) -> Callable[..., Any]:
    engines: list[LocalTextEngine] = []

    async def start(**values: Any) -> LocalTextEngine:
        settings = {
            "model": str(tiny_model_dir),
            "device": "cpu",
            "greedy": True,
            "max_new_tokens": 16,
            "stream_interval_ms": 0,
            **values,
        }
        engine = LocalTextEngine(local_engine_settings(TextSection(**settings)))
        await engine.start()
        engines.append(engine)
        return engine

    return start


def _fail_decode_once(engine: LocalTextEngine, error: BaseException) -> list[int]:
    runner = engine.decoder.runner
    original = runner.decode
    calls = [0]

    def decode(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise error
        return original(*args)

    runner.decode = decode  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("boom in the forward pass"),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
    ],
    ids=["exception", "cuda-oom", "cpu-oom"],
)
async def test_a_failing_forward_fails_its_batch_and_the_worker_lives_on(
    start_engine: Any, error: BaseException
) -> None:
    engine = await start_engine(max_new_tokens=8)
    try:
        expected = await engine.generate(["I like pizza today."])
        calls = _fail_decode_once(engine, error)
        together = [engine.generate([line]) for line in sample_lines(3)]
        results = await asyncio.gather(*together, return_exceptions=True)
        assert calls[0] >= 1 and engine.failures == 1
        assert all(isinstance(result, EngineUnavailable) for result in results), results
        assert "generation failed" in str(results[0])
        assert engine.ready
        assert await engine.generate(["I like pizza today."]) == expected  # the next ones work
    finally:
        await engine.close()


async def test_closing_a_stream_drops_its_row_at_the_next_step(
    start_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await start_engine(max_new_tokens=40, min_new_tokens=40, batch_wait_ms=200)
    requests: list[DecodeRequest] = []
    original = LocalTextEngine._request

    def spy(self: LocalTextEngine, pending: Any) -> DecodeRequest | None:
        request = original(self, pending)
        if request is not None:
            requests.append(request)
        return request

    monkeypatch.setattr(LocalTextEngine, "_request", spy)
    runner = engine.decoder.runner
    decode, gate, calls = runner.decode, threading.Event(), [0]

    def gated_decode(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # hold the batch until the test has closed its stream
            gate.wait(30)
        return decode(*args)

    runner.decode = gated_decode  # type: ignore[method-assign]

    async def collect(stream: Any) -> list[Any]:
        return [chunk async for chunk in stream]

    try:
        kept = asyncio.ensure_future(
            collect(engine.stream(["we watch cats a lot."], conversation="b"))
        )
        dropped = engine.stream(["you love music a lot."], conversation="a")
        first = await anext(aiter(dropped))
        assert not first.final
        await dropped.aclose()  # the user cancelled: the engine must let go
        gate.set()
        final = (await kept)[-1]
        assert final.final and final.tokens == 40
        cancelled = next(r for r in requests if r.cache_key == "a")
        assert cancelled.cancelled.is_set()
        assert len(cancelled.generated) <= 3  # dropped at the step after the close
        assert engine.decoder.step_rows < engine.decoder.steps * 2  # it did not ride along
        assert await engine.generate(["hello"]) is not None  # the engine is free
    finally:
        gate.set()
        await engine.close()


async def test_key_value_memory_stays_within_kv_cache_mb(start_engine: Any) -> None:
    engine = await start_engine(kv_cache_mb=1, max_batch_size=32, max_new_tokens=12)
    budget = 1 * 2**20
    try:
        runner = engine.decoder.runner
        assert runner.slots < 32  # the batch was cut to what the budget holds
        assert engine.kv_bytes <= budget
        lines = sample_lines(40)

        async def conversation(index: int) -> None:
            history: list[str] = []
            for turn in range(3):
                history.append(lines[(index * 7 + turn) % len(lines)])
                history.append(await engine.generate(history, conversation=f"c{index}") or "ok")
                assert engine.kv_bytes <= budget

        await asyncio.gather(*(conversation(index) for index in range(8)))
        cache = engine.prefix_cache
        assert cache is not None and cache.hits > 0  # the prefix cache was used...
        assert runner.nbytes + cache.bytes_used <= budget  # ...within what was left
        assert max(engine.batch_sizes) <= runner.slots
    finally:
        await engine.close()


async def test_min_new_tokens_makes_every_reply_that_long(start_engine: Any) -> None:
    engine = await start_engine(max_new_tokens=12, min_new_tokens=12)
    try:
        chunks = [chunk async for chunk in engine.stream(["hello"])]
        assert chunks[-1].tokens == 12
    finally:
        await engine.close()


async def test_decoding_uses_no_deprecated_transformers_api(start_engine: Any) -> None:
    """transformers 5.24 warns that `past_key_values` goes away in 5.40: the
    engine's decode path must not touch it (nor anything else deprecated)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = await start_engine()
        try:
            await engine.generate(["I like pizza today.", "and you?"], conversation="w")
            await engine.generate(
                ["I like pizza today.", "and you?", "ok", "more"], conversation="w"
            )
        finally:
            await engine.close()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "deprecat" in m.lower() or "removed in" in m], messages


def test_the_decoder_has_no_transformers_cache_objects() -> None:
    import bot.engines.decoding as decoding
    import bot.engines.gpt2 as gpt2

    for module in (decoding, gpt2):
        source = Path(module.__file__ or "").read_text(encoding="utf-8")
        assert "past_key_values" not in source and "DynamicCache" not in source
    assert BatchDecoder  # the decoder drives `Gpt2Runner` directly


async def test_a_prompt_already_cached_but_its_last_token_prefills_in_a_batch(
    start_engine: Any,
) -> None:
    """The same turns asked again (an answer recovered after a restart, a
    retried message) reuse all but their last token from the prefix cache:
    several such rows prefill together with one fresh token each. That
    batch once failed with a shape error, and every reply in it with it."""
    engine = await start_engine(batch_wait_ms=50)
    dialogues = [[line] for line in sample_lines(3)]
    first = [
        await final_text(engine, turns, conversation=f"c{i}") for i, turns in enumerate(dialogues)
    ]
    again = await asyncio.gather(
        *(final_text(engine, turns, conversation=f"c{i}") for i, turns in enumerate(dialogues))
    )
    assert list(again) == first  # greedy: the same answers, from the cached prefixes
