"""The local text engine: a GPT-2-family model served from one worker thread.

The worker thread owns the model (`bot.engines.worker`). Requests from every
conversation go into a queue; the worker takes the first, waits up to
`batch_wait_ms` for more (up to the batch size) and decodes them together;
requests that arrive while a batch is decoding join it at the next step
(continuous batching, see `bot.engines.decoding`). Results flow back to the
event loop with `call_soon_threadsafe`, so the loop never waits on the model.

A failure inside generation (an exception, out of memory) fails the requests
of that batch with `EngineUnavailable`; the worker goes on with the next.
"""

from __future__ import annotations

import collections
import gc
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.engines import EngineObserver, EngineUnavailable, KvUse
from bot.engines.decoding import BatchDecoder, DecodeRequest
from bot.engines.loading import free_memory, is_out_of_memory, load_causal_lm, model_positions
from bot.engines.prefix_cache import PrefixCache
from bot.engines.prompt import fit_dialogue
from bot.engines.settings import LocalEngineSettings
from bot.engines.worker import Pending, WorkerEngine

log = logging.getLogger(__name__)


class LocalTextEngine(WorkerEngine):
    """Batched, streaming generation from a local or hub GPT-2-family model."""

    def __init__(
        self, settings: LocalEngineSettings, observer: EngineObserver | None = None
    ) -> None:
        super().__init__(
            model_key=settings.model.key, batch_wait_ms=settings.batch_wait_ms, observer=observer
        )
        self.settings = settings
        self._decoder: BatchDecoder | None = None
        self.model: Any = None
        self.device: Any = None
        self.prompt_budget = settings.max_history_tokens
        #: rows in each recent decode step (the decoder keeps running totals)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)
        #: of `kv_cache_mb`, what another engine sharing it holds (`bot.engines.hybrid`)
        self.kv_reserved_bytes = 0
        self.quantized = "none"  # what text.quantize resolved to

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
        return self.kv_use().total

    def kv_use(self) -> KvUse:
        if self._decoder is None:
            return KvUse()
        cache, runner = self._decoder.cache, self._decoder.runner
        return KvUse(runner.nbytes, runner.slots, cache.bytes_used, len(cache))

    # -- worker thread -----------------------------------------------------------

    def _batch_limit(self) -> int:
        return self._decoder.max_rows if self._decoder is not None else 1

    def _load(self) -> None:
        import torch

        from bot.engines.gpt2 import Gpt2Runner, supports
        from bot.engines.linears import bf16_is_fast, packed_linears_available, quantize_linears

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
        fast_bf16 = bf16_is_fast() and packed_linears_available()
        if quantize == "auto":
            quantize = "bf16" if self.device.type == "cpu" and fast_bf16 else "none"
        elif quantize == "bf16" and self.device.type == "cpu" and not packed_linears_available():
            log.warning(
                "text.quantize = 'bf16': this CPU has no oneDNN bf16 products (they need "
                "AVX-512 or AVX-NE-CONVERT), so bf16 runs slower than 'none' (fp32) here"
            )
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

    def _unload(self) -> None:
        """Let go of the model and its caches once the worker stops."""
        self._decoder = None
        self.model = None

    def _memory_plan(self, slot_bytes: int) -> tuple[int, int]:
        """(batch rows, prefix-cache bytes) within `kv_cache_mb` (less what another
        engine sharing it reserved): the batch's own cache first, and what is left
        for earlier turns."""
        s = self.settings
        budget = s.kv_cache_mb * 2**20
        rows = s.max_batch_size
        if not budget:
            return rows, 0
        budget = max(slot_bytes, budget - self.kv_reserved_bytes)
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

    def _request(self, pending: Pending) -> DecodeRequest | None:
        """The decoder's request for `pending`, or None if it was cancelled."""
        if pending.cancelled.is_set():
            return None
        ids = fit_dialogue(pending.turns, self.prompt_budget, self._encode_turn)
        pending.prompt_tokens = len(ids)
        request = DecodeRequest(
            prompt_ids=ids,
            cache_key=pending.conversation,
            on_text=self._sender(pending),
            cancelled=pending.cancelled,
        )
        pending.request = request
        return request

    def _run(self, batch: list[Pending]) -> None:
        active = list(batch)  # everyone this run answers, latecomers included
        stopping = False

        def admit(room: int) -> list[DecodeRequest]:
            """Requests queued since the batch started, to join it now."""
            nonlocal stopping
            if stopping:
                return []
            taken, stopping = self._take_waiting(room)
            active.extend(taken)
            joining = [r for r in map(self._request, taken) if r is not None]
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
            if is_out_of_memory(exc):
                free_memory()
            self._failed(active, exc)

    def _observe_step(self, rows: int) -> None:
        self.batch_sizes.append(rows)
        if self.observer is not None:
            self.observer.observe_batch(rows)

    def _sender(self, pending: Pending) -> Callable[[str, bool], None]:
        def on_text(text: str, done: bool) -> None:
            tokens = len(pending.request.generated) if pending.request is not None else 0
            self._send(pending, "done" if done else "partial", text, tokens)

        return on_text
