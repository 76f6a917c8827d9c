"""`/draw` arguments: shell-like parsing, every option, usage on bad input, clamping."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from bot.config import DrawSection
from bot.draw.options import (
    USAGE,
    DrawOptions,
    DrawUsageError,
    fit_size,
    parse_draw_args,
    resolve,
)


def test_a_plain_prompt_takes_every_default() -> None:
    assert parse_draw_args("a red   cat on a mat") == DrawOptions(prompt="a red cat on a mat")


@pytest.mark.parametrize(
    ("args", "prompt"),
    [
        ('"a red cat" sitting', "a red cat sitting"),
        ("'a red cat' sitting", "a red cat sitting"),
        ("a cat's hat", "a cat's hat"),
        ("'tis a cat's hat", "'tis a cat's hat"),
        ("“a smart-quoted cat”", "a smart-quoted cat"),
        ('a cat "--seed" sign', "a cat --seed sign"),
        ("a cat -- and a dog", "a cat -- and a dog"),
    ],
)
def test_quotes_group_words_and_apostrophes_are_kept(args: str, prompt: str) -> None:
    assert parse_draw_args(args).prompt == prompt


def test_every_option_anywhere_in_the_line() -> None:
    options = parse_draw_args(
        '--seed 42 "a lighthouse at dusk" --steps 30 --size 768x512 '
        '--negative "blurry, low quality" oil painting --guidance 6.5'
    )
    assert options == DrawOptions(
        prompt="a lighthouse at dusk oil painting",
        seed=42,
        steps=30,
        width=768,
        height=512,
        negative="blurry, low quality",
        guidance=6.5,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("cat --seed=7", {"seed": 7}),
        ("cat —seed 7", {"seed": 7}),  # a phone turned -- into an em dash
        ("cat --SIZE 640X480", {"width": 640, "height": 480}),
        ("cat --size 512", {"width": 512, "height": 512}),
        ("cat --size 512×768", {"width": 512, "height": 768}),
        ('cat --negative="ugly hands"', {"negative": "ugly hands"}),
        ("cat --neg ugly", {"negative": "ugly"}),
        ("cat --guidance 0", {"guidance": 0.0}),
        ("cat --steps 1", {"steps": 1}),
    ],
)
def test_option_spellings(args: str, expected: dict[str, object]) -> None:
    options = parse_draw_args(args)
    assert options.prompt == "cat"
    for key, value in expected.items():
        assert getattr(options, key) == value


def test_unquoted_negative_takes_words_up_to_the_next_option() -> None:
    options = parse_draw_args("a cat --negative blurry ugly hands --seed 3")
    assert (options.prompt, options.negative, options.seed) == ("a cat", "blurry ugly hands", 3)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ("", "Tell me what to draw"),
        ("--seed 4", "Tell me what to draw"),
        ("a cat --colour red", "I don't know the option --colour"),
        ("a cat --seed", "--seed needs a value"),
        ("a cat --seed --steps 3", "--seed needs a value"),
        ("a cat --seed lucky", "--seed needs a whole number"),
        ("a cat --seed -1", "--seed must be from 0"),
        ("a cat --steps 0", "--steps must be from 1"),
        ("a cat --steps 2.5", "--steps needs a whole number"),
        ("a cat --size big", "--size needs WIDTHxHEIGHT"),
        ("a cat --size 0x512", "--size must be at least 1x1"),
        ("a cat --guidance lots", "--guidance needs a number"),
        ("a cat --guidance 99", "--guidance must be from 0 to 30"),
        ("a cat --guidance nan", "--guidance must be from 0 to 30"),
        ('"a cat', 'A quote (") is not closed'),
        ("a cat --help", "Draw a picture"),
    ],
)
def test_bad_arguments_answer_with_the_reason_and_usage(args: str, reason: str) -> None:
    with pytest.raises(DrawUsageError) as caught:
        parse_draw_args(args)
    assert reason in str(caught.value)
    assert USAGE in str(caught.value)
    assert "Example: /draw" in str(caught.value)


# -- clamping -------------------------------------------------------------------------


def test_defaults_fill_in_and_nothing_is_adjusted() -> None:
    settings = resolve(DrawOptions(prompt="cat"), DrawSection())
    assert (settings.steps, settings.width, settings.height) == (25, 512, 512)
    assert settings.guidance == 7.5 and settings.notes == ()
    assert 0 <= settings.seed < 2**32


def test_steps_are_clamped_and_the_caption_says_so() -> None:
    settings = resolve(DrawOptions(prompt="cat", steps=500, seed=9), DrawSection())
    assert settings.steps == 50
    caption = settings.caption()
    assert "seed 9" in caption and "50 steps" in caption and "512x512" in caption
    assert "steps lowered from 500 to the maximum, 50" in caption


@pytest.mark.parametrize(
    ("asked", "used"),
    [
        ((1024, 1024), (768, 768)),
        ((1920, 1080), (768, 432)),  # keeps the aspect ratio
        ((513, 700), (512, 696)),  # multiples of 8
        ((10, 10), (64, 64)),  # at least 64
        ((100, 60), (104, 64)),
    ],
)
def test_size_is_fitted_to_the_limits(asked: tuple[int, int], used: tuple[int, int]) -> None:
    section = DrawSection()
    options = DrawOptions(prompt="cat", width=asked[0], height=asked[1], seed=1)
    settings = resolve(options, section)
    assert (settings.width, settings.height) == used
    assert f"size {asked[0]}x{asked[1]} changed to {used[0]}x{used[1]}" in settings.caption()


def test_every_fitted_size_is_within_limits_and_a_multiple_of_8() -> None:
    for width, height in itertools.product([1, 7, 63, 64, 65, 333, 512, 769, 4000], repeat=2):
        for max_width, max_height in [(768, 768), (64, 128), (512, 1024)]:
            w, h = fit_size(width, height, max_width, max_height)
            assert w % 8 == 0 and h % 8 == 0
            assert 64 <= w <= max_width and 64 <= h <= max_height


def test_a_given_seed_is_kept_and_recorded_options_say_what_was_used() -> None:
    options = parse_draw_args('a cat --seed 123 --steps 99 --negative "dogs"')
    settings = resolve(options, DrawSection(max_steps=40))
    assert settings.seed == 123
    assert settings.as_options() == {
        "steps": 40,
        "width": 512,
        "height": 512,
        "guidance": 7.5,
        "negative": "dogs",
        "adjusted": ["steps lowered from 99 to the maximum, 40"],
    }
    assert "negative: dogs" in settings.caption()


def test_long_prompts_are_shortened_in_the_caption_only() -> None:
    settings = resolve(DrawOptions(prompt="cat " * 200, seed=1), DrawSection())
    assert len(settings.prompt) > 700
    assert len(settings.caption()) < 400 and "…" in settings.caption()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_width": 770}, "multiple of 8"),
        ({"default_height": 32, "max_height": 32}, "multiple of 8, at least 64"),
        ({"max_steps": 10}, "must be >= draw.default_steps (25)"),
        ({"max_width": 256}, "must be >= draw.default_width (512)"),
    ],
)
def test_draw_limits_are_validated(values: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DrawSection(**values)
