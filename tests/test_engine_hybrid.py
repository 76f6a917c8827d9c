"""`text.engine = "auto"` on a CPU with AMX: small batches on CTranslate2, large
ones on the local engine, on the tiny GPT-2 (converted for real by
CTranslate2's converter): which engine answers what, that both answer from one
queue and count tokens once, the fallback when CTranslate2 cannot load, and a
message through the whole bot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.engine_probes import CountingObserver, hold_at_first_partial, idle_for

from bot.config import Config, TextSection
from bot.engine_settings import HYBRID, ct2_engine_settings, local_engine_settings
from bot.engines import EngineUnavailable

pytest.importorskip(
    "ctranslate2", reason="the ctranslate2 extra is not installed (make test installs it)"
)

from bot.engines import ct2
from bot.engines.hybrid import HybridTextEngine


@pytest.fixture
def make_engine(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., HybridTextEngine]:
    def factory(observer: Any = None, *, large_batch: int = 2, **text: Any) -> HybridTextEngine:
        values: dict[str, Any] = {
            "model": str(tiny_model_dir),
            "device": "cpu",
            "max_new_tokens": 12,
            "min_new_tokens": 4,  # no reply ends before it started
            "stream_interval_ms": 0,
            # requests sent together are collected together (the batch is full at
            # `max_batch_size`; a lone request waits this long for company)
            "batch_wait_ms": 300,
            "max_batch_size": 2,
            "threads": 1,
            "kv_cache_mb": 16,
        }
        values.update(text)
        section = TextSection(**values)
        return HybridTextEngine(
            local_engine_settings(section),
            ct2_engine_settings(section, tmp_path / "data"),
            observer,
            large_batch=large_batch,
        )

    return factory


async def _final(engine: HybridTextEngine, turns: list[str], conversation: str = "") -> Any:
    chunks = [chunk async for chunk in engine.stream(turns, conversation=conversation)]
    assert chunks and chunks[-1].final
    return chunks[-1]


async def test_a_lone_request_goes_to_ctranslate2_and_a_full_batch_to_the_local_engine(
    make_engine: Callable[..., HybridTextEngine],
) -> None:
    observer = CountingObserver()
    engine = make_engine(observer)
    await engine.start()
    try:
        assert engine.small is not None and engine.small.compute_type == "int8"
        alone = await _final(engine, ["hello there"], "ann")
        assert engine.batches == {"ctranslate2": 1, "local": 0}
        assert list(engine.small.batch_sizes) == [1] and not engine.local.batch_sizes
        together = await asyncio.gather(
            _final(engine, ["hi, how are you?"], "bob"), _final(engine, ["I like pizza."], "cy")
        )
        assert engine.batches == {"ctranslate2": 1, "local": 1}
        assert max(engine.local.batch_sizes) == 2  # decoded side by side
        finals = [alone, *together]
        assert all(0 < final.tokens <= 12 and final.prompt_tokens > 0 for final in finals)
        # counted once, on the engine the bot holds, whichever engine answered
        assert engine.generated_tokens == observer.tokens == sum(f.tokens for f in finals)
        assert engine.local.generated_tokens == engine.small.generated_tokens == 0
        assert engine.prompt_budget == engine.local.prompt_budget
    finally:
        await engine.close()
    assert not engine.ready


async def test_a_lone_request_after_a_quiet_spell_goes_to_ctranslate2_at_once(
    make_engine: Callable[..., HybridTextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the batch window nor the burst window holds up a request that
    finds the worker idle after a quiet spell (bot.engines.batch_window): with
    windows no test could sit out, it is answered, by CTranslate2, at once."""
    from bot.engines import hybrid

    monkeypatch.setattr(hybrid, "BURST_WAIT_S", 600.0)
    engine = make_engine(large_batch=4, max_batch_size=6, batch_wait_ms=120_000)
    await engine.start()
    try:
        idle_for(engine.batch_window)
        final = await asyncio.wait_for(_final(engine, ["hello there"], "ann"), 60)
        assert final.tokens > 0
        assert engine.batches == {"ctranslate2": 1, "local": 0}
    finally:
        await engine.close()


