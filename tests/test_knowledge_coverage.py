"""Word coverage (bot.knowledge.coverage) and the calibration tool that fits
the score on top of it. The pure parts use hand-made vectors; the tool runs
on the shipped embedding model (loading it takes about two seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bot.knowledge.coverage as coverage
from bot.knowledge.coverage import (
    NO_WORDS,
    Coverage,
    EntryWords,
    MessageWords,
    WordTable,
    content_words,
    faq_vocabulary,
)
from bot.knowledge.faq import FaqEntry, FaqFile
from bot.knowledge.index import FaqIndex, flatten
from bot.knowledge.matching import calibrate, features


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_content_words_drop_stopwords_short_words_numbers_and_repeats() -> None:
    assert content_words("How do I return my 2 lamps? Return them, pls!") == ["return", "lamps"]
    assert content_words("hi, is it ok?") == []


def test_the_vocabulary_lists_each_entrys_words() -> None:
    faq = FaqFile(
        Path("faq.toml"),
        (
            FaqEntry("a", ("Refund status",), "Refunds take five days."),
            FaqEntry("b", ("Gift cards?",), "Gift cards never expire."),
        ),
        "digest",
    )
    vocabulary, members = faq_vocabulary(faq)
    assert vocabulary == ("cards", "days", "expire", "five", "gift", "never", "refund", "refunds",
                          "status", "take")  # fmt: skip
    assert [[vocabulary[i] for i in entry] for entry in members] == [
        ["days", "five", "refund", "refunds", "status", "take"],
        ["cards", "expire", "gift", "never"],
    ]
    offsets, flat = flatten(members)
    assert offsets.tolist() == [0, 6, 10] and flat.tolist() == [*members[0], *members[1]]


def test_an_entry_covers_its_words_inflections_and_spellings() -> None:
    words = EntryWords(frozenset({"program", "cancel", "return"}), np.zeros((0, 2), np.float32))
    for word in ("program", "programme", "returns", "returned", "cancelled", "canceled"):
        assert words.uses(word), word
    for word in ("wrapping", "prog", "retail"):
        assert not words.uses(word), word


def _message(words: list[str], vectors: list[np.ndarray], weights: list[float]) -> MessageWords:
    stacked = np.stack(vectors) if vectors else np.zeros((0, 3), np.float32)
    return MessageWords(tuple(words), stacked, tuple(weights))


def test_coverage_is_the_worst_covered_word_and_the_weighted_mean() -> None:
    entry = EntryWords(frozenset({"gift"}), np.stack([unit(1, 0, 0), unit(0, 1, 0)]))
    near, far = unit(1, 0.2, 0), unit(0, 0, 1)
    close = float(near @ unit(1, 0, 0))
    # its own word counts fully, whatever its vector
    assert entry.coverage(_message(["gift"], [far], [1.0])) == Coverage(1.0, 1.0)
    worst, mean = entry.coverage(_message(["gifts", "present"], [far, near], [1.0, 1.0]))
    assert worst == pytest.approx(close) and mean == pytest.approx((1 + close) / 2)
    worst, mean = entry.coverage(_message(["present", "wrapping"], [near, far], [1.0, 1.0]))
    assert worst == pytest.approx(0.0) and mean == pytest.approx(close / 2)
    # a rare word weighs more: the uncovered "wrapping" pulls the mean down further
    _, rare = entry.coverage(_message(["gift", "wrapping"], [far, far], [1.0, 3.0]))
    assert rare == pytest.approx(0.25)


def test_a_message_without_content_words_is_covered_by_no_entry() -> None:
    """Small talk ("hello", "hi, ok?") has nothing that ties it to an entry."""
    entry = EntryWords(frozenset({"hello"}), np.stack([unit(1, 0, 0)]))
    assert entry.coverage(_message([], [], [])) == NO_WORDS == Coverage(0.0, 0.0)


def test_rarity_weighs_words_that_few_entries_use_more() -> None:
    vectors = np.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    # "order" is used by all three entries, "gift" by one, "wrap" by none
    table = WordTable(_index(("gift", "order", "wrap_"), vectors, [[0, 1], [1], [1]]))
    assert table.rarity("order") == pytest.approx(np.log(1 + 3 / 4))
    assert table.rarity("gift") == pytest.approx(np.log(1 + 3 / 2))
    assert table.rarity("orders") == table.rarity("order")  # by stem
    assert table.rarity("wrapping") == pytest.approx(np.log(1 + 3))
    assert table.rarity("order") < table.rarity("gift") < table.rarity("wrapping")


def _index(vocabulary: tuple[str, ...], vectors: np.ndarray, members: list[list[int]]) -> FaqIndex:
    entries = tuple(FaqEntry(f"e{k}", ("q",), "a") for k in range(len(members)))
    offsets, flat = flatten(members)
    empty = np.zeros((0, vectors.shape[1]), np.float32)
    return FaqIndex(
        FaqFile(Path("faq.toml"), entries, "d"),
        empty,
        np.zeros(0, np.int64),
        np.zeros((len(entries), vectors.shape[1]), np.float32),
        np.zeros((len(entries), vectors.shape[1]), np.float32),
        np.zeros(len(entries), np.float32),
        1.0,
        vocabulary,
        vectors,
        offsets,
        flat,
    )


def test_the_word_table_embeds_each_new_word_once_and_forgets_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = WordTable(_index(("gift", "card"), np.stack([unit(1, 0), unit(0, 1)]), [[0, 1]]))
    assert [sorted(entry.stems) for entry in table.entries] == [["card", "gift"]]
    assert table.width == 2
    known, missing = table.lookup([["gift", "wrap", "paper"], ["wrap"]])
    assert list(known) == ["gift"] and missing == ["wrap", "paper"]
    known.update(table.add(missing, np.stack([unit(1, 1), unit(1, -1)])))
    assert table.lookup([["gift", "wrap", "paper"]])[1] == []
    message = table.message(["gift", "paper"], known)
    assert message.words == ("gift", "paper") and message.vectors.shape == (2, 2)
    assert np.allclose(message.vectors[1], unit(1, -1))
    assert message.weights == (table.rarity("gift"), table.rarity("paper"))
    assert table.message([], known).vectors.shape == (0, 2)
    monkeypatch.setattr(coverage, "WORD_CACHE", 2)
    table.lookup([["wrap"]])  # used most recently: "paper" is now the oldest
    table.add(["ribbon"], np.stack([unit(2, 1)]))
    assert table.lookup([["wrap", "paper", "ribbon"]])[1] == ["paper"]


def test_a_looked_up_word_survives_its_eviction_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another conversation's words may evict this one's while it awaits the
    embedder: the snapshot still has them."""
    monkeypatch.setattr(coverage, "WORD_CACHE", 1)
    table = WordTable(_index(("gift",), np.stack([unit(1, 0)]), [[0]]))
    table.add(["wrap"], np.stack([unit(1, 1)]))
    known, missing = table.lookup([["wrap", "ribbon"]])  # this conversation
    table.add(["bow"], np.stack([unit(0, 1)]))  # another one's, evicting "wrap"
    assert table.lookup([["wrap"]])[1] == ["wrap"]
    known.update(table.add(missing, np.stack([unit(2, 1)])))
    message = table.message(["wrap", "ribbon"], known)
    assert np.allclose(message.vectors[0], unit(1, 1))


