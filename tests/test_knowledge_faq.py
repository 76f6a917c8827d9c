"""Knowledge base without a model: the FAQ file, typo fixes, replies to
suggestions and the arithmetic of `faq eval`."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.knowledge import KnowledgeError, load_faq
from bot.knowledge.evaluation import Labelled, load_questions, rates, report
from bot.knowledge.faq import FaqEntry, parse_faq
from bot.knowledge.matching import Match, chosen_suggestion, suggestion_text, suggestions
from bot.knowledge.text import Normalizer

REPO = Path(__file__).resolve().parent.parent

GOOD = """
[[faq]]
id = "returns"
questions = ["How do I return an item?", "Can I send something back?"]
answer = "You can return any unused item within 30 days."

[[faq]]
id = "shipping"
questions = ["How long does delivery take?"]
answer = "Two to four business days."
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "faq.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_file_loads_with_its_digest(tmp_path: Path) -> None:
    faq = load_faq(write(tmp_path, GOOD))
    assert [entry.id for entry in faq.entries] == ["returns", "shipping"]
    assert faq.entries[0].questions == ("How do I return an item?", "Can I send something back?")
    assert faq.entry("shipping") is not None
    assert faq.entry("shipping").answer == "Two to four business days."  # type: ignore[union-attr]
    assert len(faq.digest) == 64
    assert load_faq(write(tmp_path, GOOD + "\n")).digest != faq.digest


def test_the_example_faq_is_valid_and_large_enough() -> None:
    faq = load_faq(REPO / "examples" / "faq.toml")
    assert len(faq.entries) >= 20
    for name in ("faq-dev.jsonl", "faq-questions.jsonl"):
        rows = load_questions(REPO / "examples" / name, faq)
        assert len(rows) >= 150
        assert sum(row.faq is None for row in rows) >= len(rows) // 3 - 5
    dev = {row.text for row in load_questions(REPO / "examples" / "faq-dev.jsonl", faq)}
    held_out = load_questions(REPO / "examples" / "faq-questions.jsonl", faq)
    assert not dev & {row.text for row in held_out}, "dev and held-out sets overlap"


ENTRY = '[[faq]]\nid = "{id}"\nquestions = {questions}\nanswer = {answer}\n'


def entry(id: str = "a", questions: str = '["q?"]', answer: str = '"yes"') -> str:
    return ENTRY.format(id=id, questions=questions, answer=answer)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (entry() + entry(id="returns", answer='"  "'), 'entry 2 (id "returns"): answer is empty'),
        (entry(id="returns") + entry(id="returns"), 'entry 2 (id "returns"): duplicate id'),
        (entry(id="Returns!"), "entry 1: id 'Returns!' must be lower-case"),
        (entry(questions="[]"), 'entry 1 (id "a"): questions must be a non-empty list'),
        (entry(questions='["ok", ""]'), 'entry 1 (id "a"): question 2 is empty'),
        (entry(questions='"one"'), 'entry 1 (id "a"): questions must be a non-empty list'),
        ('[[faq]]\nquestions = ["q"]\nanswer = "a"\n', "entry 1: id is missing"),
        ('[[faq]]\nid = "a"\nanswer = "a"\n', 'entry 1 (id "a"): questions is missing'),
        ('[[faq]]\nid = "a"\nquestions = ["q"]\n', 'entry 1 (id "a"): answer is missing'),
        (entry() + 'tags = ["x"]\n', "entry 1 (id \"a\"): unknown key 'tags'"),
        ("[[faq]\nid = 1", "TOML error"),
        ("title = 'x'\n", "unknown top-level key 'title'"),
        ("", "no [[faq]] entries"),
    ],
)
def test_each_problem_is_one_line_naming_file_entry_and_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(KnowledgeError) as caught:
        load_faq(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert problem in message


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match=r"missing\.toml: cannot be read"):
        load_faq(tmp_path / "missing.toml")
    with pytest.raises(KnowledgeError, match="not UTF-8"):
        parse_faq(b"\xff\xfe", tmp_path / "x.toml")


# -- typo fixes ----------------------------------------------------------------------


