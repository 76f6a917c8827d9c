"""Making any text safe to store and send back.

Text can hold what no database or encoder accepts: lone UTF-16 surrogates
(`"\\ud800"` in JSON, which browsers and some clients do send) cannot be
encoded as UTF-8, and PostgreSQL refuses NUL in text. Both are replaced with
U+FFFD REPLACEMENT CHARACTER, which is what a UTF-8 decoder shows for bytes it
cannot read; everything else (RTL overrides, zero-width joiners, combining
marks, BOMs) is kept as sent.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")


def safe_text(text: str) -> str:
    """`text` with lone surrogates and NUL replaced by U+FFFD."""
    if not _UNSTORABLE.search(text):
        return text
    # A valid surrogate pair cannot occur in a Python str (it would be one
    # code point), so every surrogate here is a lone one.
    return _UNSTORABLE.sub(REPLACEMENT, text)
