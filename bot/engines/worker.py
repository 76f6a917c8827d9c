"""What every text engine that owns its model on one worker thread shares: the
request queue, the thread's lifecycle, batch collection and the way results
flow back to the event loop.

The worker thread owns the model. Requests from every conversation go into a
queue; the worker takes the first, waits up to `batch_wait_ms` for more (up to
`_batch_limit()`; not after a quiet spell: `bot.engines.batch_window`) and
hands them to `_run`. Results flow back to the event loop with
`call_soon_threadsafe`, so the loop never waits on the model. A subclass loads
its model in `_load` and answers a batch in `_run`, sending each request's
partial texts and final reply with `_send`.
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
from dataclasses import dataclass, field
from typing import Any

from bot.engines import EngineObserver, EngineUnavailable, TextChunk, clean_reply, final_text
from bot.engines.batch_window import BatchWindow
from bot.engines.prompt import encode_turn
from bot.engines.startup import StartGuard, settle

log = logging.getLogger(__name__)

_STOP = object()
#: turns whose token ids the worker keeps (`WorkerEngine._encode_turn`)
_TURNS_REMEMBERED = 8192
#: (kind: "partial" | "done" | "error", text or error, tokens generated)
_Event = tuple[str, str | BaseException, int]


@dataclass(slots=True)
class Pending:
    """One request, from `stream` to the worker and back."""

    turns: list[str]
    conversation: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[_Event]
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: the prompt's length once the worker fitted it to the budget
    prompt_tokens: int = 0
    #: the engine's own state for the request (e.g. the decoder's request)
    request: Any = None


class WorkerEngine:
    """The queue, the worker thread and `stream`; see the module docstring."""

    #: the worker thread's name (in logs and profiles)
    thread_name = "text-engine"

    def __init__(self, *, model_key: str, batch_wait_ms: float, observer: EngineObserver | None):
        self.observer = observer
        self._model_key = model_key
        self.batch_window = BatchWindow(batch_wait_ms / 1000)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.tokenizer: Any = None
        self.failures = 0  # batches that failed inside generation
        #: tokens generated so far, counted before the replies that hold them are sent
        self.generated_tokens = 0
        #: token ids of recent turns, least recently used first (worker thread only)
        self._turn_ids: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        #: the engine whose worker this one answers on (`serve_for`), if any
        self._owner: WorkerEngine | None = None
        #: a `start` cancelled while the model loads (`bot.engines.startup`)
        self._guard = StartGuard()

    # -- what a subclass provides (worker thread) -----------------------------------

    def _load(self) -> None:
        """Load the model; raise `EngineUnavailable` with a message a user can act on."""
        raise NotImplementedError

    def _run(self, batch: list[Pending]) -> None:
        """Answer `batch` (and, if the engine can, requests that arrive meanwhile).
        An exception fails the requests of `batch` that have no reply yet."""
        raise NotImplementedError

    def _batch_limit(self) -> int:
        """The most requests `_collect` hands to `_run` at once."""
        raise NotImplementedError

    def _unload(self) -> None:
        """Let go of the model once the worker stops (nothing by default)."""

    def serve_for(self, owner: WorkerEngine) -> None:
        """Answer on `owner`'s worker instead of a thread of this engine's own:
        `owner` calls `_load`, `_run` and `_unload` on its thread, requests come
        from its queue (a running batch admits latecomers from there), tokens are
        counted on it and turns are tokenized into its cache. Call before `start`
        would be; this engine is then never started itself."""
        self._queue = owner._queue
        self._turn_ids = owner._turn_ids
        self._owner = owner

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Load the model on the worker thread; raise `EngineUnavailable` if it can't.

        Cancelled while the model loads (shutdown during start-up), the worker is
        told to stop: a load can't be interrupted, but the thread lets go of the
        model and ends as soon as it is done, instead of serving nobody forever."""
        async with self._guard.starting:  # one start at a time: one worker
            await self._start()

    async def _start(self) -> None:
        if self._thread is not None:
            return
        await self._guard.begin()
        loaded = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(
            target=self._worker, args=(loaded,), name=self.thread_name, daemon=True
        )
        self._thread.start()
        try:
            await loaded
        except asyncio.CancelledError:
            self._guard.cancel(self._thread, self._ready.is_set, lambda: self._queue.put(_STOP))
            self._thread = None
            raise
        if self._load_error is not None:
            self._thread = None
            raise self._load_error

    async def close(self) -> None:
        """Stop the worker once the batch it runs has been answered. A worker
        still loading for a cancelled `start` is not waited for: it stops by
        itself when its load ends."""
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

    # -- requests --------------------------------------------------------------

    async def stream(
        self, turns: Sequence[str], *, conversation: str = ""
    ) -> AsyncIterator[TextChunk]:
        if not self.ready:
            raise EngineUnavailable("the text engine is not running")
        loop = asyncio.get_running_loop()
        pending = Pending(list(turns), conversation, loop, asyncio.Queue())
        self._queue.put(pending)
        self._observe_queue()
        try:
            while True:
                kind, value, tokens = await pending.events.get()
                if isinstance(value, BaseException):
                    raise value
                if kind == "done":
                    # the worker set `prompt_tokens` before it sent "done"
                    yield TextChunk(
                        clean_reply(value),
                        final=True,
                        tokens=tokens,
                        prompt_tokens=pending.prompt_tokens,
                    )
                    return
                yield TextChunk(value.strip(), final=False)
        finally:
            pending.cancelled.set()  # dropped at the next decode step if still running

    async def generate(self, turns: Sequence[str], *, conversation: str = "") -> str:
        """The final reply's text ("" when the model said nothing)."""
        return await final_text(self, turns, conversation=conversation)

    def _observe_queue(self) -> None:
        if self.observer is not None:
            self.observer.observe_queue("text", self._queue.qsize())

    # -- worker thread -----------------------------------------------------------

    def _worker(self, loaded: asyncio.Future[None]) -> None:
        loop = loaded.get_loop()
        abandoned = False
        self._load_error = None
        try:
            self._load()
            self.batch_window.rest()  # idle from here, before `start` returns
            abandoned = not self._guard.serve(self._ready.set)
        except BaseException as exc:  # reported to start(), which raises it
            self._load_error = (
                exc
                if isinstance(exc, EngineUnavailable)
                else EngineUnavailable(f"{self._model_key} could not be loaded: {exc}")
            )
            if not isinstance(exc, EngineUnavailable):
                log.exception("loading the text model failed")
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: start() is gone
                loop.call_soon_threadsafe(settle, loaded)
        if abandoned:
            log.info("the text model loaded after start-up was cancelled: unloading it")
        if abandoned or self._load_error is not None:
            with contextlib.suppress(Exception):  # whatever part of it did load
                self._unload()
            return
        try:
            while True:
                batch = self._collect()
                if batch is None:
                    return
                try:
                    self._run(batch)
                except Exception as exc:
                    self._failed(batch, exc)
                self.batch_window.rest()
        finally:
            self._ready.clear()
            self._fail_queued(EngineUnavailable("the text engine stopped"))
            self._unload()

    def _failed(self, batch: list[Pending], exc: Exception) -> None:
        """Generation raised `exc` for `batch` (call it in the `except` block): its
        requests fail, the engine goes on."""
        (self._owner or self).failures += 1
        log.exception("text generation failed for a batch of %d", len(batch))
        error = EngineUnavailable(f"generation failed: {type(exc).__name__}")
        for pending in batch:
            self._send(pending, "error", error)

    def _collect(self, *, burst: int = 0, burst_s: float = 0.0) -> list[Pending] | None:
        """The first request waiting (blocking) and whatever joins it within
        `batch_wait_ms`, up to `_batch_limit()`; None once the engine stops. While
        the batch has fewer than `burst` requests it also takes those that come
        within `batch_wait_ms` of the one before, for up to `burst_s` longer. After
        a quiet spell the first starts at once, with whatever is queued already."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        limit = self._batch_limit()
        window = self.batch_window.wait()
        started = last = time.monotonic()
        if not window:
            burst = 0
        while len(batch) < limit:
            deadline = started + window
            if len(batch) < burst:
                deadline = min(max(deadline, last + window), started + window + burst_s)
            item = self._take(deadline - time.monotonic())
            if item is None:
                break
            batch.append(item)
            last = time.monotonic()
        return batch

    def _take(self, timeout: float) -> Pending | None:
        """The next request queued within `timeout` seconds, or None (also when the
        engine was told to stop: the stop stays queued for `_collect`)."""
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is _STOP:
            self._queue.put(_STOP)
            return None
        pending: Pending = item
        return pending

    def _take_waiting(self, room: int) -> tuple[list[Pending], bool]:
        """Up to `room` requests queued now, without blocking, and whether the
        engine was told to stop meanwhile (the stop stays queued)."""
        taken: list[Pending] = []
        while len(taken) < room:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                return taken, True
            taken.append(item)
        return taken, False

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

    def _count_tokens(self, count: int) -> None:
        if self._owner is not None:
            self._owner._count_tokens(count)
            return
        self.generated_tokens += count
        if self.observer is not None:
            self.observer.count_tokens(count)

    @staticmethod
    def _send(pending: Pending, kind: str, value: str | BaseException, tokens: int = 0) -> None:
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
