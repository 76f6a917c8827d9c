"""Splitting long replies for platforms with a message size limit."""

from __future__ import annotations

import random

import pytest

from adapters.splitting import FENCE, split_message


def test_short_text_is_one_part() -> None:
    assert split_message("hello", 2000) == ["hello"]
    assert split_message("", 2000) == []


def test_parts_fit_and_concatenate_to_the_whole_text() -> None:
    generator = random.Random(3)
    words = ["hello", "world", "a" * 40, "\n", "\n\n", "déjà vu", "👋🏽"]
    for _ in range(500):
        text = " ".join(generator.choice(words) for _ in range(generator.randint(1, 300)))
        parts = split_message(text, 120)
        assert all(0 < len(part) <= 120 for part in parts)
        assert "".join(parts) == text


def test_cuts_prefer_paragraphs_then_lines_then_spaces() -> None:
    text = "first paragraph line\n\nsecond paragraph that is long"
    assert split_message(text, 30)[0] == "first paragraph line\n\n"
    assert split_message("one line here\nanother line", 20)[0] == "one line here\n"
    parts = split_message("alpha beta gamma delta epsilon", 16)
    assert all(not part.startswith(" ") for part in parts[1:])
    assert all(part.endswith(" ") for part in parts[:-1])  # never mid-word


def test_a_word_longer_than_the_limit_is_cut_hard() -> None:
    assert split_message("x" * 50, 20) == ["x" * 20, "x" * 20, "x" * 10]


def test_code_blocks_are_not_broken_when_they_fit() -> None:
    code = "```python\n" + "\n".join(f"print({i})" for i in range(8)) + "\n```"
    text = "Here is some code:\n" + code + "\nand some words after it to push the length"
    parts = split_message(text, len(code) + 5)
    assert any(part.startswith("```python") and part.rstrip().endswith("```") for part in parts)
    assert "".join(parts) == text


def test_a_code_block_longer_than_a_message_is_refenced() -> None:
    code = "```js\n" + "\n".join(f"console.log({i});" for i in range(100)) + "\n```"
    parts = split_message(code, 200)
    assert len(parts) > 1 and all(len(part) <= 200 for part in parts)
    for part in parts:
        assert part.count(FENCE) == 2, part
        assert part.startswith("```js\n")
    body = "".join(part.removeprefix("```js\n").removesuffix("\n```") + "\n" for part in parts)
    assert body.rstrip("\n") == code.removeprefix("```js\n").removesuffix("\n```")


@pytest.mark.parametrize("limit", [2000, 4096])
def test_platform_limits(limit: int) -> None:
    text = ("lorem ipsum dolor sit amet " * 40 + "\n") * 20
    parts = split_message(text, limit)
    assert len(parts) > 1 and all(len(part) <= limit for part in parts)
    assert "".join(parts) == text
