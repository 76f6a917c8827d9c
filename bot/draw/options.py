"""`/draw` arguments: parsed the same way in every channel, then clamped.

    /draw <prompt> [--seed N] [--steps N] [--size WxH] [--negative TEXT] [--guidance X]

Words are split like a shell would: "double" or 'single' quotes group words
(a quoted word is never an option), and an apostrophe inside a word (a cat's
hat) is just an apostrophe. Options may come anywhere and also read
`--seed=42`; phones that turn `--` into a dash (—seed) are understood.
`--negative` takes one quoted value, or every unquoted word up to the next
option. Anything malformed raises `DrawUsageError`, whose text is the answer.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from bot.config import DrawSection

USAGE = "/draw <prompt> [--seed N] [--steps N] [--size WxH] [--negative TEXT] [--guidance X]"
EXAMPLE = '/draw "a lighthouse at dusk, oil painting" --seed 42 --size 768x512 --negative blurry'
MAX_SEED = 2**63 - 1
MIN_SIDE = 64
MAX_GUIDANCE = 30.0
CAPTION_PROMPT_CHARS = 200

_OPTIONS = ("seed", "steps", "size", "negative", "guidance")
_ALIASES = {"neg": "negative", "no": "negative", "cfg": "guidance", "n": "steps"}
_QUOTES = {'"': '"', "'": "'", "“": "”", "„": "“", "‘": "’", "«": "»"}
_SINGLE = ("'", "‘")
_DASHES = ("--", "—", "–")
_SIZE = re.compile(r"^(\d{1,5})\s*[x×*]\s*(\d{1,5})$", re.I)


class DrawUsageError(ValueError):
    """The arguments can't be used; `str()` is a short reason plus the usage."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}\nUsage: {USAGE}\nExample: {EXAMPLE}")


@dataclass(frozen=True, slots=True)
class DrawOptions:
    """What the user asked for; None where they left the default."""

    prompt: str
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    negative: str = ""
    guidance: float | None = None


@dataclass(frozen=True, slots=True)
class DrawSettings:
    """What will be drawn, after defaults and clamping. `notes` says, in
    words, what was changed from the request."""

    prompt: str
    negative: str
    seed: int
    steps: int
    width: int
    height: int
    guidance: float
    notes: tuple[str, ...] = field(default=())

    def as_options(self) -> dict[str, Any]:
        """The options as recorded with the draw (the seed has its own column)."""
        options: dict[str, Any] = {
            "steps": self.steps,
            "width": self.width,
            "height": self.height,
            "guidance": self.guidance,
        }
        if self.negative:
            options["negative"] = self.negative
        if self.notes:
            options["adjusted"] = list(self.notes)
        return options

    def caption(self) -> str:
        prompt = self.prompt
        if len(prompt) > CAPTION_PROMPT_CHARS:
            prompt = prompt[: CAPTION_PROMPT_CHARS - 1].rstrip() + "…"
        used = (
            f"seed {self.seed} · {self.steps} steps · {self.width}x{self.height}"
            f" · guidance {self.guidance:g}"
        )
        lines = [f"“{prompt}”", used]
        if self.negative:
            negative = self.negative
            if len(negative) > CAPTION_PROMPT_CHARS:
                negative = negative[: CAPTION_PROMPT_CHARS - 1].rstrip() + "…"
            lines.append(f"negative: {negative}")
        lines += self.notes
        return "\n".join(lines)


# -- splitting -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Word:
    text: str
    quoted: bool


def split_words(text: str) -> list[_Word]:
    """Shell-like splitting that forgives apostrophes; an unclosed double
    quote is an error (an unclosed single quote is an apostrophe)."""
    words: list[_Word] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        closer = _QUOTES.get(text[i])
        if closer is not None:
            end = _closing(text, i, closer)
            if end is not None:
                words.append(_Word(text[i + 1 : end], quoted=True))
                i = end + 1
                continue
        # A bare word; a double quote inside it (--negative="a b") groups too.
        chars: list[str] = []
        while i < n and not text[i].isspace():
            closer = _QUOTES.get(text[i])
            if closer is not None and text[i] not in _SINGLE:
                end = _closing(text, i, closer)
                assert end is not None
                chars.append(text[i + 1 : end])
                i = end + 1
                continue
            chars.append(text[i])
            i += 1
        words.append(_Word("".join(chars), quoted=False))
    return words


def _closing(text: str, start: int, closer: str) -> int | None:
    """Where the quote opened at `start` closes. A single quote closes only
    before a space or the end (so "cat's" inside it is fine), and one that
    never closes is an apostrophe (None); an unclosed double quote is an error."""
    if text[start] in _SINGLE:
        at = start
        while (at := text.find(closer, at + 1)) != -1:
            if at + 1 == len(text) or text[at + 1].isspace():
                return at
        return None
    end = text.find(closer, start + 1)
    if end == -1:
        raise DrawUsageError(f"A quote ({text[start]}) is not closed.")
    return end


def _option_name(word: _Word) -> str | None:
    """The option a word names (`--seed`, `—seed`, `--seed=4`), or None."""
    if word.quoted:
        return None
    for dash in _DASHES:
        if word.text.startswith(dash) and len(word.text) > len(dash):
            name = word.text[len(dash) :].split("=", 1)[0].lower()
            return _ALIASES.get(name, name)
    return None


# -- parsing ---------------------------------------------------------------------


