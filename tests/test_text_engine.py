"""The local text engine on the tiny GPT-2: batching, streaming, prefix reuse,
the prompt budget, cleaning and the errors a user can fix."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.config import TextSection
from bot.engine_settings import local_engine_settings
from bot.engines import EngineUnavailable
from bot.engines.decoding import BatchDecoder
from bot.engines.prompt import encode_dialogue, encode_turn
from bot.engines.settings import LocalEngineSettings
from bot.engines.text import LocalTextEngine
from bot.testing.tiny_models import sample_lines


def engine_settings(**values: Any) -> LocalEngineSettings:
    return local_engine_settings(TextSection(**values))


@pytest.fixture
def text_config(tiny_model_dir: Path) -> Callable[..., LocalEngineSettings]:
    """fp32 unless a test asks otherwise: several tests check that a row decodes
    exactly as it does alone, which holds in fp32; in bf16 (what "auto" picks on
    a CPU with AMX) a batch can change a kernel's accumulation order and flip a
    near-tie of greedy decoding (tests/test_engine_gpt2.py bounds that
    difference)."""

    def factory(**values: Any) -> LocalEngineSettings:
        settings = {
            "model": str(tiny_model_dir),
            "device": "cpu",
            "greedy": True,
            "max_new_tokens": 16,
            "stream_interval_ms": 0,
            "quantize": "none",
        }
        settings.update(values)
        return engine_settings(**settings)

    return factory


@pytest.fixture
async def engine(text_config: Callable[..., LocalEngineSettings]):
    running = LocalTextEngine(text_config(batch_wait_ms=50))
    await running.start()
    yield running
    await running.close()


PROMPTS = [
    f"my dog {verb} coffee" for verb in ("likes", "loves", "hates", "watches", "reads about")
]


async def test_replies_are_clean(engine: LocalTextEngine) -> None:
    reply = await engine.generate(["I like pizza today."])
    assert reply and reply == reply.strip() and "  " not in reply
    assert "<|endoftext|>" not in reply
    assert "I like pizza today." not in reply  # no prompt echo


async def test_stream_grows_then_ends_with_the_final_reply(engine: LocalTextEngine) -> None:
    parts = [part async for part in engine.stream(["you love music a lot."])]
    assert parts[-1].final and all(not part.final for part in parts[:-1])
    for earlier, later in itertools.pairwise(parts):
        assert later.text.startswith(earlier.text.rstrip()[:-1] if earlier.text else "")


async def test_the_final_chunk_is_empty_when_the_model_says_nothing(
    engine: LocalTextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No product copy in the engine: the manager substitutes its fallback reply."""
    eos = engine.tokenizer.eos_token_id
    monkeypatch.setattr(
        BatchDecoder,
        "_next_tokens",
        lambda self, logits: logits.new_full((logits.shape[0],), eos).long(),
    )
    chunks = [chunk async for chunk in engine.stream(["hello"])]
    assert [(c.text, c.final, c.tokens) for c in chunks] == [("", True, 0)]


async def test_the_final_chunk_counts_the_tokens_of_the_reply(engine: LocalTextEngine) -> None:
    chunks = [chunk async for chunk in engine.stream(["I like pizza today."])]
    final = chunks[-1]
    assert final.final and 0 < final.tokens <= 16
    assert all(chunk.tokens == 0 for chunk in chunks[:-1])


async def test_the_final_chunk_counts_the_prompt_as_fitted_to_the_budget(
    text_config: Callable[..., LocalEngineSettings],
) -> None:
    """What the bench reports as prompt tokens: the engine's own count, so the
    event loop does not tokenize every prompt a second time."""
    running = LocalTextEngine(text_config(max_history_tokens=40))
    await running.start()
    try:
        turns = [f"turn number {n} says something about dogs and coffee" for n in range(12)]
        fitted = encode_dialogue(running.tokenizer, turns, running.prompt_budget)
        assert len(fitted) < sum(len(encode_turn(running.tokenizer, t)) for t in turns)
        chunks = [chunk async for chunk in running.stream(turns)]
        assert chunks[-1].prompt_tokens == len(fitted)
        assert all(chunk.prompt_tokens == 0 for chunk in chunks[:-1])
    finally:
        await running.close()


