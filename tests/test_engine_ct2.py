"""`text.engine = "ctranslate2"` on the tiny GPT-2, converted for real by
CTranslate2's converter: streaming, batching, cancellation, the conversion
cache, the errors a user can fix, and a message through the whole bot."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.engine_probes import CountingObserver, hold_at_first_partial, idle_for

from bot.config import Config, TextSection
from bot.engine_settings import build_text_engine
from bot.engines import EngineUnavailable
from bot.engines.prompt import encode_dialogue

pytest.importorskip(
    "ctranslate2", reason="the ctranslate2 extra is not installed (make test installs it)"
)

from bot.engines import ct2
from bot.engines.ct2 import Ct2TextEngine


@pytest.fixture
def make_engine(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Ct2TextEngine]:
    def factory(observer: Any = None, **text: Any) -> Ct2TextEngine:
        values: dict[str, Any] = {
            "engine": "ctranslate2",
            "model": str(tiny_model_dir),
            "device": "cpu",
            "max_new_tokens": 16,
            "stream_interval_ms": 0,
            "batch_wait_ms": 50,
            "threads": 1,
        }
        values.update(text)
        engine = build_text_engine(TextSection(**values), observer, data_dir=tmp_path / "data")
        assert isinstance(engine, Ct2TextEngine)
        return engine

    return factory


async def test_a_reply_streams_and_ends_with_its_token_counts(
    make_engine: Callable[..., Ct2TextEngine],
) -> None:
    observer = CountingObserver()
    engine = make_engine(observer)
    await engine.start()
    try:
        assert engine.compute_type == "int8"  # text.quantize = "auto" on the CPU
        turns = ["hello there", "hi, how are you?", "I like pizza today."]
        chunks = [chunk async for chunk in engine.stream(turns)]
        final = chunks[-1]
        assert final.final and all(not chunk.final for chunk in chunks[:-1])
        assert 0 < final.tokens <= 16 and observer.tokens == final.tokens
        budget = engine.prompt_budget
        assert final.prompt_tokens == len(encode_dialogue(engine.tokenizer, turns, budget))
        assert final.text == " ".join(final.text.split()) and "<|endoftext|>" not in final.text
    finally:
        await engine.close()


async def test_requests_that_arrive_together_share_a_batch(
    make_engine: Callable[..., Ct2TextEngine],
) -> None:
    engine = make_engine(greedy=True)
    await engine.start()
    try:
        prompts = [f"my dog {verb} coffee" for verb in ("likes", "loves", "hates", "reads")]
        alone = [await engine.generate([prompt]) for prompt in prompts]
        together = await asyncio.gather(*(engine.generate([prompt]) for prompt in prompts))
        assert max(engine.batch_sizes) > 1
        assert list(together) == alone  # greedy: each row decodes as it does alone
    finally:
        await engine.close()


async def test_a_lone_request_after_a_quiet_spell_starts_at_once(
    make_engine: Callable[..., Ct2TextEngine],
) -> None:
    """No wait for company when the worker was idle for a while
    (bot.engines.batch_window): with a window no test could sit out, the
    request is answered at once, alone."""
    engine = make_engine(batch_wait_ms=120_000)
    await engine.start()
    try:
        idle_for(engine.batch_window)
        reply = await asyncio.wait_for(engine.generate(["hello there"]), 60)
        assert isinstance(reply, str)
        assert list(engine.batch_sizes) == [1]
    finally:
        await engine.close()


@pytest.mark.parametrize("requests", [3, 6])
async def test_the_observer_hears_the_rows_of_every_decode_step(
    make_engine: Callable[..., Ct2TextEngine], requests: int
) -> None:
    """`observe_batch` means rows per decode step for every engine (the
    `aigc_bot_engine_batch_size` histogram), read from CTranslate2's per-token
    callbacks: sub-batches of `sub_batch` rows, one after another. A batch's
    last step is reported once `generate_batch` returns, after its replies:
    the counts are read once the worker has stopped."""
    observer = CountingObserver()
    engine = make_engine(observer, max_new_tokens=6, min_new_tokens=6)
    await engine.start()
    try:
        prompts = [f"my friend number {number} likes coffee" for number in range(requests)]
        await asyncio.gather(*(engine.generate([prompt]) for prompt in prompts))
    finally:
        await engine.close()
    assert sum(observer.batches) == 6 * requests  # a row a token: every row runs 6 steps
    assert max(observer.batches) <= engine.sub_batch
    if max(engine.batch_sizes) <= engine.sub_batch:  # one sub-batch a batch
        assert observer.batches == [size for size in engine.batch_sizes for _ in range(6)]


@pytest.mark.parametrize(
    ("configured", "cores", "expected"),
    [(0, 2, 1), (0, 1, 1), (0, None, 1), (0, 16, 0), (3, 2, 3), (1, 16, 1)],
)
def test_threads_0_gives_ctranslate2_one_thread_on_a_small_machine(
    monkeypatch: pytest.MonkeyPatch, configured: int, cores: int | None, expected: int
) -> None:
    monkeypatch.setattr(ct2.os, "cpu_count", lambda: cores)
    assert ct2.intra_threads(configured) == expected


async def test_the_generator_gets_the_threads_chosen_for_the_machine(
    make_engine: Callable[..., Ct2TextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctranslate2

    opened: list[dict[str, Any]] = []
    real = ctranslate2.Generator

    def generator(*args: Any, **kwargs: Any) -> Any:
        opened.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ctranslate2, "Generator", generator)
    monkeypatch.setattr(ct2.os, "cpu_count", lambda: 2)
    engine = make_engine(threads=0)
    await engine.start()
    try:
        assert isinstance(await engine.generate(["hello there"]), str)
    finally:
        await engine.close()
    assert [kwargs["intra_threads"] for kwargs in opened] == [1]


async def test_a_stream_closed_early_stops_its_row(
    make_engine: Callable[..., Ct2TextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller goes away (a timeout, a cancelled task): CTranslate2's
    callback stops that row. The worker is held at the first partial text
    until the stream is closed, so the test does not race the model."""
    observer = CountingObserver()
    engine = make_engine(observer, max_new_tokens=200, min_new_tokens=200)
    closed = threading.Event()
    send = engine._send

    def held(pending: Any, kind: str, value: Any, tokens: int = 0) -> None:
        send(pending, kind, value, tokens)
        if kind == "partial":
            assert closed.wait(10)

    monkeypatch.setattr(engine, "_send", held)
    await engine.start()
    try:
        stream = engine.stream(["tell me a long story"])
        first = await anext(stream)
        assert not first.final
        await stream.aclose()
        closed.set()
        monkeypatch.setattr(engine, "_send", send)
        reply = [chunk async for chunk in engine.stream(["hello"])][-1]
        assert reply.tokens == 200  # min_new_tokens: a row that is not stopped runs on
        assert observer.tokens - reply.tokens <= 2  # the stopped row: a token or two
        assert set(observer.batches) == {1}  # rows per decode step: one row each time
        # its 200 steps (the last may be reported a moment after the reply) and the
        # stopped row's one to three
        assert 200 <= len(observer.batches) <= 203
    finally:
        closed.set()
        await engine.close()


