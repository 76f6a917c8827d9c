"""Splitting a long reply into platform-sized messages without losing a character.

Cuts fall on a paragraph break, else a line break, else a space, and never
inside a ``` code block when there is any other choice. A code block longer
than one message is split on a line inside it, closed with a fence at the end
of one part and reopened (with its language tag) at the start of the next.
Otherwise `"".join(parts) == text`: the separator stays at the end of a part.
"""

from __future__ import annotations

import re

FENCE = "```"
#: A fence's language tag: a short word right before the line ends. Anything
#: else after the backticks is code, and is not carried to a re-opened fence.
_FENCE_OPEN = re.compile(r"```([\w+#.-]{1,32})[ \t]*(?=\n|$)")


def _inside_code(text: str, position: int) -> bool:
    return text.count(FENCE, 0, position) % 2 == 1


def _open_fence_info(text: str, position: int) -> tuple[int, str]:
    """Start and language tag of the fence that is open at `position`."""
    start = text.rfind(FENCE, 0, position)
    match = _FENCE_OPEN.match(text, start)
    return start, (match.group(1).strip() if match else "")


def _last_break(text: str, limit: int, pattern: str) -> list[int]:
    return [m.end() for m in re.finditer(pattern, text[:limit])]


def _cut_outside_code(text: str, limit: int) -> int | None:
    for pattern in (r"\n\n+", r"\n", r"[ \t]+"):
        for cut in reversed(_last_break(text, limit, pattern)):
            if 0 < cut <= limit and not _inside_code(text, cut):
                return cut
    return None


def split_message(text: str, limit: int) -> list[str]:
    """Parts of at most `limit` characters each (limit must leave room for fences)."""
    if limit < 16:
        raise ValueError("limit must be at least 16 characters")
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = _cut_outside_code(rest, limit)
        if cut is None and _inside_code(rest, limit):
            fence_start, language = _open_fence_info(rest, limit)
            if fence_start > 0:
                # Close the part before the code block starts.
                newline = rest.rfind("\n", 0, fence_start)
                cut = newline + 1 if newline >= 0 else fence_start
            else:
                # The code block itself is too long: split it on a line and re-fence.
                closing = "\n" + FENCE
                room = limit - len(closing)
                newline = rest.rfind("\n", 0, room)
                inner = newline + 1 if newline > len(FENCE) + len(language) else room
                parts.append(rest[:inner].rstrip("\n") + closing)
                rest = f"{FENCE}{language}\n" + rest[inner:]
                continue
        if cut is None:
            cut = limit  # one unbroken word longer than a message
        parts.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        parts.append(rest)
    return parts
