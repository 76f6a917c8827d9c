"""The local text engine: a GPT-2-family model served from one worker thread.

The worker thread owns the model. Requests from every conversation go into a
queue; the worker takes the first, waits up to `batch_wait_ms` for more (up to
the batch size) and decodes them together; requests that arrive while a
batch is decoding join it at the next step (continuous batching, see
`bot.engines.decoding`). Results flow back to the event loop with
`call_soon_threadsafe`, so the loop never waits on the model.

A failure inside generation (an exception, out of memory) fails the requests
of that batch with `EngineUnavailable`; the worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.engines import EngineObserver, EngineUnavailable, TextChunk, clean_reply
from bot.engines.decoding import BatchDecoder, DecodeRequest
from bot.engines.loading import free_memory, is_out_of_memory, load_causal_lm, model_positions
from bot.engines.prefix_cache import PrefixCache
from bot.engines.prompt import encode_turn, fit_dialogue
from bot.engines.settings import LocalEngineSettings

log = logging.getLogger(__name__)

_STOP = object()
#: turns whose token ids the worker keeps (`LocalTextEngine._encode_turn`)
_TURNS_REMEMBERED = 8192
_Event = tuple[str, str | BaseException, int]


@dataclass(slots=True)
class _Pending:
    turns: list[str]
    conversation: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[_Event]
    cancelled: threading.Event = field(default_factory=threading.Event)
    request: DecodeRequest | None = None


class LocalTextEngine:
    """Batched, streaming generation from a local or hub GPT-2-family model."""

    def __init__(
        self, settings: LocalEngineSettings, observer: EngineObserver | None = None
    ) -> None:
        self.settings = settings
        self.observer = observer
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._decoder: BatchDecoder | None = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.device: Any = None
        self.prompt_budget = settings.max_history_tokens
        #: rows in each recent decode step (the decoder keeps running totals)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)
        self.failures = 0  # batches that failed inside generation
        self.quantized = "none"  # what text.quantize resolved to
        #: token ids of recent turns, least recently used first (worker thread only)
        self._turn_ids: collections.OrderedDict[str, list[int]] = collections.OrderedDict()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Load the model on the worker thread; raise `EngineUnavailable` if it can't."""
        if self._thread is not None:
            return
        loaded = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(
            target=self._worker, args=(loaded,), name="text-engine", daemon=True
        )
        self._thread.start()
        await loaded
        if self._load_error is not None:
            self._thread = None
            raise self._load_error

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._thread is not None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def decoder(self) -> BatchDecoder:
        """The `BatchDecoder` (its counters: steps, step_rows, joined)."""
        assert self._decoder is not None, "the engine is not started"
        return self._decoder

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self._decoder.cache if self._decoder is not None else None

    @property
    def kv_bytes(self) -> int:
        """Key/value memory now held: the batch's slots and the prefix cache."""
        if self._decoder is None:
            return 0
        return self._decoder.runner.nbytes + self._decoder.cache.bytes_used

    # -- requests --------------------------------------------------------------

    async def stream(
        self, turns: Sequence[str], *, conversation: str = ""
    ) -> AsyncIterator[TextChunk]:
        if not self.ready:
            raise EngineUnavailable("the text engine is not running")
        loop = asyncio.get_running_loop()
        pending = _Pending(list(turns), conversation, loop, asyncio.Queue())
        self._queue.put(pending)
        self._observe_queue()
        try:
            while True:
                kind, value, tokens = await pending.events.get()
                if isinstance(value, BaseException):
                    raise value
                if kind == "done":
                    # the worker set `request` before it sent "done"
                    prompt = len(pending.request.prompt_ids) if pending.request else 0
                    yield TextChunk(
                        clean_reply(value), final=True, tokens=tokens, prompt_tokens=prompt
                    )
                    return
                yield TextChunk(value.strip(), final=False)
        finally:
            pending.cancelled.set()  # dropped at the next decode step if still running

    async def generate(self, turns: Sequence[str], *, conversation: str = "") -> str:
        """The final reply's text ("" when the model said nothing)."""
        async for chunk in self.stream(turns, conversation=conversation):
            if chunk.final:
                return chunk.text
        raise EngineUnavailable("the text engine stopped before answering")

    def _observe_queue(self) -> None:
        if self.observer is not None:
            self.observer.observe_queue("text", self._queue.qsize())

    # -- worker thread -----------------------------------------------------------

    def _worker(self, loaded: asyncio.Future[None]) -> None:
        loop = loaded.get_loop()
        try:
            self._load()
            self._ready.set()
        except BaseException as exc:  # reported to start(), which raises it
            self._load_error = (
                exc
                if isinstance(exc, EngineUnavailable)
                else EngineUnavailable(f"{self.settings.model.key} could not be loaded: {exc}")
            )
            if not isinstance(exc, EngineUnavailable):
                log.exception("loading the text model failed")
        finally:
            loop.call_soon_threadsafe(loaded.set_result, None)
        if self._load_error is not None:
            return
        try:
            while True:
                batch = self._collect()
                if batch is None:
                    return
                self._run(batch)
        finally:
            self._ready.clear()
            self._fail_queued(EngineUnavailable("the text engine stopped"))

    def _load(self) -> None:
        import torch

        from bot.engines.gpt2 import Gpt2Runner, supports
        from bot.engines.linears import bf16_is_fast, quantize_linears

        s = self.settings
        # Denormal floats take a slow microcode path on x86: with them a decode
        # step of the bundled model ran 10x slower on some inputs. This thread
        # (and the OpenMP workers it starts) flushes them to zero, as CPU
        # inference engines do.
        torch.set_flush_denormal(True)
        if s.threads:
            torch.set_num_threads(s.threads)
        model, self.tokenizer, self.device = load_causal_lm(s.model)
        if not supports(model):
            raise EngineUnavailable(
                f"{s.model.key} {s.model.name!r} is a {type(model).__name__}; the local "
                "engine serves GPT-2-family models (GPT2LMHeadModel): use text.engine = "
                "'remote' for others"
            )
        quantize = s.quantize
        if quantize == "auto":
            quantize = "bf16" if self.device.type == "cpu" and bf16_is_fast() else "none"
        if quantize != "none" and self.device.type != "cpu":
            raise EngineUnavailable(
                f"text.quantize = {quantize!r} works on the CPU only; set text.device = 'cpu'"
            )
        if quantize != "none":
            quantize_linears(model, quantize)
        self.quantized = quantize
        self.model = model
        positions = model_positions(model)
        max_new = s.sampling.max_new_tokens
        self.prompt_budget = max(8, min(s.max_history_tokens, positions - max_new))
        max_len = min(positions, self.prompt_budget + max_new)
        slots, cache_bytes = self._memory_plan(Gpt2Runner.slot_bytes(model, max_len))
        runner = Gpt2Runner(model, slots=slots, max_len=max_len, device=self.device)
        self._decoder = BatchDecoder(
            runner,
            self.tokenizer,
            eos_id=self.tokenizer.eos_token_id,
            prefix_cache=PrefixCache(cache_bytes),
            settings=s.sampling,
            observe_rows=self._observe_step,
            on_tokens=self._count_tokens,
        )
        # What is loaded by now (torch, transformers, the model: some 400,000
        # objects) lives as long as the process; out of the collector's sight, its
        # full collections no longer walk it (they took 5-7% of a busy engine's time).
        gc.freeze()
        if s.gil_switch_interval_s:
            sys.setswitchinterval(s.gil_switch_interval_s)
        log.info(
            "text model %s loaded on %s (%d rows, %.0f MB batch cache, %.0f MB prefix cache)",
            Path(s.model.name).name or s.model.name,
            self.device,
            slots,
            runner.nbytes / 2**20,
            cache_bytes / 2**20,
        )

    def _memory_plan(self, slot_bytes: int) -> tuple[int, int]:
        """(batch rows, prefix-cache bytes) within `kv_cache_mb`: the batch's own
        cache first, and what is left for earlier turns."""
        s = self.settings
        budget = s.kv_cache_mb * 2**20
        rows = s.max_batch_size
        if not budget:
            return rows, 0
        if rows * slot_bytes > budget:
            rows = max(1, budget // slot_bytes)
            log.warning(
                "text.kv_cache_mb = %d holds only %d rows of %d: the batch is limited to %d",
                s.kv_cache_mb,
                rows,
                s.max_batch_size,
                rows,
            )
        return rows, max(0, budget - rows * slot_bytes)

    def _collect(self) -> list[_Pending] | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        limit = self._decoder.max_rows if self._decoder is not None else 1
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(batch) < limit:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            batch.append(item)
        return batch

    def _encode_turn(self, turn: str) -> list[int]:
        """`encode_turn`, remembered: a conversation's next prompt repeats its
        earlier turns, and tokenizing them again on the worker thread held up
        every row of the batch (a 10-turn prompt: ~0.5 ms). The caller must not
        change the list."""
        ids = self._turn_ids.get(turn)
        if ids is None:
            ids = encode_turn(self.tokenizer, turn)
            self._turn_ids[turn] = ids
            while len(self._turn_ids) > _TURNS_REMEMBERED:
                self._turn_ids.popitem(last=False)
        else:
            self._turn_ids.move_to_end(turn)
        return ids

    def _request(self, pending: _Pending) -> DecodeRequest | None:
        """The decoder's request for `pending`, or None if it was cancelled."""
        if pending.cancelled.is_set():
            return None
        ids = fit_dialogue(pending.turns, self.prompt_budget, self._encode_turn)
        pending.request = DecodeRequest(
            prompt_ids=ids,
            cache_key=pending.conversation,
            on_text=self._sender(pending),
            cancelled=pending.cancelled,
        )
        return pending.request

    def _run(self, batch: list[_Pending]) -> None:
        active = list(batch)  # everyone this run answers, latecomers included
        stopping = False

        def admit(room: int) -> list[DecodeRequest]:
            """Requests queued since the batch started, to join it now."""
            nonlocal stopping
            joining: list[DecodeRequest] = []
            while len(joining) < room and not stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    stopping = True
                    break
                active.append(item)
                request = self._request(item)
                if request is not None:
                    joining.append(request)
            if joining:
                self._observe_queue()
            return joining

        requests = [r for r in map(self._request, batch) if r is not None]
        self._observe_queue()
        if not requests:
            return
        try:
            self.decoder.run(requests, admit=admit)
        except Exception as exc:
            self.failures += 1
            log.exception("text generation failed for a batch of %d", len(active))
            if is_out_of_memory(exc):
                free_memory()
            error = EngineUnavailable(f"generation failed: {type(exc).__name__}")
            for pending in active:
                self._send(pending, "error", error)

    def _count_tokens(self, count: int) -> None:
        if self.observer is not None:
            self.observer.count_tokens(count)

    def _observe_step(self, rows: int) -> None:
        self.batch_sizes.append(rows)
        if self.observer is not None:
            self.observer.observe_batch(rows)

    def _sender(self, pending: _Pending) -> Callable[[str, bool], None]:
        def on_text(text: str, done: bool) -> None:
            tokens = len(pending.request.generated) if pending.request is not None else 0
            self._send(pending, "done" if done else "partial", text, tokens)

        return on_text

    @staticmethod
    def _send(pending: _Pending, kind: str, value: str | BaseException, tokens: int = 0) -> None:
        if pending.cancelled.is_set() and kind != "error":
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            pending.loop.call_soon_threadsafe(pending.events.put_nowait, (kind, value, tokens))

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._send(item, "error", error)
