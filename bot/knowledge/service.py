"""The knowledge base as the manager sees it: `decide(incoming, text, previous)`.

One message's hops: the text is normalised (shorthand, typos), embedded on
the embedding worker (batched with other users' messages), scored by the FAQ
classifier and turned into a decision: the entry's answer verbatim, a "Did
you mean …?" offer, or a fallback (recorded as unanswered). A reply to an
offer ("2", "yes", or words close to one of the offered questions) answers
that entry. A watcher notices when the FAQ file changes and rebuilds the
index in the background while the old one keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bot.knowledge.coverage import WordTable, content_words
from bot.knowledge.embedder import Embedder, Vectors
from bot.knowledge.faq import FaqEntry, FaqFile, KnowledgeError, load_faq
from bot.knowledge.index import FaqIndex, IndexCache, build_index
from bot.knowledge.matching import Match, chosen_suggestion, rank, suggestion_text, suggestions
from bot.knowledge.text import Normalizer, faq_normalizer
from bot.messages import Incoming, Source
from bot.ports import KnowledgeDecision

if TYPE_CHECKING:
    from bot.config import Config
    from bot.config.knowledge import KnowledgeSection
    from bot.metrics import Metrics
    from storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """An index with what it was built from: swapped whole on a rebuild."""

    index: FaqIndex
    normalizer: Normalizer
    signature: tuple[int, int]
    words: WordTable


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


class KnowledgeService:
    """FAQ answers for the manager; `create` returns None when `[knowledge] faq = ""`."""

    def __init__(
        self,
        settings: KnowledgeSection,
        path: Path,
        faq: FaqFile,
        cache: IndexCache,
        store: Store | None,
        metrics: Metrics | None,
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings
        self.path = path
        self.store = store
        self.metrics = metrics
        self.cache = cache
        #: A started embedder passed in stays its owner's to start and close.
        self._owns_embedder = embedder is None
        self.embedder = embedder or Embedder(
            settings.embedding_model,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
        )
        self._faq = faq
        self._signature = _signature(path)
        self._loaded: _Loaded | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._rebuild_lock = asyncio.Lock()
        #: Index rebuilds after start (file changes picked up), for tests and logs;
        #: `rebuilt` is set after each (whoever waits on it clears it).
        self.rebuilds = 0
        self.rebuilt = asyncio.Event()

    @classmethod
    def create(
        cls,
        config: Config,
        store: Store | None,
        metrics: Metrics | None,
        *,
        embedder: Embedder | None = None,
    ) -> KnowledgeService | None:
        """None when the knowledge base is off; `KnowledgeError` for a bad file.
        `embedder` shares one started model between services (tests, the bench)."""
        settings = config.knowledge
        if not settings.faq.strip():
            return None
        path = config.relative_to_config(settings.faq)
        faq = load_faq(path)
        cache = IndexCache(config.resolve_path(config.bot.data_dir) / "knowledge")
        return cls(settings, path, faq, cache, store, metrics, embedder)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and the index (cached, or built now), then watch the file."""
        if self._owns_embedder:
            await self.embedder.start()
        try:
            self._loaded = await self._load(self._faq, self._signature)
        except BaseException:
            if self._owns_embedder:
                await self.embedder.close()
            raise
        if self.settings.reload_interval_s > 0:
            self._watcher = asyncio.create_task(self._watch(), name="knowledge-watcher")

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self._owns_embedder:
            await self.embedder.close()

    @property
    def faq(self) -> FaqFile:
        """The entries answering now (those read at creation before `start`)."""
        return self._loaded.index.faq if self._loaded is not None else self._faq

    @property
    def index(self) -> FaqIndex:
        if self._loaded is None:
            raise KnowledgeError("the knowledge base is not started")
        return self._loaded.index

    async def _load(self, faq: FaqFile, signature: tuple[int, int]) -> _Loaded:
        model = self.embedder.model_name
        index = await asyncio.to_thread(self.cache.load, faq, model)
        if index is None:
            index = await build_index(faq, self.embedder.embed_many)
            await asyncio.to_thread(self.cache.save, index, model)
            log.info("FAQ index of %s built: %d entries", self.path, len(faq.entries))
        normalizer = await asyncio.to_thread(faq_normalizer, faq, self.embedder.tokenizer)
        return _Loaded(index, normalizer, signature, WordTable(index))

    # -- the file changing ---------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self.refresh()
            except Exception:  # the old index keeps answering; say why once per change
                log.exception("rebuilding the FAQ index of %s failed", self.path)

    async def refresh(self) -> bool:
        """Rebuild the index if the file changed since it was loaded (True
        then). A file that no longer validates is logged and skipped: the old
        index keeps answering until the file is fixed."""
        async with self._rebuild_lock:
            loaded = self._loaded
            if loaded is None:
                return False
            try:
                signature = await asyncio.to_thread(_signature, self.path)
            except OSError as exc:
                log.warning("FAQ file %s: %s; keeping the loaded entries", self.path, exc)
                return False
            if signature == loaded.signature:
                return False
            try:
                faq = await asyncio.to_thread(load_faq, self.path)
            except KnowledgeError as exc:
                log.error("%s; keeping the previous FAQ", exc)
                self._loaded = replace(loaded, signature=signature)
                return False
            if faq.digest == loaded.index.faq.digest:
                self._loaded = replace(loaded, signature=signature)
                return False
            self._loaded = await self._load(faq, signature)
            self.rebuilds += 1
            self.rebuilt.set()
            log.info("FAQ %s changed: %d entries now", self.path, len(faq.entries))
            return True

    # -- matching ------------------------------------------------------------------

    async def match(self, texts: list[str]) -> list[Match]:
        """Rank the entries for each text (for `decide`, `faq eval` and the bench)."""
        loaded = self._loaded
        if loaded is None:
            raise KnowledgeError("the knowledge base is not started")
        # typo lookups cost up to a few ms per unknown word: not on the event loop
        cleaned = await asyncio.to_thread(lambda: [loaded.normalizer(text) for text in texts])
        words = [content_words(text) for text in cleaned]
        table = loaded.words
        known, unseen = table.lookup(words)
        # one batch: the messages and their words the table has not embedded yet
        vectors: Vectors = await self.embedder.embed([*cleaned, *unseen])
        known.update(table.add(unseen, vectors[len(cleaned) :]))
        messages = [table.message(each, known) for each in words]
        return rank(loaded.index, vectors[: len(cleaned)], messages, table.entries)

    async def decide(
        self, incoming: Incoming, text: str, previous: Source | None
    ) -> KnowledgeDecision:
        """What to answer `text` with; `previous` is the source of the bot's
        last reply in this conversation (a suggestion can be chosen from).
        Never raises for a knowledge base that cannot match now (its worker
        stopped): the model answers instead."""
        try:
            return await self._decide(incoming, text, previous)
        except KnowledgeError as exc:
            log.warning("the knowledge base could not match a message: %s", exc)
            return KnowledgeDecision("fallback")

    async def _decide(
        self, incoming: Incoming, text: str, previous: Source | None
    ) -> KnowledgeDecision:
        faq = self.index.faq  # this decision's entries, even if a rebuild swaps them
        asked = previous.ids if previous is not None and previous.kind == "suggestion" else ()
        offered = [entry for entry in map(faq.entry, asked) if entry is not None]
        if offered:
            pick = chosen_suggestion(text, len(offered))
            if pick is not None:
                return self._answer(offered[pick])
        if not text.strip():
            return await self._fallback(incoming, text, None)
        (match,) = await self.match([text])
        settings = self.settings
        if match.score >= settings.answer_threshold:
            return self._answer(match.best)
        close = match.score >= settings.suggest_threshold
        if close and match.best.id in {entry.id for entry in offered}:
            return self._answer(match.best)  # words close to an offered question
        if match.score >= settings.suggest_threshold:
            entries = suggestions(match, settings.suggest_threshold)
            self._count("suggested")
            return KnowledgeDecision(
                "suggest",
                suggestion_text(entries),
                Source("suggestion", ids=tuple(entry.id for entry in entries)),
            )
        return await self._fallback(incoming, text, match)

    def _answer(self, entry: FaqEntry) -> KnowledgeDecision:
        self._count("answered")
        return KnowledgeDecision("answer", entry.answer, Source("faq", id=entry.id))

    async def _fallback(
        self, incoming: Incoming, text: str, match: Match | None
    ) -> KnowledgeDecision:
        self._count("unanswered")
        if self.store is not None and text.strip():
            from storage import StorageUnavailable

            try:
                await self.store.unanswered.record(
                    platform=incoming.platform,
                    chat_id=incoming.chat_id,
                    user_id=incoming.user_id,
                    text=text,
                    best_id=match.best.id if match is not None else None,
                    best_score=round(match.score, 4) if match is not None else None,
                )
            except StorageUnavailable as exc:  # the answer matters more than the record
                log.warning("could not record an unanswered question: %s", exc)
        return KnowledgeDecision("fallback", escalate=self.settings.fallback == "human")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.knowledge.labels(outcome).inc()


__all__ = ["KnowledgeDecision", "KnowledgeService"]