def test_typos_are_corrected_towards_faq_words_only() -> None:
    normalize = Normalizer(
        ["How do I return an item?", "I forgot my password", "Unsubscribe from emails"],
        known={"mail", "the", "subscribe"},
    )
    assert normalize("how do i retrun my order") == "how do i return my order"
    assert normalize("Forgot my PASWORD!") == "Forgot my password!"
    assert normalize("pls help, i cant log in") == "please help, i can't log in"
    # an inflection is not a typo, and words the model knows are left alone
    assert normalize("i want to subscribe") == "i want to subscribe"
    assert normalize("mailing list") == "mailing list"
    # short words are never guessed at
    assert normalize("tiem") == "tiem"


# -- replies to a suggestion ------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "offered", "pick"),
    [
        ("2", 3, 1),
        ("#3", 3, 2),
        ("the second one", 3, 1),
        ("number 1 please", 2, 0),
        ("first", 2, 0),
        ("the last one", 3, 2),
        ("yes", 1, 0),
        ("yes please", 1, 0),
        ("that one", 1, 0),
        ("yes", 2, None),  # which one?
        ("4", 3, None),
        ("no", 1, None),
        ("2 or 3", 3, None),
        ("yes but how long do refunds take to reach my card", 1, None),
        ("where is my parcel", 2, None),
    ],
)
def test_choosing_a_suggestion(reply: str, offered: int, pick: int | None) -> None:
    assert chosen_suggestion(reply, offered) == pick


def _entry(id: str, question: str = "") -> FaqEntry:
    return FaqEntry(id, (question or f"{id}?",), f"answer {id}")


def test_suggestions_take_the_best_and_close_runners_up() -> None:
    a, b, c, d = (_entry(x) for x in "abcd")
    match = Match(((a, 0.5), (b, 0.35), (c, 0.1), (d, 0.05)))
    assert suggestions(match, 0.3) == (a, b)
    assert suggestions(match, 0.6) == (a,)
    assert suggestion_text((a,)) == 'Did you mean "a?"? Reply "yes", or ask in other words.'
    assert suggestion_text((a, b)).splitlines()[1:3] == ["1. a?", "2. b?"]


# -- the arithmetic of `faq eval` --------------------------------------------------------


def test_eval_rates_on_a_tiny_labelled_set(tmp_path: Path) -> None:
    a, b = _entry("a"), _entry("b")
    rows = [
        Labelled("right, confident", "a"),
        Labelled("right, unsure", "a"),
        Labelled("wrong, confident", "b"),
        Labelled("out of scope, confident", None),
        Labelled("out of scope, unsure", None),
    ]
    matches = [
        Match(((a, 0.9), (b, 0.1))),
        Match(((a, 0.4), (b, 0.3))),
        Match(((a, 0.8), (b, 0.2))),
        Match(((b, 0.7), (a, 0.3))),
        Match(((a, 0.1), (b, 0.1))),
    ]
    point = rates(rows, matches, 0.6)
    assert point.accuracy == pytest.approx(1 / 3)  # 1 of 3 in-scope questions
    assert point.false_answer_rate == pytest.approx(2 / 5)  # a wrong entry + out of scope
    assert point.abstain_rate == pytest.approx(2 / 5)
    assert rates(rows, matches, 0.3).accuracy == pytest.approx(2 / 3)
    baseline = [Match(((a, 0.9), (b, 0.1)))] * 5
    result = report(rows, matches, baseline, 0.6, 0.3).as_dict()
    assert (result["accuracy"], result["false_answer_rate"], result["abstain_rate"]) == (
        0.3333,
        0.4,
        0.4,
    )
    assert result["n"] == 5
    assert result["suggested_rate"] == 0.2  # only "right, unsure" is in [0.3, 0.6)
    assert result["suggested_with_right_entry"] == 1.0
    assert result["top1_accuracy"] == pytest.approx(0.6667)
    assert [p["threshold"] for p in result["sweep"]][:2] == [0.05, 0.1]


def test_a_bad_question_file_names_the_line(tmp_path: Path) -> None:
    faq = load_faq(write(tmp_path, GOOD))
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"text": "hi", "faq": null}\n{"text": "x", "faq": "nope"}\n')
    with pytest.raises(KnowledgeError, match=r"q.jsonl: line 2: faq 'nope' is not an entry"):
        load_questions(questions, faq)
    questions.write_text("not json\n")
    with pytest.raises(KnowledgeError, match="line 1: not JSON"):
        load_questions(questions, faq)
