"""`text.engine = "auto"` on a CPU with AMX, or without VNNI: small batches on
CTranslate2, large ones on the local engine, from one queue on one worker thread.

Why two engines: measured through the whole bot on an Intel Xeon with AMX
(docs/PERFORMANCE.md), CTranslate2 answered one user 3.2-4.1x and eight users
1.1-1.2x as fast as the local engine (its decode loop is C++; a one-row step
of ours is some 150 PyTorch calls, each with a fixed cost), while at 32 users
the local engine served 1.0-1.4x as many tokens a second (AMX bf16 products,
continuous batching, prefix reuse). On an AMD EPYC of the first generation
(AVX2, no VNNI: CTranslate2's int8 products are slow there) it was the same
picture: CTranslate2 twice as fast for one user, about even at 8, the local
engine in fp32 1.2-1.3x ahead at 32. Neither is the faster engine at every load.

So each batch the worker collects goes to the engine that is faster at its
size: fewer than `large_batch` requests to CTranslate2, more to the local
engine, which goes on admitting the requests that arrive while it decodes, so
under sustained load the work stays there until the batch drains. A small
batch goes on collecting while requests keep arriving less than
`batch_wait_ms` apart, for up to `BURST_WAIT_S` longer (a lone request waits
no longer than before): a burst of 32 users reaches the worker over tens of
milliseconds (each message goes through the manager and the database first),
and without that its first part went to CTranslate2 and only the rest to the
local engine, one after the other. (A request that finds the worker idle after a
quiet spell starts at once, burst or not: `bot.engines.batch_window` says what
that saves and costs.)

Both engines load the same model; CTranslate2's converted copy is cached as in
`bot.engines.ct2`. They share `kv_cache_mb`: CTranslate2 loads first, and the
most its sub-batches may hold is kept out of the local engine's slots and
prefix cache. When one cannot load the model (CTranslate2 missing; a model
that is not GPT-2-family, which only CTranslate2 serves), the other answers
every batch and a warning says why.
"""

from __future__ import annotations

import logging

from bot.engines import EngineObserver, EngineUnavailable, KvUse
from bot.engines.ct2 import Ct2TextEngine
from bot.engines.settings import Ct2EngineSettings, LocalEngineSettings
from bot.engines.text import LocalTextEngine
from bot.engines.worker import Pending, WorkerEngine

log = logging.getLogger(__name__)

#: A batch of at least this many requests goes to the local engine. The crossover
#: measured on the AMX Xeon lies between 8 users (CTranslate2 1.1-1.2x ahead) and
#: 32 (the local engine 1.0-1.4x ahead); see docs/PERFORMANCE.md.
LARGE_BATCH = 16
#: the most a small batch goes on collecting a burst, beyond `batch_wait_ms`: 50 ms
#: split the lockstep rounds of 32 users on a slow EPYC (AVX2 only), whose messages
#: reached the engine over more than that (docs/PERFORMANCE.md)
BURST_WAIT_S = 0.2


class HybridTextEngine(WorkerEngine):
    """CTranslate2 for batches of fewer than `large_batch` requests, the local
    engine for larger ones; see the module docstring."""

    thread_name = "text-engine"

    def __init__(
        self,
        local: LocalEngineSettings,
        small: Ct2EngineSettings,
        observer: EngineObserver | None = None,
        *,
        large_batch: int = LARGE_BATCH,
    ) -> None:
        super().__init__(
            model_key=local.model.key, batch_wait_ms=local.batch_wait_ms, observer=observer
        )
        self.large_batch = large_batch
        #: both, whatever a fallback left in `local` and `small` (a restart tries both)
        self._engines = (LocalTextEngine(local, observer), Ct2TextEngine(small, observer))
        for engine in self._engines:
            engine.serve_for(self)
        #: each None once it failed to load: then the other answers everything
        self.local: LocalTextEngine | None = self._engines[0]
        self.small: Ct2TextEngine | None = self._engines[1]
        #: batches each engine answered
        self.batches = {"local": 0, "ctranslate2": 0}

    # -- what callers read of an engine: the local engine's where it runs ---------

    @property
    def prompt_budget(self) -> int:
        engine = self.local or self.small
        return engine.prompt_budget if engine is not None else 0

    @property
    def quantized(self) -> str:
        if self.local is not None:
            return self.local.quantized
        return self.small.compute_type if self.small is not None else "none"

    # -- worker thread -----------------------------------------------------------

    def _batch_limit(self) -> int:
        engine = self.local or self.small
        return engine._batch_limit() if engine is not None else 1

    def _load(self) -> None:
        """Both engines; either alone if the other cannot load (the local engine
        serves GPT-2-family models only, CTranslate2 may be missing or fail to
        convert), with a warning; the local engine's error if neither can.
        CTranslate2 loads first: what its sub-batches may hold of `kv_cache_mb`
        is kept out of the local engine's share."""
        self.local, self.small = local, small = self._engines
        local.kv_reserved_bytes = 0
        small_error: Exception | None = None
        try:
            small._load()
            local.kv_reserved_bytes = small.kv_reserved_bytes
        except Exception as exc:  # reported below, once it is known what serves
            small_error = exc
        try:
            local._load()
        except EngineUnavailable as exc:
            if small_error is not None:  # neither: the local engine's reason, alone
                raise exc from None  # (a missing model is one line a user can act on)
            log.warning("the local engine is not used (%s): CTranslate2 answers every batch", exc)
            self.local = None
            self.tokenizer = small.tokenizer
            return
        except BaseException:
            small._unload()
            raise
        self.tokenizer = local.tokenizer
        rows = local._batch_limit()
        if rows < self.large_batch:  # `kv_cache_mb` holds fewer rows (a larger model)
            self.large_batch = max(2, rows)
            log.info(
                "the local engine holds %d rows: batches of %d and more go to it",
                rows,
                self.large_batch,
            )
        if small_error is not None:
            known = isinstance(small_error, EngineUnavailable)
            log.warning(
                "CTranslate2 is not used (%s): the local engine answers every batch",
                small_error if known else f"{type(small_error).__name__}: {small_error}",
                exc_info=None if known else small_error,
            )
            self.small = None

    def kv_use(self) -> KvUse:
        """Both engines' key/value memory (the local engine's slots stay allocated
        while CTranslate2 decodes)."""
        use = KvUse()
        for engine in (self.local, self.small):
            if engine is not None:
                use = use + engine.kv_use()
        return use

    def _collect(self, *, burst: int = 0, burst_s: float = 0.0) -> list[Pending] | None:
        """A batch too small for the local engine goes on collecting a burst (see
        the module docstring)."""
        if self.small is None or self.local is None:
            return super()._collect()
        return super()._collect(burst=self.large_batch, burst_s=BURST_WAIT_S)

    def _run(self, batch: list[Pending]) -> None:
        local, small = self.local, self.small
        if small is not None and (local is None or len(batch) < self.large_batch):
            self.batches["ctranslate2"] += 1
            small._run(batch)
        elif local is not None:
            self.batches["local"] += 1
            local._run(batch)

    def _unload(self) -> None:
        for engine in self._engines:
            engine._unload()

    async def close(self) -> None:
        if self.small is not None:
            self.small.stop_batch()
        await super().close()