async def test_concurrent_requests_are_batched_and_each_gets_its_own_reply(
    engine: LocalTextEngine,
) -> None:
    alone = [await engine.generate([prompt]) for prompt in PROMPTS]
    together = await asyncio.gather(*(engine.generate([prompt]) for prompt in PROMPTS))
    assert list(together) == alone
    assert max(engine.batch_sizes) > 1


async def test_the_model_runs_on_the_worker_thread_not_the_event_loop(
    engine: LocalTextEngine,
) -> None:
    threads: set[str] = set()
    runner = engine.decoder.runner
    original = runner.decode

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return original(*args, **kwargs)

    runner.decode = spy  # type: ignore[method-assign]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await engine.generate(["I like pizza today."])
    task.cancel()
    assert threads == {"text-engine"}
    assert ticks > 1  # the loop kept running while the model worked


async def _conversation(engine: LocalTextEngine, turns: int, key: str) -> list[str]:
    history: list[str] = []
    replies = []
    for index in range(turns):
        history.append(f"we {('like', 'watch', 'cook', 'visit')[index % 4]} pizza today. {index}")
        reply = await engine.generate(history, conversation=key)
        replies.append(reply)
        history.append(reply)
    return replies


async def test_prefix_reuse_gives_the_same_replies_as_recomputation(
    text_config: Callable[..., LocalEngineSettings],
) -> None:
    results = {}
    for cache_mb in (0, 32):
        running = LocalTextEngine(text_config(kv_cache_mb=cache_mb))
        await running.start()
        try:
            results[cache_mb] = await _conversation(running, 6, "conv-1")
            cache = running.prefix_cache
            if cache_mb:
                assert cache.hits >= 5 and cache.reused_tokens > 0
            else:
                assert cache.hits == 0
        finally:
            await running.close()
    assert results[0] == results[32]


async def test_prefix_reuse_is_correct_when_history_is_truncated(
    text_config: Callable[..., LocalEngineSettings],
) -> None:
    results = {}
    for cache_mb in (0, 32):
        running = LocalTextEngine(text_config(kv_cache_mb=cache_mb, max_history_tokens=40))
        await running.start()
        try:
            results[cache_mb] = await _conversation(running, 8, "conv-2")
        finally:
            await running.close()
    assert results[0] == results[32]


async def test_prefix_reuse_mixed_with_fresh_rows_in_one_batch(
    text_config: Callable[..., LocalEngineSettings],
) -> None:
    """A batch holding a cached conversation and new ones decodes each row as if alone."""
    reference = LocalTextEngine(text_config(kv_cache_mb=0))
    await reference.start()
    expected = [
        await reference.generate(["hello there", "I like pizza today.", p]) for p in PROMPTS
    ]
    await reference.close()

    running = LocalTextEngine(text_config(kv_cache_mb=32, batch_wait_ms=100))
    await running.start()
    try:
        # Warm the cache for conversation 0 only.
        await running.generate(["hello there", "I like pizza today."], conversation="c0")
        got = await asyncio.gather(
            *(
                running.generate(["hello there", "I like pizza today.", p], conversation=f"c{i}")
                for i, p in enumerate(PROMPTS)
            )
        )
        assert running.prefix_cache.hits >= 1
    finally:
        await running.close()
    assert list(got) == expected


