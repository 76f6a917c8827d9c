"""The knowledge base's cost per message, for `aigc-bot bench`.

`measure_overhead` builds a synthetic FAQ of `entries` entries in a temporary
folder, starts a real `KnowledgeService` on the configured embedding model
(with a temporary SQLite store, so fallbacks are recorded as in production)
and times `decide`: one user at a time, then `users` users at once (their
messages share embedding batches).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bot.messages import Incoming

if TYPE_CHECKING:
    from bot.config import Config
    from bot.knowledge.service import KnowledgeService

_THINGS = (
    "order", "parcel", "refund", "invoice", "gift card", "account", "password", "sofa",
    "lamp", "kettle", "jacket", "voucher", "subscription", "delivery", "warranty", "rug",
    "table", "tent", "mug", "discount code", "receipt", "newsletter", "return label", "chair",
    "blanket",
)  # fmt: skip
_ASKS = (
    ("How do I cancel my {}?", "Can I still cancel the {}?", "cancel {} please"),
    ("Where is my {}?", "I can't find my {}", "what happened to my {}"),
    ("How much does the {} cost?", "What is the price of the {}?", "{} price?"),
    ("Can I change my {}?", "I need to update my {}", "edit {}"),
)
MESSAGES = (
    "where is my parcel??",
    "can i get a refund for the lamp",
    "hi there",
    "do you ship to canada",
    "my kettle broke after a month",
    "what's the weather today",
    "how do i reset my pasword",
    "cancel my order pls",
    "do you sell gift wrapping",
    "thanks!",
    "is the sofa available in green",
    "how long does delivery take",
)


def synthetic_faq(entries: int) -> str:
    """A TOML FAQ of `entries` distinct entries (topics x kinds of question)."""
    blocks = []
    for number in range(entries):
        thing = _THINGS[number % len(_THINGS)]
        asks = _ASKS[(number // len(_THINGS)) % len(_ASKS)]
        variant = number // (len(_THINGS) * len(_ASKS))
        suffix = f" (case {variant})" if variant else ""
        questions = ", ".join(f'"{ask.format(thing)}{suffix}"' for ask in asks)
        blocks.append(
            f'[[faq]]\nid = "entry-{number}"\nquestions = [{questions}]\n'
            f'answer = "Answer {number}: what to do about your {thing}{suffix}."\n'
        )
    return "\n".join(blocks)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure_overhead(
    config: Config, entries: int = 100, users: int = 32, rounds: int = 4
) -> dict[str, float]:
    """Latency of `decide` in ms (p50/p95, alone and with `users` at once),
    plus the model's load time and the index build (no cache) in seconds."""
    from bot.knowledge import service as knowledge
    from bot.knowledge.embedder import Embedder
    from storage import Store

    with tempfile.TemporaryDirectory(prefix="aigc-knowledge-bench-") as folder:
        root = Path(folder)
        (root / "faq.toml").write_text(synthetic_faq(entries), encoding="utf-8")
        settings = config.knowledge.model_copy(
            update={"faq": str(root / "faq.toml"), "reload_interval_s": 0}
        )
        bot = config.bot.model_copy(update={"data_dir": root / "data"})
        bench_config = config.model_copy(update={"knowledge": settings, "bot": bot})
        store = await Store.open(f"sqlite+aiosqlite:///{root / 'bench.db'}")
        embedder = Embedder(
            settings.embedding_model,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
        )
        try:
            started = time.perf_counter()
            await embedder.start()
            load_s = time.perf_counter() - started
            service = knowledge.KnowledgeService.create(
                bench_config, store, None, embedder=embedder
            )
            assert service is not None
            started = time.perf_counter()
            await service.start()  # no cache yet: embeds the FAQ, trains the classifier
            build_s = time.perf_counter() - started
            try:
                return await _time_decide(service, users, rounds, load_s, build_s, entries)
            finally:
                await service.close()
        finally:
            await embedder.close()
            await store.close()


async def _time_decide(
    service: KnowledgeService, users: int, rounds: int, load_s: float, build_s: float, n: int
) -> dict[str, float]:
    async def one(user: int, text: str) -> float:
        incoming = Incoming("bench", f"chat-{user}", f"user-{user}", "bench", text)
        started = time.perf_counter()
        await service.decide(incoming, text, None)
        return (time.perf_counter() - started) * 1000

    for text in MESSAGES[:3]:  # warm-up: first calls allocate
        await one(0, text)
    alone = [await one(0, MESSAGES[i % len(MESSAGES)]) for i in range(len(MESSAGES) * 3)]
    batches_before = len(service.embedder.batch_sizes)

    async def user_loop(user: int) -> list[float]:
        return [await one(user, MESSAGES[(user + r) % len(MESSAGES)]) for r in range(rounds)]

    together = [t for times in await asyncio.gather(*map(user_loop, range(users))) for t in times]
    sizes = service.embedder.batch_sizes[batches_before:]
    return {
        "entries": float(n),
        "users": float(users),
        "model_load_s": round(load_s, 3),
        "index_build_s": round(build_s, 3),
        "alone_p50_ms": round(statistics.median(alone), 2),
        "alone_p95_ms": round(_percentile(alone, 0.95), 2),
        "batched_p50_ms": round(statistics.median(together), 2),
        "batched_p95_ms": round(_percentile(together, 0.95), 2),
        "mean_batch": round(statistics.fmean(sizes), 2) if sizes else 0.0,
    }