def test_the_score_rises_with_the_logit_the_lead_and_the_coverage() -> None:
    logits = np.array([2.0, 0.5, -1.0], np.float32)
    order = [0, 1, 2]
    full = Coverage(1.0, 1.0)
    sure = calibrate(features(logits, order, 0, 1.0, 0.6, full))
    assert 0.9 < sure < 1.0
    one_word = calibrate(features(logits, order, 0, 1.0, 0.6, Coverage(0.3, 0.6)))
    assert one_word < sure  # a word the entry does not cover
    assert calibrate(features(logits, order, 0, 1.0, 0.6, NO_WORDS)) < one_word  # small talk
    assert calibrate(features(logits, order, 0, 2.0, 0.6, full)) < sure  # a weaker logit
    assert calibrate(features(logits, order, 1, 1.0, 0.6, full)) < 0.5  # the runner-up
    assert features(logits, order, 1, 1.0, 0.6, full)[1] == pytest.approx(-1.5)


def test_the_calibration_tool_fits_weights_on_labelled_questions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.knowledge.calibration import main

    faq = tmp_path / "faq.toml"
    faq.write_text(
        '[[faq]]\nid = "returns"\nquestions = ["How do I return an item?", "Can I send it back?"]\n'
        'answer = "Return unused items within 30 days with the free label."\n'
        '[[faq]]\nid = "gift_cards"\nquestions = ["Do you sell gift cards?", "Gift voucher?"]\n'
        'answer = "Gift cards from $10 are sold online and never expire."\n'
        '[[faq]]\nid = "shipping"\nquestions = ["How long is delivery?", "When will it arrive?"]\n'
        'answer = "Orders arrive in 3 to 5 working days."\n'
    )
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        '{"text": "i want to send back a lamp", "faq": "returns"}\n'
        '{"text": "can I buy a voucher for a friend", "faq": "gift_cards"}\n'
        '{"text": "how many days until my parcel comes", "faq": "shipping"}\n'
        '{"text": "do you gift wrap?", "faq": null}\n'
        '{"text": "what is the capital of peru", "faq": null}\n'
    )
    main(["--faq", str(faq), "--questions", str(questions), "--rounds", "3"])
    out = capsys.readouterr().out
    assert "# 15 samples" in out
    weights = next(line for line in out.splitlines() if line.startswith("WEIGHTS = ("))
    assert len(weights.split(",")) == 5
    assert "BIAS = " in out and "cross-validated" in out