def _int(option: str, raw: str, low: int, high: int, what: str) -> int:
    raw = raw.strip().replace("_", "")
    if not re.fullmatch(r"[+-]?\d+", raw):
        raise DrawUsageError(f"--{option} needs {what}, not {raw[:40]!r}.")
    if len(raw.lstrip("+-0")) > len(str(high)):  # also spares int() thousands of digits
        raise DrawUsageError(f"--{option} must be from {low} to {high:,}.")
    value = int(raw)
    if not low <= value <= high:
        raise DrawUsageError(f"--{option} must be from {low} to {high:,}, not {value}.")
    return value


def _size(raw: str) -> tuple[int, int]:
    raw = raw.strip()
    if re.fullmatch(r"\d{1,5}", raw):
        width = height = int(raw)
    else:
        match = _SIZE.match(raw)
        if match is None:
            raise DrawUsageError(f"--size needs WIDTHxHEIGHT in pixels, like 512x768, not {raw!r}.")
        width, height = int(match[1]), int(match[2])
    if width < 1 or height < 1:
        raise DrawUsageError("--size must be at least 1x1.")
    return width, height


def _guidance(raw: str) -> float:
    try:
        value = float(raw.strip().replace(",", "."))
    except ValueError:
        raise DrawUsageError(f"--guidance needs a number like 7.5, not {raw!r}.") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_GUIDANCE:
        raise DrawUsageError(f"--guidance must be from 0 to {MAX_GUIDANCE:g}, not {raw.strip()}.")
    return value


def parse_draw_args(args: str) -> DrawOptions:
    """`/draw` arguments -> DrawOptions, or `DrawUsageError` saying what's wrong."""
    words = split_words(args)
    prompt: list[str] = []
    values: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        name = _option_name(word)
        i += 1
        if name is None:
            prompt.append(word.text)
            continue
        if name in ("help", "h"):
            raise DrawUsageError("Draw a picture from a description.")
        if name not in _OPTIONS:
            raise DrawUsageError(f"I don't know the option {word.text.split('=', 1)[0]}.")
        raw: str | None = word.text.split("=", 1)[1] if "=" in word.text else None
        if raw is None and name == "negative" and i < len(words) and not words[i].quoted:
            # Unquoted: every word up to the next option.
            taken: list[str] = []
            while i < len(words) and _option_name(words[i]) is None and not words[i].quoted:
                taken.append(words[i].text)
                i += 1
            raw = " ".join(taken)
        elif raw is None:
            if i >= len(words) or _option_name(words[i]) is not None:
                raise DrawUsageError(f"--{name} needs a value.")
            raw = words[i].text
            i += 1
        if name == "seed":
            values["seed"] = _int("seed", raw, 0, MAX_SEED, "a whole number")
        elif name == "steps":
            values["steps"] = _int("steps", raw, 1, 10_000, "a whole number of steps")
        elif name == "size":
            values["width"], values["height"] = _size(raw)
        elif name == "guidance":
            values["guidance"] = _guidance(raw)
        else:
            values["negative"] = " ".join(raw.split())
    text = " ".join(" ".join(prompt).split())
    if not text:
        raise DrawUsageError("Tell me what to draw.")
    return DrawOptions(prompt=text, **values)


# -- clamping --------------------------------------------------------------------


def _round8(value: float) -> int:
    return max(8, int(value) // 8 * 8)


def fit_size(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """Scale (keeping the aspect ratio) to fit the limits and to be at least
    MIN_SIDE (where the limits allow), then round down to multiples of 8."""
    scale = min(1.0, max_width / width, max_height / height)
    w, h = width * scale, height * scale
    grow = max(1.0, MIN_SIDE / w, MIN_SIDE / h)
    w, h = min(w * grow, max_width), min(h * grow, max_height)
    width_limit, height_limit = _round8(max_width), _round8(max_height)
    return min(max(_round8(w), MIN_SIDE), width_limit), min(max(_round8(h), MIN_SIDE), height_limit)


def resolve(options: DrawOptions, section: DrawSection, *, seed: int | None = None) -> DrawSettings:
    """Fill in defaults, clamp steps and size to the limits, pick a seed."""
    notes: list[str] = []
    steps = options.steps if options.steps is not None else section.default_steps
    if steps > section.max_steps:
        notes.append(f"steps lowered from {steps} to the maximum, {section.max_steps}")
        steps = section.max_steps
    asked_w = options.width if options.width is not None else section.default_width
    asked_h = options.height if options.height is not None else section.default_height
    width, height = fit_size(asked_w, asked_h, section.max_width, section.max_height)
    if (width, height) != (asked_w, asked_h):
        if asked_w > section.max_width or asked_h > section.max_height:
            why = f"to fit the {section.max_width}x{section.max_height} limit"
        else:
            why = f"to multiples of 8, at least {MIN_SIDE}"
        notes.append(f"size {asked_w}x{asked_h} changed to {width}x{height} {why}")
    guidance = options.guidance if options.guidance is not None else section.guidance
    if options.seed is not None:
        chosen = options.seed
    elif seed is not None:
        chosen = seed
    else:
        chosen = secrets.randbelow(2**32)
    return DrawSettings(
        prompt=options.prompt,
        negative=options.negative,
        seed=chosen,
        steps=steps,
        width=width,
        height=height,
        guidance=guidance,
        notes=tuple(notes),
    )
