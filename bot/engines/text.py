"""The local text engine: a GPT-2-family model served from one worker thread.

The worker thread owns the model. Requests from every conversation go into a
queue; the worker takes the first, waits up to `batch_wait_ms` for more (up to
`max_batch_size`) and decodes them together; requests that arrive while a
batch is decoding join it at the next step (continuous batching). Results flow
back to the event loop with `call_soon_threadsafe`, so the loop never waits on
the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import TextSection
from bot.engines import EngineUnavailable
from bot.engines.loading import load_causal_lm
from bot.engines.prompt import encode_dialogue
from bot.messages import Text

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(slots=True)
class _Pending:
    turns: list[str]
    conversation: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, str | BaseException]]
    request: Any = None  # DecodeRequest once the worker picks it up
    cancelled: threading.Event | None = None


class LocalTextEngine:
    """Batched, streaming generation from a local or hub GPT-2-family model."""

    def __init__(self, config: TextSection, metrics: Any = None) -> None:
        self.config = config
        self.metrics = metrics
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._decoder: Any = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.device: Any = None
        self.prompt_budget = config.max_history_tokens
        #: rows in each recent decode step (the decoder keeps running totals)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)

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
    def decoder(self) -> Any:
        """The `BatchDecoder` (its counters: steps, step_rows, joined)."""
        return self._decoder

    @property
    def prefix_cache(self) -> Any:
        return self._decoder.cache if self._decoder is not None else None

    # -- requests --------------------------------------------------------------

    async def stream(self, turns: Sequence[str], *, conversation: str = "") -> AsyncIterator[Text]:
        if not self.ready:
            raise EngineUnavailable("the text engine is not running")
        loop = asyncio.get_running_loop()
        pending = _Pending(list(turns), conversation, loop, asyncio.Queue())
        pending.cancelled = threading.Event()
        self._queue.put(pending)
        self._observe_queue()
        try:
            while True:
                kind, value = await pending.events.get()
                if kind == "error":
                    assert isinstance(value, BaseException)
                    raise value
                assert isinstance(value, str)
                if kind == "done":
                    yield Text(self._clean(value), final=True)
                    return
                yield Text(value.strip(), final=False)
        finally:
            pending.cancelled.set()

    async def generate(self, turns: Sequence[str], *, conversation: str = "") -> str:
        async for reply in self.stream(turns, conversation=conversation):
            if reply.final:
                return reply.text
        raise EngineUnavailable("the text engine stopped before answering")

    def _clean(self, text: str) -> str:
        cleaned = " ".join(text.replace("\ufffd", "").split())
        return cleaned or self.config.fallback_reply

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels("text").set(self._queue.qsize())

    # -- worker thread -----------------------------------------------------------

    def _worker(self, loaded: asyncio.Future[None]) -> None:
        loop = loaded.get_loop()
        try:
            self._load()
            self._ready.set()
        except BaseException as exc:  # reported to start(), which raises it
            self._load_error = exc
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
        from bot.engines.decoding import BatchDecoder, SamplingSettings
        from bot.engines.prefix_cache import PrefixCache

        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)

        self.model, self.tokenizer, self.device = load_causal_lm(self.config)
        positions = getattr(self.model.config, "n_positions", None) or getattr(
            self.model.config, "max_position_embeddings", 1024
        )
        self.prompt_budget = max(
            8, min(self.config.max_history_tokens, positions - self.config.max_new_tokens)
        )
        eos_id = self.tokenizer.eos_token_id
        if eos_id is None:
            raise EngineUnavailable(f"text.model {self.config.model!r} has no EOS token")
        c = self.config
        self._decoder = BatchDecoder(
            self.model,
            self.tokenizer,
            eos_id=eos_id,
            device=self.device,
            prefix_cache=PrefixCache(c.kv_cache_mb * 1024 * 1024),
            settings=SamplingSettings(
                max_new_tokens=c.max_new_tokens,
                temperature=c.temperature,
                top_k=c.top_k,
                top_p=c.top_p,
                repetition_penalty=c.repetition_penalty,
                greedy=c.greedy,
                stream_interval_s=c.stream_interval_ms / 1000,
            ),
            max_rows=c.max_batch_size,
            observe_rows=self._observe_step,
            on_tokens=self._count_tokens,
        )
        log.info("text model %s loaded on %s", Path(c.model).name or c.model, self.device)

    def _collect(self) -> list[_Pending] | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.monotonic() + self.config.batch_wait_ms / 1000
        while len(batch) < self.config.max_batch_size:
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

    def _request(self, pending: _Pending) -> Any:
        """The decoder's request for `pending`, or None if it was cancelled."""
        from bot.engines.decoding import DecodeRequest

        assert pending.cancelled is not None
        if pending.cancelled.is_set():
            return None
        ids = encode_dialogue(self.tokenizer, pending.turns, self.prompt_budget)
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

        def admit(room: int) -> list[Any]:
            """Requests queued since the batch started, to join it now."""
            nonlocal stopping
            joining = []
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
            self._decoder.run(requests, admit=admit)
        except Exception as exc:
            log.exception("text generation failed for a batch of %d", len(active))
            for pending in active:
                self._send(
                    pending, "error", EngineUnavailable(f"generation failed: {type(exc).__name__}")
                )

    def _count_tokens(self, count: int) -> None:
        if self.metrics is not None and count:
            self.metrics.generated_tokens.inc(count)

    def _observe_step(self, rows: int) -> None:
        self.batch_sizes.append(rows)
        if self.metrics is not None:
            self.metrics.batch_size.observe(rows)

    def _sender(self, pending: _Pending) -> Any:
        def on_text(text: str, done: bool) -> None:
            self._send(pending, "done" if done else "partial", text)

        return on_text

    @staticmethod
    def _send(pending: _Pending, kind: str, value: str | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            pending.loop.call_soon_threadsafe(pending.events.put_nowait, (kind, value))

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._send(item, "error", error)