def test_prompt_never_exceeds_the_budget_with_a_200_turn_history(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    turns = [f"turn {i}: my friend likes old books with friends." for i in range(200)]
    for budget in (16, 64, 200, 500):
        ids = encode_dialogue(tokenizer, turns, budget)
        assert 0 < len(ids) <= budget
        assert ids[-1] == tokenizer.eos_token_id
    ids = encode_dialogue(tokenizer, turns, 200)
    last = encode_turn(tokenizer, turns[-1])
    assert ids[-len(last) :] == last  # the newest turn is whole
    assert tokenizer.decode(ids).startswith("turn ")  # cut at a turn boundary


def test_one_huge_turn_keeps_its_end(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode_dialogue(tokenizer, ["cats " * 500 + "the end"], 32)
    assert len(ids) == 32 and "the end" in tokenizer.decode(ids)


async def test_manager_prompt_fits_the_budget_after_200_turns(
    running_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.engines import text as text_module
    from bot.messages import Incoming

    lengths: list[int] = []
    original = text_module.fit_dialogue

    def spy(turns: Any, budget: int, encode: Any) -> list[int]:
        ids = original(turns, budget, encode)
        lengths.append(len(ids))
        return ids

    monkeypatch.setattr(text_module, "fit_dialogue", spy)
    store = running_app.store
    for i in range(100):
        stored = (
            await store.conversations.add_user_message(
                platform="console",
                chat_id="c",
                owner="u",
                user_id="u",
                user_name="u",
                text=f"message {i} " * 3,
            )
        ).message
        await store.conversations.add_bot_message(
            reply_to=stored, platform="console", user_id="u", text=f"reply {i} " * 3
        )
    incoming = Incoming("console", "c", "u", "u", "and now?")
    [reply async for reply in running_app.manager.handle(incoming)]
    budget = running_app.engine.prompt_budget
    assert lengths and lengths[-1] <= budget
    assert lengths[-1] > budget // 2  # the budget is used, not just the last turn


async def test_cancelled_requests_are_dropped_and_the_worker_goes_on(
    engine: LocalTextEngine,
) -> None:
    stream = engine.stream(["I like pizza today."])
    await anext(aiter(stream))
    await stream.aclose()
    assert await engine.generate(["you love music a lot."])


async def test_a_missing_local_model_names_the_key_and_the_fix(tmp_path: Path) -> None:
    engine = LocalTextEngine(engine_settings(model=str(tmp_path / "no-such-model")))
    with pytest.raises(
        EngineUnavailable, match=r"text\.model .* does not exist: train .*aigc-bot train"
    ):
        await engine.start()


async def test_a_hub_id_without_network_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = LocalTextEngine(engine_settings(model="someone/some-dialogue-model"))
    with pytest.raises(
        EngineUnavailable, match=r"text\.model 'someone/some-dialogue-model' could not be loaded"
    ):
        await engine.start()


async def test_cuda_requested_without_a_gpu_is_a_clear_error(
    text_config: Callable[..., LocalEngineSettings],
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    engine = LocalTextEngine(text_config(device="cuda"))
    with pytest.raises(EngineUnavailable, match=r"text\.device is 'cuda'"):
        await engine.start()


async def test_partial_texts_are_throttled(text_config: Callable[..., LocalEngineSettings]) -> None:
    running = LocalTextEngine(text_config(stream_interval_ms=60_000))
    await running.start()
    try:
        parts = [part async for part in running.stream(["you love music a lot."])]
    finally:
        await running.close()
    # The first partial goes out at once, then nothing until the final reply.
    assert len(parts) <= 2 and parts[-1].final


@pytest.mark.parametrize("settings", [{"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-4}])
async def test_sampling_at_its_limits_is_greedy(
    text_config: Callable[..., LocalEngineSettings], settings: dict[str, Any]
) -> None:
    greedy = LocalTextEngine(text_config())
    sampled = LocalTextEngine(text_config(greedy=False, **settings))
    replies = []
    for running in (greedy, sampled):
        await running.start()
        try:
            replies.append([await running.generate([prompt]) for prompt in PROMPTS])
        finally:
            await running.close()
    assert replies[0] == replies[1]


async def test_prefix_reuse_goes_on_after_history_outgrows_the_budget(
    text_config: Callable[..., LocalEngineSettings],
) -> None:
    running = LocalTextEngine(text_config(kv_cache_mb=32, max_history_tokens=60))
    await running.start()
    try:
        await _conversation(running, 24, "long")
        cache = running.prefix_cache
        assert cache.hits >= 16  # most turns reuse, even though most were truncated
    finally:
        await running.close()


def test_a_truncated_prompt_keeps_its_start_while_the_conversation_grows(
    tiny_model_dir: Path,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lines = sample_lines()
    turns = [f"turn {i}: {lines[(i * 37) % len(lines)]}" for i in range(120)]

    def start_changes(anchor_every: int) -> int:
        starts = []
        for end in range(41, 121, 2):  # a user turn, then the bot's, and so on
            ids = encode_dialogue(tokenizer, turns[:end], 200, anchor_every=anchor_every)
            assert len(ids) <= 200
            starts.append(tokenizer.decode(ids).split(":")[0])
        return sum(a != b for a, b in itertools.pairwise(starts))

    # Without anchors the start moves with every turn; with them, in jumps.
    assert start_changes(1) >= 35
    assert start_changes(4) <= 0.6 * start_changes(1)
    anchored = encode_dialogue(tokenizer, turns, 200)
    plain = encode_dialogue(tokenizer, turns, 200, anchor_every=1)
    assert len(plain) >= len(anchored) > 200 // 2  # the price: a little less context


# -- continuous batching ---------------------------------------------------------


def _without_eos(monkeypatch: pytest.MonkeyPatch, eos: int) -> None:
    """Every reply runs to max_new_tokens, so batches overlap predictably."""
    original = BatchDecoder._next_tokens

    def next_tokens(self: BatchDecoder, logits: Any) -> Any:
        logits = logits.clone()
        logits[:, eos] = float("-inf")
        return original(self, logits)

    monkeypatch.setattr(BatchDecoder, "_next_tokens", next_tokens)


async def test_latecomers_join_a_running_batch_and_it_stays_narrow(
    engine: LocalTextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests admitted between steps get exactly the replies they get alone,
    and a batch that lives on as rows come and go never attends over more than
    its longest row (each row lives at its own positions in its own slot)."""
    from bot.engines.decoding import DecodeRequest
    from bot.engines.gpt2 import Gpt2Runner
    from bot.engines.prefix_cache import PrefixCache
    from bot.engines.settings import SamplingSettings

    tokenizer, eos = engine.tokenizer, engine.tokenizer.eos_token_id
    _without_eos(monkeypatch, eos)
    settings = SamplingSettings(
        max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.2, greedy=True
    )
    runner = Gpt2Runner(engine.model, slots=4, max_len=128, device=engine.device)
    decoder = BatchDecoder(
        runner, tokenizer, eos_id=eos, prefix_cache=PrefixCache(0), settings=settings
    )
    prompts = [encode_dialogue(tokenizer, [line], 64) for line in sample_lines(12)]

    def request(ids: list[int], into: dict[int, str], key: int) -> DecodeRequest:
        return DecodeRequest(ids, "", lambda text, done: into.__setitem__(key, text) if done else 0)

    alone: dict[int, str] = {}
    for key, ids in enumerate(prompts):
        decoder.run([request(ids, alone, key)])

    widths: list[int] = []
    decode = runner.decode

    def spy(tokens: Any, positions: Any, prefills: Any = ()) -> Any:
        widths.append(int(positions.max()) + 1)  # the keys one step attends over
        return decode(tokens, positions, prefills)

    monkeypatch.setattr(runner, "decode", spy)
    together: dict[int, str] = {}
    waiting = list(enumerate(prompts))[1:]
    calls = 0

    def admit(room: int) -> list[DecodeRequest]:
        nonlocal calls
        calls += 1
        if calls % 7 or not waiting:  # one newcomer every 7 steps
            return []
        key, ids = waiting.pop(0)
        return [request(ids, together, key)]

    decoder.run([request(prompts[0], together, 0)], admit=admit)

    assert together == alone
    assert decoder.joined == len(prompts) - 1
    assert decoder.step_rows > decoder.steps  # rows really shared steps
    longest_row = max(len(ids) for ids in prompts) + settings.max_new_tokens
    assert max(widths) <= longest_row


async def test_a_request_queued_mid_batch_joins_it_through_the_engine(
    engine: LocalTextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_eos(monkeypatch, engine.tokenizer.eos_token_id)
    alone = await engine.generate([PROMPTS[1]])
    joined = engine.decoder.joined
    first = engine.stream([PROMPTS[0]])
    await anext(aiter(first))  # the first request is decoding now
    latecomer = await engine.generate([PROMPTS[1]])
    async for _ in first:
        pass
    assert latecomer == alone
    assert engine.decoder.joined == joined + 1


async def test_a_bf16_engine_keeps_its_keys_in_bf16_and_reuses_them(
    text_config: Callable[..., LocalEngineSettings],
) -> None:
    """text.quantize = "bf16": the batch's cache and the prefix cache hold bf16
    keys/values (half the bytes), and a conversation's next turn reuses them."""
    import torch

    from bot.engines.linears import runs_bf16

    running = LocalTextEngine(text_config(quantize="bf16", kv_cache_mb=32))
    await running.start()
    try:
        runner = running.decoder.runner
        if not runs_bf16(running.model):
            pytest.skip(
                "no oneDNN bf16 products here: they need oneDNN in torch and a CPU "
                "with AVX-512 or AVX-NE-CONVERT"
            )
        assert runner.half and runner.keys.dtype == torch.bfloat16
        first = await running.generate(["hello there"], conversation="c")
        second = await running.generate(["hello there", first, "and you?"], conversation="c")
        assert first and second
        cache = running.prefix_cache
        assert cache is not None and cache.hits == 1
        assert running.kv_bytes == runner.nbytes + cache.bytes_used
    finally:
        await running.close()


async def test_the_engine_sets_the_gil_switch_interval(
    text_config: Callable[..., LocalEngineSettings],
) -> None:
    """text.gil_switch_interval_ms applies to the process once the model is
    loaded; 0 leaves Python's own."""
    import sys

    before = sys.getswitchinterval()
    try:
        for value, expected in ((0.5, 0.0005), (0.0, 0.0005)):
            running = LocalTextEngine(text_config(gil_switch_interval_ms=value))
            await running.start()
            await running.close()
            assert sys.getswitchinterval() == pytest.approx(expected)
    finally:
        sys.setswitchinterval(before)


async def test_the_worker_remembers_turns_it_has_encoded(
    engine: LocalTextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversation's next prompt repeats its earlier turns: the worker
    tokenizes each turn once (a bounded memory, least recently used out), and
    the prompt is still the one `encode_dialogue` builds."""
    import bot.engines.text as text
    import bot.engines.worker as worker

    encoded: list[str] = []

    def counting(tokenizer: Any, turn: str) -> list[int]:
        encoded.append(turn)
        return encode_turn(tokenizer, turn)

    monkeypatch.setattr(worker, "encode_turn", counting)
    first = await engine.generate(["hello there"], conversation="c")
    turns = ["hello there", first or "ok", "and you?"]
    await engine.generate(turns, conversation="c")
    assert sorted(encoded) == sorted(turns)  # each turn once
    ids = engine._encode_turn("and you?")
    assert ids == encode_turn(engine.tokenizer, "and you?") and len(encoded) == 3
    prompt = text.fit_dialogue(turns, engine.prompt_budget, engine._encode_turn)
    assert prompt == encode_dialogue(engine.tokenizer, turns, engine.prompt_budget)
    monkeypatch.setattr(worker, "_TURNS_REMEMBERED", 2)
    for turn in ("a", "b", "c"):
        engine._encode_turn(turn)
    assert list(engine._turn_ids) == ["b", "c"]
