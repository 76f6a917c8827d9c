"""A shared corpus of hostile text, for every channel's tests.

Each entry is a name (for test ids and failure messages) and the text as a
Python `str`. Lone surrogates cannot be encoded as UTF-8, so channels get them
the way a client really sends them: the web as `"\\ud800"` escapes inside the
JSON body (`json_body`), Telegram and Discord as escapes in the JSON their
fakes send (which the SDKs decode into lone surrogates), the console as the
bytes a broken client would write.

The bot's one documented change to text is `bot.text_safety.safe_text`: lone
surrogates and NUL become U+FFFD; leading and trailing whitespace is trimmed.
`stored_form` is what every channel must store and return for an entry.
"""

from __future__ import annotations

import json

from bot.text_safety import safe_text

ZALGO = "Z" + "\u0336\u0317\u0353\u0323\u0489" * 80 + "algo" + "\u0301\u0302\u0303\u0304" * 60
LONG_WORD = "A" * 10_000
EMOJI_ZWJ = "👩‍👩‍👧‍👦 👨🏽‍💻 🏳️‍🌈 🧑‍🤝‍🧑 ❤️‍🔥"
FLAGS = "🇩🇪🇫🇷🇯🇵🇺🇸 🏴󠁧󠁢󠁳󠁣󠁴󠁿"

#: name -> text; in this order in every test.
HOSTILE: dict[str, str] = {
    "lone_high_surrogate": "before \ud800 after",
    "lone_low_surrogate": "\udfff alone",
    "reversed_pair": "\ude00\ud83d reversed pair",
    "only_surrogates": "\udfff\ud800\ud800",  # never a pair, not even in JSON
    "nul": "nul\x00inside\x00",
    "bom": "\ufeffstarts with a BOM",
    "bom_only_inside": "a\ufeffb",
    "rtl_override": "user\u202egnp.exe\u202c and \u2067isolate\u2069",
    "zero_width": "zero\u200bwidth\u200c\u200djoiners\u2060 and\u00adsoft hyphen",
    "zalgo": ZALGO,
    "long_word": LONG_WORD,
    "emoji_zwj": EMOJI_ZWJ,
    "flags": FLAGS,
    "html": '<script>alert("x")</script><img src=x onerror=alert(1)> &amp; &lt;b&gt;',
    "markdown": "**bold** _it_ `code` [link](javascript:alert(1)) ||spoiler|| ~~s~~ > quote",
    "code_block": "```py\ndef f():\n    return '```'\n```\n`unclosed",
    "pings": "@everyone @here <@&123456789012345678> <@!42> <#1> <@42>",
    "format_strings": "%s %d %(name)s {0} {name} {{}} ${HOME} %n \\N{BULLET} {!r}",
    "sql": "'; DROP TABLE messages; -- \" OR 1=1; /* */",
    "long_line": " ".join(f"word{i}" for i in range(1500)),
    "mixed_newlines": "one\r\ntwo\rthree\nfour\u2028five\u2029six\x85seven",
    "control_chars": "bell\x07 esc\x1b[31mred\x1b[0m del\x7f vt\x0b ff\x0c",
    "backslashes": "C:\\new\\table \\u0000 \\ud800 \\x00",
    "slash_not_command": "/ not a command, //also not",
    "unicode_whitespace_inside": "a\u00a0b\u2003c\u3000d",
    "only_whitespace": " \t\n\r\u00a0\u2003\u3000 ",
    "surrogate_and_spaces": "  \ud800  ",
}

#: Entries that are nothing after trimming: every channel answers "empty".
EMPTY_AFTER_TRIM = {name for name, text in HOSTILE.items() if not safe_text(text).strip()}


def stored_form(text: str) -> str:
    """What the bot stores and returns for `text`: U+FFFD for lone
    surrogates and NUL (bot.text_safety), whitespace trimmed at both ends."""
    return safe_text(text).strip()


def json_body(payload: object) -> bytes:
    """`payload` as JSON bytes; lone surrogates become `\\udXXX` escapes, as a
    browser's JSON.stringify writes them."""
    return json.dumps(payload, ensure_ascii=True).encode("ascii")


#: JSON string literals (escapes as written by clients) and the text they mean.
RAW_JSON_STRINGS: dict[str, str] = {
    "escaped_lone_high": r'"x\ud800y"',
    "escaped_lone_low": r'"\udc00"',
    "escaped_pair_is_one_emoji": r'"\ud83d\ude00"',
    "escaped_pair_reversed": r'"\ude00\ud83d"',
    "escaped_nul": r'"a\u0000b"',
    "escaped_bom": r'"\ufeffhi"',
}

#: Bodies that are not valid UTF-8 (or not the charset they claim).
INVALID_UTF8_BODIES: dict[str, bytes] = {
    "ff_fe": b'{"text": "\xff\xfe"}',
    "latin1_e_acute": b'{"text": "caf\xe9"}',
    "overlong_slash": b'{"text": "\xc0\xaf"}',
    "utf8_encoded_surrogate": b'{"text": "\xed\xa0\x80"}',
    "truncated_sequence": b'{"text": "\xe2\x82"}',
    "bare_continuation": b'{"text": "\x80\x80"}',
}

#: Printable-ASCII hostile strings that are valid `Idempotency-Key` values.
HOSTILE_IDEMPOTENCY_KEYS = [
    "'; DROP TABLE messages; --",
    "%s {0} {name}",
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "idem:nested",
    "x" * 200,
]