def _touch_weights(model_dir: Path) -> Callable[[], None]:
    """Move the weights' modification time a second on; returns the undo."""
    weights = next(model_dir.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    return lambda: os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


async def test_the_conversion_is_cached_and_redone_when_the_model_changes(
    make_engine: Callable[..., Ct2TextEngine], tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = make_engine()
    await first.start()
    await first.close()
    assert first.conversions == 1 and first.converted is not None
    again = make_engine()
    await again.start()
    await again.close()
    assert again.conversions == 0 and again.converted == first.converted

    restore = _touch_weights(tiny_model_dir)  # as if retrained
    try:
        changed = make_engine()
        await changed.start()
        await changed.close()
        assert changed.conversions == 1 and changed.converted != first.converted
        folders = [p.name for p in (tmp_path / "data" / "ctranslate2").iterdir()]
        assert folders == [changed.converted.name]  # the stale conversion is gone
    finally:
        restore()


async def test_a_missing_ctranslate2_is_a_clear_error(
    make_engine: Callable[..., Ct2TextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ct2.importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "ctranslate2" else real(name, *args)

    monkeypatch.setattr(ct2.importlib.util, "find_spec", find_spec)
    with pytest.raises(EngineUnavailable, match=r"pip install 'aigc-bot\[ctranslate2\]'"):
        await make_engine().start()


async def test_cuda_without_a_device_and_a_missing_model_are_clear_errors(
    make_engine: Callable[..., Ct2TextEngine], tmp_path: Path
) -> None:
    import ctranslate2

    if ctranslate2.get_cuda_device_count() == 0:
        with pytest.raises(EngineUnavailable, match=r"text\.device = 'cuda'"):
            await make_engine(device="cuda").start()
    with pytest.raises(EngineUnavailable, match=r"text\.model .* does not exist"):
        await make_engine(model=str(tmp_path / "nowhere")).start()


async def test_a_message_through_the_bot_is_answered_and_stored(
    make_config: Callable[..., Config],
) -> None:
    from bot.app import BotApp
    from bot.messages import Incoming, Text

    config = make_config(text={"engine": "ctranslate2", "threads": 1})
    async with BotApp(config) as app:
        assert isinstance(app.engine, Ct2TextEngine)
        incoming = Incoming("test", "chat1", "ann", "Ann", "hello, do you like music?")
        replies = [reply async for reply in app.manager.handle(incoming)]
        final = [r for r in replies if isinstance(r, Text) and r.final]
        assert len(final) == 1 and final[0].text
        exported = await app.store.people.export("test", "ann")
        assert [(m.role, m.text) for m in exported[0].messages] == [
            ("user", "hello, do you like music?"),
            ("bot", final[0].text),
        ]


async def test_doctor_names_the_engine_and_what_it_needs(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bot.doctor import run_checks

    monkeypatch.setattr(ct2.os, "cpu_count", lambda: 2)
    config = make_config(text={"engine": "ctranslate2"})
    await run_checks(config, None)
    out = capsys.readouterr().out
    assert "[ok  ] text engine: CTranslate2 (1 thread), converted models in" in out
    await run_checks(make_config(text={"engine": "ctranslate2", "threads": 3}), None)
    assert "text engine: CTranslate2 (3 threads)," in capsys.readouterr().out
    monkeypatch.setattr(ct2.os, "cpu_count", lambda: 16)
    await run_checks(config, None)
    assert "text engine: CTranslate2 (its default threads)," in capsys.readouterr().out
    monkeypatch.setattr(ct2, "ctranslate2_missing", lambda: "ctranslate2 is gone")
    failures = await run_checks(config, None)
    assert "[FAIL] text engine: ctranslate2 is gone" in capsys.readouterr().out
    assert failures >= 1


def test_a_conversion_another_process_finished_first_is_kept(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two processes of a scaled-out bot start together: both convert, the
    second rename finds the first's folder, and the first's copy stays."""
    target = tmp_path / "cache" / "tiny-int8-0123456789abcdef"
    ct2.convert(str(tiny_model_dir), target, "int8")
    first = (target / "model.bin").stat().st_mtime_ns
    ct2.convert(str(tiny_model_dir), target, "int8")
    assert (target / "model.bin").stat().st_mtime_ns == first
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no scratch left


def test_auto_picks_ctranslate2_alone_only_on_a_cpu_with_vnni_and_without_amx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `text.engine = "auto"` (the default) serves with, by machine."""
    import torch

    from bot.engine_settings import HYBRID, resolved_engine
    from bot.engines import linears

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(linears, "amx_available", lambda: False)
    monkeypatch.setattr(linears, "int8_is_fast", lambda: True)
    auto = TextSection(engine="auto")
    assert resolved_engine(auto) == "ctranslate2"
    monkeypatch.setattr(linears, "int8_is_fast", lambda: False)
    assert resolved_engine(auto) == HYBRID  # int8 without VNNI: the local engine ahead at 32
    monkeypatch.setattr(linears, "int8_is_fast", lambda: True)
    assert resolved_engine(TextSection(engine="auto", device="cuda")) == "local"
    for engine in ("local", "ctranslate2", "remote"):
        assert resolved_engine(TextSection(engine=engine)) == engine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolved_engine(auto) == "local"  # fp16, continuous batching, prefix reuse
    assert resolved_engine(TextSection(engine="auto", device="cpu")) == "ctranslate2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(linears, "amx_available", lambda: True)
    assert resolved_engine(auto) == HYBRID  # both: the local engine ahead at 32 users
    monkeypatch.setattr(linears, "amx_available", lambda: False)
    monkeypatch.setattr(ct2, "compute_type_missing", lambda device, kind: "no bf16 kernels")
    assert resolved_engine(TextSection(engine="auto", quantize="bf16")) == "local"
    monkeypatch.setattr(ct2, "ctranslate2_missing", lambda: "not installed")
    assert resolved_engine(auto) == "local"
    assert TextSection().engine == "auto"


async def test_a_reply_is_sent_when_its_row_ends_not_when_the_batch_does(
    make_engine: Callable[..., Ct2TextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sub-batches run one after another: the first one's replies go out
    before the next one has produced anything."""
    engine = make_engine(greedy=True, max_new_tokens=6, min_new_tokens=6)
    order: list[str] = []
    send = engine._send

    def recording(pending: Any, kind: str, value: Any, tokens: int = 0) -> None:
        order.append(kind)
        send(pending, kind, value, tokens)

    monkeypatch.setattr(engine, "_send", recording)
    await engine.start()
    try:
        prompts = [f"my dog {verb} coffee" for verb in "likes loves hates reads sees wants".split()]
        prompts += ["hello", "what"]
        replies = await asyncio.gather(*(engine.generate([prompt]) for prompt in prompts))
        assert list(engine.batch_sizes) == [8] and all(replies)
        first_done = order.index("done")
        assert "partial" in order[first_done:]  # a later sub-batch streamed after it
    finally:
        await engine.close()


async def test_short_and_empty_prompts_do_not_leak_into_other_replies(
    make_engine: Callable[..., Ct2TextEngine],
) -> None:
    """With a one-token prompt in the batch, CTranslate2 would return the
    other rows' prompts as part of their replies; an empty one failed the
    whole batch."""
    engine = make_engine(greedy=True)
    await engine.start()
    try:
        prompt = "my dog likes coffee every day, we walk to the park sometimes"
        chunks = await asyncio.gather(
            _final(engine, [prompt]), _final(engine, [""]), _final(engine, [])
        )
        assert list(engine.batch_sizes) == [3]
        reply = chunks[0]
        assert reply.tokens <= 16  # not the prompt's 13 tokens and then some
        assert "coffee" not in reply.text and "sometimes" not in reply.text
        assert all(chunk.prompt_tokens >= 2 for chunk in chunks)
    finally:
        await engine.close()


async def _final(engine: Ct2TextEngine, turns: list[str]) -> Any:
    return [chunk async for chunk in engine.stream(turns)][-1]


async def test_a_reply_longer_than_the_model_allows_is_cut_short(
    make_engine: Callable[..., Ct2TextEngine],
) -> None:
    engine = make_engine(max_new_tokens=600, min_new_tokens=600)  # the tiny model: 512 positions
    await engine.start()
    try:
        chunks = [chunk async for chunk in engine.stream(["hello there"])]
        final = chunks[-1]
        assert final.final and 0 < final.tokens <= 512 - final.prompt_tokens
    finally:
        await engine.close()


async def test_a_failing_batch_fails_its_requests_and_the_engine_goes_on(
    make_engine: Callable[..., Ct2TextEngine],
) -> None:
    engine = make_engine()
    await engine.start()

    class Failing:
        def __init__(self, generator: Any) -> None:
            self.generator = generator
            self.calls = 0

        def generate_batch(self, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("out of memory")
            return self.generator.generate_batch(*args, **kwargs)

    engine.generator = Failing(engine.generator)
    try:
        with pytest.raises(EngineUnavailable, match="generation failed"):
            await engine.generate(["hello"])
        assert await engine.generate(["hello"]) is not None and engine.failures == 1
    finally:
        await engine.close()
    assert engine.generator is None  # the model is let go once the worker stops


async def test_conversions_of_other_models_and_fresh_scratch_are_left_alone(
    make_engine: Callable[..., Ct2TextEngine], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two models both called "chat" keep their conversions; only scratch a
    dead process left (old) is removed."""
    import shutil
    import time

    models = [tmp_path / side / "chat" for side in ("a", "b")]
    for model in models:
        shutil.copytree(tiny_model_dir, model)
    cache = tmp_path / "data" / "ctranslate2"
    cache.mkdir(parents=True)
    old, fresh = cache / ".converting-old", cache / ".converting-fresh"
    old.mkdir()
    fresh.mkdir()
    past = time.time() - 2 * ct2.STALE_SCRATCH_S
    os.utime(old, (past, past))
    engines = [make_engine(model=str(model)) for model in models]
    for engine in engines:
        await engine.start()
        await engine.close()
    assert all(engine.conversions == 1 for engine in engines)
    assert all(engine.converted is not None and engine.converted.is_dir() for engine in engines)
    assert not old.exists() and fresh.exists()


async def test_close_stops_a_running_batch(
    make_engine: Callable[..., Ct2TextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutting down does not wait for a long batch: it stops at the next token,
    and its caller still gets the reply so far."""
    observer = CountingObserver()
    engine = make_engine(observer, max_new_tokens=300, min_new_tokens=300)
    held, closing = hold_at_first_partial(monkeypatch, engine)
    await engine.start()
    reply = asyncio.ensure_future(_final(engine, ["tell me a long story"]))
    await asyncio.to_thread(held.wait, 10)
    closed = asyncio.ensure_future(engine.close())
    await asyncio.to_thread(engine._stopping.wait, 10)
    closing.set()
    await asyncio.wait_for(closed, 30)
    final = await reply
    assert final.final and final.tokens < 300 and observer.tokens == final.tokens


async def test_a_batch_collected_while_closing_fails_instead_of_stopping_at_once(
    make_engine: Callable[..., Ct2TextEngine],
) -> None:
    """Once `close` has begun, a batch that starts would stop at its first token
    and pass for a (nearly empty) reply: it fails instead, as queued ones do."""
    engine = make_engine(batch_wait_ms=0)
    await engine.start()
    try:
        engine.stop_batch()
        with pytest.raises(EngineUnavailable, match="stopped"):
            await engine.generate(["hello"])
    finally:
        await engine.close()


def test_an_error_while_streaming_ends_that_reply_once(
    make_engine: Callable[..., Ct2TextEngine],
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The callback itself, step by step: an exception must not cross into
    CTranslate2's loop, ends that row with an error, and is logged once, not
    once for each of its remaining tokens."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from bot.engines.worker import Pending

    engine = make_engine()
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine.eos_id = engine.tokenizer.eos_token_id
    sent: list[str] = []

    def failing(pending: Any, kind: str, value: Any, tokens: int = 0) -> None:
        sent.append(kind)
        if kind == "partial":
            raise ValueError("a broken tokenizer")

    monkeypatch.setattr(engine, "_send", failing)
    pending = Pending(["hello"], "", asyncio.new_event_loop(), asyncio.Queue())
    rows = [ct2._Row(pending)]
    stops = [
        engine._on_step(rows, SimpleNamespace(batch_id=0, token_id=token, is_last=False))
        for token in (40, 41, 42)
    ]
    pending.loop.close()
    assert stops == [True, True, True] and sent == ["partial", "error"]
    failures = [r for r in caplog.records if "streaming a reply failed" in r.getMessage()]
    assert len(failures) == 1


async def test_sub_batches_hold_no_more_keys_and_values_than_kv_cache_mb(
    make_engine: Callable[..., Ct2TextEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """A row of the tiny model at 256 + 16 positions holds 272 KiB of keys and
    values (2 layers, 64 wide, float32): 1 MiB holds three rows, not four, so
    CTranslate2 decodes three at a time and says so; every request is answered."""
    engine = make_engine(kv_cache_mb=1, max_history_tokens=256, max_batch_size=8)
    with caplog.at_level("WARNING", logger="bot.engines.ct2"):
        await engine.start()
    try:
        assert engine.row_kv_bytes == 272 * 2 * 2 * 64 * 4
        assert engine.sub_batch == 3 and engine._options(10)["max_batch_size"] == 3
        assert "holds the keys/values of 3 rows" in caplog.text
        replies = await asyncio.gather(*(_final(engine, [f"hello {i}"]) for i in range(6)))
        assert all(reply.final for reply in replies)
        use = engine.kv_use()
        assert 0 < use.batch_bytes <= engine.kv_reserved_bytes <= 2**20
        assert use.batch_rows == 3 and use.prefix_bytes == 0
    finally:
        await engine.close()


async def test_sub_batches_keep_four_rows_when_the_budget_holds_them(
    make_engine: Callable[..., Ct2TextEngine],
) -> None:
    engine = make_engine(kv_cache_mb=16)
    await engine.start()
    try:
        assert engine.sub_batch == ct2.SUB_BATCH
    finally:
        await engine.close()
    unbounded = make_engine(kv_cache_mb=0, max_history_tokens=480)
    await unbounded.start()
    try:
        assert unbounded.sub_batch == ct2.SUB_BATCH
    finally:
        await unbounded.close()


def test_cache_precision_follows_the_compute_type() -> None:
    assert ct2.cache_itemsize("int8") == ct2.cache_itemsize("float32") == 4
    for half in ("float16", "int8_float16", "bfloat16", "int8_bfloat16"):
        assert ct2.cache_itemsize(half) == 2


def test_key_value_bytes_per_position_follow_the_config() -> None:
    from types import SimpleNamespace

    gpt2 = SimpleNamespace(n_layer=12, n_embd=768, n_head=12)
    assert ct2.position_kv_bytes(gpt2, "int8") == 2 * 12 * 768 * 4
    assert ct2.position_kv_bytes(gpt2, "int8_float16") == 2 * 12 * 768 * 2
    # grouped-query attention: 8 heads share 2 key/value heads
    shared = SimpleNamespace(
        num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=2
    )
    assert ct2.position_kv_bytes(shared, "float32") == 2 * 4 * 128 * 4
    assert ct2.position_kv_bytes(SimpleNamespace(), "int8") == 0  # not bounded, and warned
