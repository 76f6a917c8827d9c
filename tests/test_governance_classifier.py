"""The optional moderation classifier: a tiny BERT text classifier built and
trained here in about a second (no download), loaded through the transformers
pipeline on the classifier's worker thread, behind the manager."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.engine_doubles import ScriptedEngine

from bot.commands import CommandRegistry
from bot.config import Config
from bot.governance import GovernanceError, GovernanceService
from bot.governance.classifier import Classifier
from bot.manager import ConversationManager
from bot.messages import Incoming, Text
from bot.metrics import Metrics
from storage import Store

RUDE = ["stupid", "idiot", "awful", "hate", "dumb", "ugly"]
KIND = ["nice", "lovely", "thanks", "great", "friend", "sunny"]
FILLER = ["you", "are", "so", "a", "the", "day", "is", "what", "very", "really"]


def sentences() -> list[tuple[str, int]]:
    """Each word alone and among 1-3 filler words at every position: sentences
    of several lengths, so that what is learnt is the word, not the length
    (with one length only, how a 3-word sentence came out varied by CPU)."""
    rows = []
    for index, word in enumerate(RUDE + KIND):
        label = 1 if word in RUDE else 0
        rows.append((word, label))
        for shift in range(6):
            count = 1 + shift % 3
            filler = [FILLER[(index + shift + k) % len(FILLER)] for k in range(count)]
            at = shift % (count + 1)
            rows.append((" ".join([*filler[:at], word, *filler[at:]]), label))
    return rows


def build_tiny_classifier(path: Path, labels: tuple[str, str] = ("ok", "toxic")) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: index for index, token in enumerate(special + RUDE + KIND + FILLER)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=32,
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    rows = sentences()
    batch = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    targets = torch.tensor([label for _, label in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(120):
        optimizer.zero_grad()
        loss = model(**batch, labels=targets).loss
        loss.backward()
        optimizer.step()
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("classifier") / "tiny-toxic")


async def scores(path: Path, texts: list[str]) -> list[float]:
    """The toxic label's score for each text, straight from the pipeline."""
    from transformers import pipeline

    def run() -> list[float]:
        classify = pipeline("text-classification", model=str(path), device="cpu", top_k=None)
        return [
            next(entry["score"] for entry in result if entry["label"] == "toxic")
            for result in classify(texts)
        ]

    return await asyncio.to_thread(run)


def message(text: str, user: str = "5") -> Incoming:
    return Incoming("telegram", user, user, f"User{user}", text)


@pytest.fixture
async def governed(tmp_path: Path) -> AsyncIterator[Any]:
    opened: list[tuple[Store, GovernanceService]] = []

    async def factory(**moderation: Any) -> tuple[ConversationManager, GovernanceService]:
        config = Config.model_validate(
            {
                "storage": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"},
                "limits": {"messages_per_minute": 0},
                "moderation": moderation,
                "draw": {"enabled": False},
            }
        )
        store = await Store.open(config.storage.url)
        commands = CommandRegistry()
        metrics = Metrics()
        service = GovernanceService.create(config, store, commands, metrics, refresh_s=0)
        opened.append((store, service))
        await service.start()
        engine = ScriptedEngine(
            lambda turns: "you are so stupid" if turns[-1] == "a great day" else "thanks friend"
        )
        manager = ConversationManager(
            config, store, engine, commands=commands, metrics=metrics, governance=service
        )
        return manager, service

    yield factory
    for store, service in opened:
        await service.close()
        await store.close()


async def say(manager: ConversationManager, text: str) -> list[str]:
    return [r.text for r in [r async for r in manager.handle(message(text))] if isinstance(r, Text)]


async def test_the_classifier_flags_input_and_output_above_its_threshold(
    governed: Any, classifier_dir: Path
) -> None:
    rude, *kind = await scores(
        classifier_dir,
        ["you are so stupid", "what a lovely sunny day", "thanks friend", "a great day"],
    )
    assert rude > max(kind)
    # Between them: the rude text is flagged, the kind ones (which score above 0) are not.
    threshold = (rude + max(kind)) / 2
    manager, service = await governed(
        classifier=str(classifier_dir), classifier_threshold=threshold, blocked_answer="No."
    )
    assert await say(manager, "you are so stupid") == ["No."]
    assert await say(manager, "what a lovely sunny day") == ["thanks friend"]
    assert await say(manager, "a great day") == ["No."]  # the model's reply is blocked
    # Longer than the model can read (32 positions): cut, not failed.
    assert await say(manager, " ".join(["what a lovely sunny day"] * 20)) == ["thanks friend"]
    assert await say(manager, " ".join(["you are so stupid"] * 20)) == ["No."]
    entries = await service.records.entries(kind="moderation")
    assert [entry.detail.split(" toxic ")[0] for entry in entries] == [
        "input: classifier",
        "output: classifier",
        "input: classifier",
    ]


async def test_texts_waiting_together_are_scored_in_one_batch(classifier_dir: Path) -> None:
    classifier = Classifier(classifier_dir, threshold=0.5, labels=["toxic"])
    await classifier.start()
    try:
        verdicts = await asyncio.gather(
            *(classifier.check(f"you are so {word}") for word in RUDE + KIND)
        )
        assert classifier.batches < len(verdicts)
        flagged = [verdict is not None for verdict in verdicts]
        assert flagged[: len(RUDE)].count(True) > flagged[len(RUDE) :].count(True)
    finally:
        await classifier.close()


async def test_a_classifier_that_cannot_flag_or_load_stops_the_start(
    governed: Any, classifier_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(GovernanceError, match=r"none of the model's labels \(ok, toxic\)"):
        await governed(classifier=str(classifier_dir), classifier_labels=["spam"])
    with pytest.raises(GovernanceError, match="is not a directory"):
        await governed(classifier=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GovernanceError, match="cannot be loaded"):
        await governed(classifier=str(tmp_path / "empty"))
