"""An optional local text classifier for moderation (`[moderation] classifier`).

A transformers `text-classification` pipeline over a local checkpoint (a
toxicity or offensive-language model, say), loaded on its own worker thread at
start-up and run there: the event loop never waits on it. Texts from every
conversation queue up; the worker takes all that are waiting (up to
`max_batch`) and scores them in one call. A text is flagged when one of the
flagged labels (`classifier_labels`) scores at least `classifier_threshold`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bot.governance.errors import GovernanceError
from bot.governance.moderation import Verdict

log = logging.getLogger(__name__)

KEY = "moderation.classifier"


class ClassifierFailed(Exception):
    """Scoring failed at run time (the text is let through; the error is logged)."""


class Classifier:
    def __init__(
        self,
        path: Path,
        *,
        threshold: float,
        labels: Sequence[str],
        max_batch: int = 32,
        max_tokens: int = 512,
    ) -> None:
        self.path = path
        self.threshold = threshold
        self.flagged = {label.casefold() for label in labels}
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moderation-classifier")
        self._pipeline: Any = None
        self._max_length = max_tokens
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[Verdict | None]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        #: Calls of the model (each scores a batch of texts), for tests and logs.
        self.batches = 0

    async def start(self) -> None:
        """Load the model on the worker thread; `GovernanceError` if it can't be."""
        loop = asyncio.get_running_loop()
        self._pipeline = await loop.run_in_executor(self._executor, self._load)
        self._worker = asyncio.create_task(self._work(), name="moderation-classifier")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            _text, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(ClassifierFailed("the classifier was closed"))
        await asyncio.to_thread(self._executor.shutdown)

    async def check(self, text: str) -> Verdict | None:
        if self._worker is None:
            raise ClassifierFailed("the classifier is not started")
        future: asyncio.Future[Verdict | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((text, future))
        return await future

    # -- the worker ----------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            texts = [text for text, _future in batch]
            try:
                verdicts = await loop.run_in_executor(self._executor, self._score, texts)
            except Exception as exc:
                log.exception("the moderation classifier failed on %d texts", len(texts))
                for _text, future in batch:
                    if not future.done():
                        future.set_exception(ClassifierFailed(f"{type(exc).__name__}: {exc}"))
                continue
            for (_text, future), verdict in zip(batch, verdicts, strict=True):
                if not future.done():
                    future.set_result(verdict)

    def _load(self) -> Any:
        if not self.path.is_dir():
            raise GovernanceError(
                f"{KEY} {str(self.path)!r} is not a directory: set it to a local "
                'text-classification checkpoint, or to "" for none'
            )
        from transformers import pipeline
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            classify = pipeline(
                "text-classification",
                model=str(self.path),
                tokenizer=str(self.path),
                device="cpu",
                top_k=None,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise GovernanceError(
                f"{KEY} {str(self.path)!r} cannot be loaded as a text classifier: {exc}"
            ) from exc
        id2label = classify.model.config.id2label or {}
        labels = {str(name) for name in id2label.values()}
        if not {label.casefold() for label in labels} & self.flagged:
            raise GovernanceError(
                f"{KEY}: none of the model's labels ({', '.join(sorted(labels))}) is in "
                "moderation.classifier_labels, so it would never flag anything: "
                "list the labels that mean a text must be blocked"
            )
        # Long texts are cut to what the model can read (some tokenizers say no limit).
        limits = [
            self.max_tokens,
            getattr(classify.tokenizer, "model_max_length", self.max_tokens),
            getattr(classify.model.config, "max_position_embeddings", self.max_tokens),
        ]
        self._max_length = min(int(limit) for limit in limits if limit)
        log.info("moderation classifier loaded from %s (labels: %s)", self.path, sorted(labels))
        return classify

    def _score(self, texts: list[str]) -> list[Verdict | None]:
        self.batches += 1
        results = self._pipeline(texts, truncation=True, max_length=self._max_length)
        verdicts: list[Verdict | None] = []
        for scores in results:
            flagged = [
                (float(entry["score"]), str(entry["label"]))
                for entry in scores
                if str(entry["label"]).casefold() in self.flagged
            ]
            best = max(flagged, default=None)
            if best is not None and best[0] >= self.threshold:
                verdicts.append(Verdict("classifier", f"{best[1]} {best[0]:.2f}"))
            else:
                verdicts.append(None)
        return verdicts