async def test_a_burst_after_a_quiet_spell_waits_for_its_first_reply_then_goes_together(
    make_engine: Callable[..., HybridTextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the quiet start costs (bot.engines.batch_window): the first request
    of a burst that begins after a quiet spell goes to CTranslate2 alone, at
    once; the others, arriving while it is answered, find a worker that was
    just busy, wait for company as before and go to the local engine together."""
    import threading

    engine = make_engine(large_batch=2, max_batch_size=2, batch_wait_ms=120_000)
    await engine.start()
    try:
        assert engine.small is not None
        idle_for(engine.batch_window)
        taken = threading.Event()
        run_small = engine.small._run

        def run_and_tell(batch: list[Any]) -> None:
            taken.set()
            run_small(batch)

        monkeypatch.setattr(engine.small, "_run", run_and_tell)
        first = asyncio.ensure_future(_final(engine, ["hello there"], "ann"))
        assert await asyncio.to_thread(taken.wait, 30)
        rest = [_final(engine, [f"me too {i}"], f"user{i}") for i in range(2)]
        finals = await asyncio.wait_for(asyncio.gather(first, *rest), 60)
        assert all(final.tokens > 0 for final in finals)
        assert engine.batches == {"ctranslate2": 1, "local": 1}
    finally:
        await engine.close()


async def test_a_burst_arriving_over_more_than_the_batch_wait_goes_to_the_local_engine(
    make_engine: Callable[..., HybridTextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many users at once reach the worker spread out (each message passes the
    manager and the database first): while the batch is too small for the local
    engine, it goes on collecting requests that come within `batch_wait_ms` of
    the one before. Requests 0.5 s apart with a 0.8 s wait: the plain window
    would close after two of them and hand those to CTranslate2."""
    from bot.engines import hybrid

    monkeypatch.setattr(hybrid, "BURST_WAIT_S", 10.0)
    engine = make_engine(large_batch=4, max_batch_size=6, batch_wait_ms=800)
    await engine.start()
    try:
        replies = []
        for index in range(4):
            if index:
                await asyncio.sleep(0.5)  # the pace of the arrivals, not a synchronisation
            replies.append(asyncio.ensure_future(_final(engine, [f"hi {index}"], f"u{index}")))
        finals = await asyncio.gather(*replies)
        assert all(final.tokens > 0 for final in finals)
        assert engine.batches == {"ctranslate2": 0, "local": 1}
    finally:
        await engine.close()


async def test_requests_arriving_while_the_local_engine_decodes_join_its_batch(
    make_engine: Callable[..., HybridTextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the work stays on the local engine: a request queued while it
    decodes joins the running batch (continuous batching) instead of waiting for
    CTranslate2 or for the batch to end. The shared queue makes that work."""
    # two requests sent together wait `batch_wait_ms` for a third, then go together
    engine = make_engine(large_batch=2, max_batch_size=3, max_new_tokens=40, min_new_tokens=40)
    started, release = hold_at_first_partial(monkeypatch, engine.local)
    await engine.start()
    try:
        first = [
            asyncio.ensure_future(_final(engine, [f"message {i}"], f"user{i}")) for i in range(2)
        ]
        await asyncio.to_thread(started.wait, 10)
        late = asyncio.ensure_future(_final(engine, ["me too"], "late"))
        await asyncio.sleep(0)  # its first step puts it in the queue
        assert engine.queue_depth == 1  # the worker is inside the local engine's batch
        release.set()
        await asyncio.gather(*first, late)
        assert engine.batches == {"ctranslate2": 0, "local": 1}
        assert engine.local.decoder.joined >= 1
    finally:
        release.set()
        await engine.close()


async def test_when_ctranslate2_cannot_load_the_local_engine_answers_everything(
    make_engine: Callable[..., HybridTextEngine],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(ct2, "ctranslate2_missing", lambda: "ctranslate2 is gone")
    engine = make_engine(batch_wait_ms=0)
    with caplog.at_level(logging.WARNING, logger="bot.engines.hybrid"):
        await engine.start()
    try:
        assert engine.small is None
        assert "CTranslate2 is not used (ctranslate2 is gone)" in caplog.text
        final = await _final(engine, ["hello there"])
        assert final.tokens > 0 and engine.batches == {"ctranslate2": 0, "local": 1}
    finally:
        await engine.close()


async def test_after_a_fallback_a_restart_tries_both_engines_again(
    make_engine: Callable[..., HybridTextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ct2, "ctranslate2_missing", lambda: "ctranslate2 is gone")
    engine = make_engine(batch_wait_ms=0)
    await engine.start()
    assert engine.small is None and engine.local is not None
    await engine.close()
    monkeypatch.undo()  # CTranslate2 is back (installed meanwhile)
    await engine.start()
    try:
        assert engine.small is not None and engine.local is not None
        assert engine.local.kv_reserved_bytes == engine.small.kv_reserved_bytes > 0
        assert (await _final(engine, ["hello there"])).tokens > 0
    finally:
        await engine.close()


async def test_fewer_local_rows_than_large_batch_lower_it_and_failures_count_once(
    make_engine: Callable[..., HybridTextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the local engine holds fewer rows than `large_batch` (a larger
    model in `kv_cache_mb`), batches it can hold still reach it; a batch that
    fails there counts on the engine the bot holds."""
    engine = make_engine(large_batch=16, max_batch_size=2)
    await engine.start()
    try:
        assert engine.large_batch == 2
        monkeypatch.setattr(engine.local.decoder, "run", _raise)
        results = await asyncio.gather(
            *(_final(engine, [f"hi {i}"], f"u{i}") for i in range(2)), return_exceptions=True
        )
        assert all(isinstance(r, EngineUnavailable) for r in results)
        assert engine.batches["local"] == 1 and engine.failures == 1
    finally:
        await engine.close()


async def test_both_engines_share_kv_cache_mb(
    make_engine: Callable[..., HybridTextEngine],
) -> None:
    """What CTranslate2's sub-batches may hold is kept out of the local engine's
    slots and prefix cache, so both together stay within `kv_cache_mb`."""
    engine = make_engine(kv_cache_mb=2)
    await engine.start()
    try:
        local, small = engine.local, engine.small
        assert local is not None and small is not None
        reserved = small.kv_reserved_bytes
        assert reserved == small.sub_batch * small.row_kv_bytes > 0
        assert local.kv_reserved_bytes == reserved
        slots = local.decoder.runner.nbytes
        assert slots + local.decoder.cache.max_bytes == 2 * 2**20 - reserved
        await _final(engine, ["hello there"], "ann")  # CTranslate2
        await asyncio.gather(*(_final(engine, [f"hi {i}"], f"u{i}") for i in range(2)))  # local
        use = engine.kv_use()
        assert engine.batches == {"ctranslate2": 1, "local": 1}
        assert use.total == local.kv_use().total + small.kv_peak_bytes <= 2 * 2**20
        assert use.prefix_entries == 2 and small.kv_peak_bytes > 0
    finally:
        await engine.close()


def _raise(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("boom")


async def test_a_model_the_local_engine_cannot_serve_is_served_by_ctranslate2(
    make_engine: Callable[..., HybridTextEngine],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The local engine serves GPT-2-family models only; CTranslate2 more. When
    the local engine refuses the model, CTranslate2 answers every batch, large
    ones too; when neither can load it, the local engine's reason is the error."""
    from bot.engines.text import LocalTextEngine

    def refuse(self: Any) -> None:
        raise EngineUnavailable("text.model is a LlamaForCausalLM; the local engine serves GPT-2")

    monkeypatch.setattr(LocalTextEngine, "_load", refuse)
    engine = make_engine(batch_wait_ms=2000)  # two sent together are collected together
    with caplog.at_level(logging.WARNING, logger="bot.engines.hybrid"):
        await engine.start()
    try:
        assert engine.local is None and "the local engine is not used" in caplog.text
        finals = await asyncio.gather(*(_final(engine, [f"hi {i}"], f"u{i}") for i in range(2)))
        assert all(final.tokens > 0 for final in finals)
        assert engine.batches == {"ctranslate2": 1, "local": 0}
        assert engine.prompt_budget > 0 and engine.quantized == "int8"
    finally:
        await engine.close()

    monkeypatch.setattr(ct2, "ctranslate2_missing", lambda: "ctranslate2 is gone")
    neither = make_engine()
    caplog.clear()
    with caplog.at_level(logging.DEBUG), pytest.raises(EngineUnavailable, match="LlamaForCausalLM"):
        await neither.start()
    # one reason, nothing else: `aigc-bot run` prints it as its one line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_close_stops_a_running_ctranslate2_batch(
    make_engine: Callable[..., HybridTextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutting down does not wait for CTranslate2's batch to end: it stops at
    the next token and its caller gets the reply so far."""
    engine = make_engine(batch_wait_ms=0, max_new_tokens=300, min_new_tokens=300)
    await engine.start()
    assert engine.small is not None
    held, closing = hold_at_first_partial(monkeypatch, engine.small)
    reply = asyncio.ensure_future(_final(engine, ["tell me a long story"]))
    await asyncio.to_thread(held.wait, 10)
    closed = asyncio.ensure_future(engine.close())
    await asyncio.to_thread(engine.small._stopping.wait, 10)
    closing.set()
    await asyncio.wait_for(closed, 30)
    final = await reply
    assert final.final and final.tokens < 300


def test_auto_picks_both_engines_on_a_cpu_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bot.engine_settings import build_text_engine, resolved_engine
    from bot.engines import linears

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(linears, "amx_available", lambda: True)
    auto = TextSection(engine="auto")
    assert resolved_engine(auto) == HYBRID
    assert isinstance(build_text_engine(auto), HybridTextEngine)
    assert resolved_engine(TextSection(engine="local")) == "local"  # a choice is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolved_engine(auto) == "local"  # CUDA: fp16, continuous batching, prefix reuse


async def test_a_message_through_the_bot_is_answered_and_stored(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.app import BotApp
    from bot.engines import linears
    from bot.messages import Incoming, Text

    monkeypatch.setattr(linears, "amx_available", lambda: True)
    config = make_config(text={"engine": "auto", "device": "cpu", "threads": 1})
    async with BotApp(config) as app:
        assert isinstance(app.engine, HybridTextEngine)
        incoming = Incoming("test", "chat1", "ann", "Ann", "hello, do you like music?")
        replies = [reply async for reply in app.manager.handle(incoming)]
        final = [r for r in replies if isinstance(r, Text) and r.final]
        assert len(final) == 1 and final[0].text
        assert app.engine.batches["ctranslate2"] == 1
        exported = await app.store.people.export("test", "ann")
        assert [(m.role, m.text) for m in exported[0].messages] == [
            ("user", "hello, do you like music?"),
            ("bot", final[0].text),
        ]


async def test_doctor_says_both_engines_serve(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bot.doctor import run_checks
    from bot.engines import linears

    monkeypatch.setattr(linears, "amx_available", lambda: True)
    await run_checks(make_config(text={"engine": "auto", "device": "cpu"}), None)
    out = capsys.readouterr().out
    assert "[ok  ] text engine: local for large batches, CTranslate2 (" in out
    assert ") for small ones" in out
