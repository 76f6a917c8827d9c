"""The CTranslate2 text engine (`text.engine = "ctranslate2"`): the same model,
converted once by CTranslate2's own converter and served by its C++ kernels.

Why a second engine: on a CPU without AMX, CTranslate2's int8 products are
faster than anything PyTorch offers there, and its decode loop has no
per-operation cost. On a Zen 5 EPYC with the bundled model it answered one
user in 37 ms where ours takes 86 ms, and served 32 users 1.2-1.4x faster
(docs/PERFORMANCE.md). What it gives up against the local engine, by design
of CTranslate2's API: no prefix reuse (every prompt is encoded whole, so
latency grows with the history), and no continuous batching (a request that
arrives while a batch decodes waits for the next batch, which waits
`batch_wait_ms` for company as the local engine's does). Streaming and
cancellation work: CTranslate2 calls back for every token, and the callback
stops a row whose caller went away.

Conversion is cached under `[bot] data_dir`/ctranslate2, one folder per
model, precision and CTranslate2 version, keyed by the model files' names,
sizes and times (a retrained model is converted again; older conversions of
the same model are removed). It happens on the worker thread, into a
temporary folder that is renamed when complete, so a crash never leaves half
a model behind.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.engines import EngineObserver, EngineUnavailable, KvUse
from bot.engines.loading import (
    load_local_or_hub,
    load_pretrained_lm,
    load_tokenizer,
    looks_local,
    model_missing_message,
)
from bot.engines.prompt import fit_dialogue
from bot.engines.settings import Ct2EngineSettings
from bot.engines.worker import Pending, WorkerEngine

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'aigc-bot[ctranslate2]'"
#: what `text.quantize` means here, per device
COMPUTE_TYPES = {
    "cpu": {"auto": "int8", "none": "float32", "int8": "int8", "bf16": "bfloat16"},
    "cuda": {"auto": "float16", "none": "float16", "int8": "int8_float16", "bf16": "bfloat16"},
}
_META = "aigc-bot.json"
#: CTranslate2 feeds the prompt tokens beyond a batch's shortest prompt one step at
#: a time, so a batch runs as length-sorted sub-batches of this many rows. With 32
#: users on the bundled model (Zen 5, one thread): 2,943 tokens/s in sub-batches of
#: 4, 2,509 of 8, 1,884 in one batch; one user alone is as fast either way.
SUB_BATCH = 4


def cache_itemsize(compute_type: str) -> int:
    """Bytes per key/value number: CTranslate2 keeps them in the precision of its
    activations (float32 for "int8" and "float32" on the CPU, 16 bits for the
    float16 and bfloat16 types)."""
    return 2 if "float16" in compute_type else 4  # "bfloat16" included


def _first(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 0


def position_kv_bytes(config: Any, compute_type: str) -> int:
    """Key/value bytes of one position of one row: keys and values in every layer,
    for the key/value heads only where the model shares them (grouped-query
    attention); 0 where the config does not say (then nothing is bounded)."""
    layers = _first(config, "n_layer", "num_hidden_layers", "n_layers", "num_layers")
    width = _first(config, "n_embd", "hidden_size", "d_model")
    heads = _first(config, "n_head", "num_attention_heads", "n_heads")
    kv_heads = _first(config, "num_key_value_heads", "n_kv_heads") or heads
    if heads and kv_heads < heads:
        width = width * kv_heads // heads
    return 2 * layers * width * cache_itemsize(compute_type)


#: a `.converting-*` folder older than this was left by a process that died
STALE_SCRATCH_S = 3600


def ctranslate2_missing() -> str | None:
    """Why this engine cannot run here, or None when it can."""
    if importlib.util.find_spec("ctranslate2") is None:
        return f"text.engine = 'ctranslate2' needs CTranslate2: {INSTALL_HINT}"
    try:
        import ctranslate2  # noqa: F401
    except Exception as exc:  # found but broken (a wheel for another CPU, a missing library)
        return f"text.engine = 'ctranslate2': CTranslate2 does not load ({exc}): {INSTALL_HINT}"
    return None


def compute_type_missing(device: str, compute_type: str) -> str | None:
    """Why CTranslate2 cannot compute in `compute_type` on `device` here, or None."""
    import ctranslate2

    supported = sorted(ctranslate2.get_supported_compute_types(device))
    if compute_type in supported:
        return None
    return (
        f"CTranslate2 cannot compute in {compute_type} on this {device} (it can: "
        f"{', '.join(supported)}): set text.quantize to another value"
    )


def fingerprint(folder: Path) -> str:
    """The model files' names, sizes and modification times, hashed: what
    tells a retrained or replaced model from the one converted before."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            stat = path.stat()
            digest.update(f"{relative.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _family(name: str, compute_type: str) -> str:
    """The folder-name prefix of every conversion of model `name` (its path or
    hub id, hashed whole: two models both called "chat" stay apart) in
    `compute_type`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name or name).strip("-") or "model"
    where = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{slug}-{where}-{compute_type}-"


def cache_folder(cache_dir: Path, name: str, model_id: str, compute_type: str) -> Path:
    """Where the conversion of model `name` (whose content `model_id` names) in
    `compute_type` lives."""
    import ctranslate2

    key = hashlib.sha256(
        json.dumps([model_id, compute_type, ctranslate2.__version__]).encode()
    ).hexdigest()[:16]
    return cache_dir / f"{_family(name, compute_type)}{key}"


def convert(source: str, target: Path, compute_type: str, *, name: str | None = None) -> None:
    """`source` (a model folder) converted into `target`, atomically: into a
    temporary sibling first, renamed when complete (if another process got
    there first, its copy is kept). Then the other conversions of model `name`
    in the same precision are removed, and scratch folders that a process
    which died mid-conversion left behind."""
    from ctranslate2.converters import TransformersConverter
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        output = scratch / "model"
        TransformersConverter(source).convert(str(output), quantization=compute_type, force=True)
        (output / _META).write_text(json.dumps({"source": source}), encoding="utf-8")
        if target.is_dir() and not (target / "model.bin").is_file():
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy: replace it
        try:
            os.replace(output, target)
        except OSError:
            # another process (of a scaled-out bot) converted the same model first
            if not (target / "model.bin").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _prune(target, name or source, compute_type)


def _prune(target: Path, name: str, compute_type: str) -> None:
    family = re.compile(re.escape(_family(name, compute_type)) + r"[0-9a-f]{16}")
    now = time.time()
    for other in target.parent.iterdir():
        if other == target or not other.is_dir():
            continue
        stale_scratch = (
            other.name.startswith(".converting-") and now - other.stat().st_mtime > STALE_SCRATCH_S
        )
        if family.fullmatch(other.name) or stale_scratch:
            shutil.rmtree(other, ignore_errors=True)


@dataclass(slots=True)
class _Row:
    """What one request of a running batch has produced so far."""

    pending: Pending
    ids: list[int] = field(default_factory=list)
    last_text: str = ""
    last_emit: float = 0.0
    #: its reply (or error) is sent
    done: bool = False


#: Machines with at most this many cores give CTranslate2 one thread when
#: `text.threads = 0`: on a 2-vCPU Xeon its two-thread kernels ran 4.5-9x slower
#: than one thread, alone in the process (docs/PERFORMANCE.md), and the event
#: loop and the database need the other core anyway.
SMALL_MACHINE_CORES = 2


def intra_threads(configured: int) -> int:
    """CTranslate2's `intra_threads` for `text.threads` (0: one thread on a small
    machine, CTranslate2's own default, 0, elsewhere)."""
    if configured:
        return configured
    return 1 if (os.cpu_count() or 1) <= SMALL_MACHINE_CORES else 0


class _StepRows:
    """Rows per decode step, from CTranslate2's per-token callbacks, for
    `EngineObserver.observe_batch` (the local engine reports each step's rows
    too). A step's callbacks come one per row; a row seen again, or another
    step index, begins the next step (sub-batches run one after another)."""

    def __init__(self, observer: EngineObserver) -> None:
        self.observer = observer
        self.step = -1
        self.rows: set[int] = set()

    def see(self, step: int, row: int) -> None:
        if step != self.step or row in self.rows:
            self.flush()
            self.step = step
        self.rows.add(row)

    def flush(self) -> None:
        if self.rows:
            self.observer.observe_batch(len(self.rows))
            self.rows = set()


class Ct2TextEngine(WorkerEngine):
    """Batched, streaming generation through CTranslate2's `Generator`."""

    thread_name = "ctranslate2-engine"

    def __init__(self, settings: Ct2EngineSettings, observer: EngineObserver | None = None):
        super().__init__(
            model_key=settings.model.key, batch_wait_ms=settings.batch_wait_ms, observer=observer
        )
        self.settings = settings
        self.generator: Any = None
        self.device = "cpu"
        self.compute_type = ""
        self.prompt_budget = settings.max_history_tokens
        self.eos_id = 0
        self.positions = 1024
        self.converted: Path | None = None
        self.conversions = 0  # models converted by this engine (not found in the cache)
        #: rows of each recent batch
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)
        #: set by `close`: the batch running stops at its next token
        self._stopping = threading.Event()
        #: rows per sub-batch: `SUB_BATCH`, fewer where `kv_cache_mb` holds fewer
        self.sub_batch = SUB_BATCH
        self._position_kv_bytes = 0
        #: the most key/value memory a sub-batch held so far (its longest prompt
        #: plus the reply, for its rows)
        self.kv_peak_bytes = 0

    async def close(self) -> None:
        self.stop_batch()
        await super().close()

    def stop_batch(self) -> None:
        """Stop the batch running now at its next token, for good (the engine is
        closing): its callers get the replies so far."""
        self._stopping.set()

    # -- loading (worker thread) -------------------------------------------------

    def _load(self) -> None:
        missing = ctranslate2_missing()
        if missing is not None:
            raise EngineUnavailable(missing)
        import ctranslate2

        s = self.settings
        source = s.model
        cuda_devices = ctranslate2.get_cuda_device_count()
        device = source.device
        if device == "auto":
            device = "cuda" if cuda_devices else "cpu"
        if device == "cuda" and not cuda_devices:
            raise EngineUnavailable(
                f"{source.device_key} = 'cuda' but this CTranslate2 build sees no CUDA device: "
                f"set {source.device_key} = 'cpu' or 'auto'"
            )
        self.device = device
        self.compute_type = COMPUTE_TYPES[device][s.quantize]
        unsupported = compute_type_missing(device, self.compute_type)
        if unsupported is not None:
            raise EngineUnavailable(f"text.quantize = {s.quantize!r}: {unsupported}")
        missing_model = model_missing_message(source.key, source.name)
        invalid = f"{source.key} {source.name!r} is not a loadable model"
        config = load_local_or_hub(
            source.name, _load_config, missing=missing_model, invalid=invalid
        )
        self.tokenizer = load_local_or_hub(
            source.name, load_tokenizer, missing=missing_model, invalid=invalid
        )
        if self.tokenizer.eos_token_id is None:
            raise EngineUnavailable(f"{invalid}: its tokenizer has no EOS token")
        self.eos_id = int(self.tokenizer.eos_token_id)
        positions = int(
            getattr(config, "n_positions", None)
            or getattr(config, "max_position_embeddings", None)
            or 1024
        )
        self.positions = positions
        max_new = s.sampling.max_new_tokens
        self.prompt_budget = max(8, min(s.max_history_tokens, positions - max_new))
        self.converted = self._converted(source.name, config)
        try:
            self.generator = self._open(self.converted)
        except (RuntimeError, ValueError) as exc:
            if self.conversions:  # converted just now: converting again will not help
                raise EngineUnavailable(
                    f"CTranslate2 could not load {self.converted} ({self.compute_type} on "
                    f"{device}): {exc}"
                ) from exc
            # a cached copy that does not load (cut short, another version): once more
            log.warning(
                "the cached conversion %s does not load (%s): converting again", self.converted, exc
            )
            shutil.rmtree(self.converted, ignore_errors=True)
            self.converted = self._converted(source.name, config)
            self.generator = self._open(self.converted)
        self._plan_sub_batch(config)
        log.info(
            "text model %s served by CTranslate2 %s on %s (%s)",
            Path(source.name).name or source.name,
            ctranslate2.__version__,
            device,
            self.compute_type,
        )

    def _plan_sub_batch(self, config: Any) -> None:
        """Rows per sub-batch within `kv_cache_mb`, for rows of the longest prompt
        and reply the budget allows."""
        s = self.settings
        self._position_kv_bytes = position_kv_bytes(config, self.compute_type)
        budget = s.kv_cache_mb * 2**20
        rows = min(SUB_BATCH, s.max_batch_size)
        if budget and not self._position_kv_bytes:
            log.warning(
                "the config of %s names no layer count or width: CTranslate2's sub-batches "
                "are not sized to text.kv_cache_mb",
                s.model.name,
            )
        elif budget and rows * self.row_kv_bytes > budget:
            rows = max(1, budget // self.row_kv_bytes)
            log.warning(
                "text.kv_cache_mb = %d holds the keys/values of %d rows of %d positions: "
                "CTranslate2 decodes %d at a time",
                s.kv_cache_mb,
                rows,
                self.row_positions,
                rows,
            )
        self.sub_batch = rows

    @property
    def row_positions(self) -> int:
        """The most positions a row holds: the prompt budget and the longest reply."""
        return min(self.positions, self.prompt_budget + self.settings.sampling.max_new_tokens)

    @property
    def row_kv_bytes(self) -> int:
        """Key/value bytes of a row at `row_positions`."""
        return self.row_positions * self._position_kv_bytes

    @property
    def kv_reserved_bytes(self) -> int:
        """The most key/value memory a sub-batch can hold, once loaded (what an
        engine sharing `kv_cache_mb` leaves for this one)."""
        return self.sub_batch * self.row_kv_bytes

    def kv_use(self) -> KvUse:
        return KvUse(self.kv_peak_bytes, self.sub_batch)

    def _open(self, folder: Path) -> Any:
        import ctranslate2

        return ctranslate2.Generator(
            str(folder),
            device=self.device,
            compute_type=self.compute_type,
            intra_threads=intra_threads(self.settings.threads),
            inter_threads=1,
        )

    def _unload(self) -> None:
        self.generator = None  # the model's memory and CTranslate2's threads

    def _converted(self, name: str, config: Any) -> Path:
        """The converted model's folder, converting first if the cache has none."""
        s = self.settings
        local = looks_local(name)
        model_id = (
            fingerprint(Path(name).expanduser())
            if local
            else (f"{name}@{getattr(config, '_commit_hash', None) or ''}")
        )
        target = cache_folder(s.cache_dir, name, model_id, self.compute_type)
        if (target / "model.bin").is_file():
            return target
        started = time.perf_counter()
        try:
            if local:
                convert(str(Path(name).expanduser()), target, self.compute_type, name=name)
            else:  # from the hub cache (downloaded by the loader if needed), via a local copy
                model, tokenizer = load_pretrained_lm(
                    name,
                    missing=model_missing_message(s.model.key, name),
                    invalid=f"{s.model.key} {name!r} is not a loadable model",
                )
                with tempfile.TemporaryDirectory(prefix="aigc-ct2-") as copy:
                    model.save_pretrained(copy)
                    tokenizer.save_pretrained(copy)
                    del model
                    convert(copy, target, self.compute_type, name=name)
        except EngineUnavailable:
            raise
        except Exception as exc:
            raise EngineUnavailable(
                f"{s.model.key} {name!r} could not be converted for CTranslate2: {exc}"
            ) from exc
        self.conversions += 1
        log.info(
            "converted %s for CTranslate2 in %.1f s: %s",
            name,
            time.perf_counter() - started,
            target,
        )
        return target

    # -- answering (worker thread) -------------------------------------------------

    def _batch_limit(self) -> int:
        return self.settings.max_batch_size

    def _options(self, longest_prompt: int) -> dict[str, Any]:
        sampling = self.settings.sampling
        # no position past the model's: a reply is cut short instead of failing
        room = max(1, self.positions - longest_prompt)
        return {
            "max_batch_size": self.sub_batch,
            "max_length": min(sampling.max_new_tokens, room),
            "min_length": min(sampling.min_new_tokens, room),
            "repetition_penalty": sampling.repetition_penalty,
            "end_token": [self.eos_id],
            "include_prompt_in_result": False,
            "sampling_topk": 1 if sampling.greedy else sampling.top_k,
            "sampling_topp": 1.0 if sampling.greedy else sampling.top_p,
            "sampling_temperature": 1.0 if sampling.greedy else sampling.temperature,
        }

    def _prompt(self, pending: Pending) -> list[str]:
        """The request's prompt as CTranslate2's tokens: the same history window as
        the local engine's (the anchors that keep it stable for that engine's
        prefix cache also keep prompts a third shorter: all history that fits made
        the bench's 32 users 20% slower here). At least two tokens: with a
        one-token prompt in a batch, CTranslate2 feeds no prompt ahead of
        decoding and returns the other rows' prompts as part of their replies."""
        ids = fit_dialogue(pending.turns, self.prompt_budget, self._encode_turn)
        if len(ids) < 2:
            ids = [self.eos_id] * (2 - len(ids)) + ids
        pending.prompt_tokens = len(ids)
        tokens: list[str] = self.tokenizer.convert_ids_to_tokens(ids)
        return tokens

    def _run(self, batch: list[Pending]) -> None:
        live = [pending for pending in batch if not pending.cancelled.is_set()]
        self._observe_queue()
        if not live:
            return
        if self._stopping.is_set():  # closing: a batch started now would stop at once
            for pending in live:
                self._send(pending, "error", EngineUnavailable("the text engine stopped"))
            return
        rows = [_Row(pending) for pending in live]
        prompts = [self._prompt(pending) for pending in live]
        self.batch_sizes.append(len(rows))
        steps = _StepRows(self.observer) if self.observer is not None else None
        longest = max(len(prompt) for prompt in prompts)
        options = self._options(longest)
        rows_at_once = min(self.sub_batch, len(rows))
        held = rows_at_once * (longest + options["max_length"]) * self._position_kv_bytes
        self.kv_peak_bytes = max(self.kv_peak_bytes, held)
        try:
            results = self.generator.generate_batch(
                prompts, callback=lambda step: self._on_step(rows, step, steps), **options
            )
        finally:
            if steps is not None:
                steps.flush()
        for row, result in zip(rows, results, strict=True):
            if not row.done:  # stopped (cancelled), or the callback failed for it
                row.ids = [token for token in result.sequences_ids[0] if token != self.eos_id]
                self._finish(row)

    def _finish(self, row: _Row) -> None:
        """Count the row's tokens (before anyone hears of them: quotas read the
        count) and send its reply."""
        row.done = True
        if row.ids:
            self._count_tokens(len(row.ids))
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        self._send(row.pending, "done", text, len(row.ids))

    def _on_step(self, rows: list[_Row], step: Any, steps: _StepRows | None = None) -> bool:
        """CTranslate2's callback for each new token of one row (on one of its
        threads, while the worker waits in `generate_batch`); True stops that
        row. Streams the growing text at most every `stream_interval_s`, and
        sends the reply as soon as the row ends: sub-batches run one after
        another, so the first would otherwise wait for the last."""
        row = rows[step.batch_id]
        if row.done:
            return True
        try:
            if steps is not None:
                steps.see(step.step, step.batch_id)
            if row.pending.cancelled.is_set() or self._stopping.is_set():
                return True
            if step.token_id != self.eos_id:
                row.ids.append(step.token_id)
            if step.is_last:
                self._finish(row)
                return False
            now = time.monotonic()
            if now - row.last_emit < self.settings.sampling.stream_interval_s:
                return False
            row.last_emit = now
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            if text != row.last_text and not text.endswith("\ufffd"):
                row.last_text = text
                self._send(row.pending, "partial", text)
        except Exception as exc:  # must not cross into CTranslate2's C++ loop
            log.exception("streaming a reply failed; the reply is given up")
            row.done = True
            self._send(row.pending, "error", EngineUnavailable(f"generation failed: {exc}"))
            return True
        return False


def _load_config(target: str, local_files_only: bool) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(target, local_files_only=local_files_only)
