"""The FAQ file: `[[faq]]` entries with an `id`, `questions` and an `answer`.

A shop edits this file by hand, so every mistake is reported as one line that
names the file, the entry and the problem: start-up stops on it, and
`aigc-bot faq check` prints it.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ID = re.compile(r"^[a-z0-9_-]+$")
_KEYS = {"id", "questions", "answer"}


class KnowledgeError(Exception):
    """The FAQ file or the embedding model cannot be used. The message is one
    line that an operator can act on (file, entry, problem; or the key to set)."""


@dataclass(frozen=True, slots=True)
class FaqEntry:
    id: str
    questions: tuple[str, ...]
    answer: str


@dataclass(frozen=True, slots=True)
class FaqFile:
    """The entries of one file and the digest of its bytes (the cache key)."""

    path: Path
    entries: tuple[FaqEntry, ...]
    digest: str

    def entry(self, entry_id: str) -> FaqEntry | None:
        for entry in self.entries:
            if entry.id == entry_id:
                return entry
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _entry_error(path: Path, number: int, entry_id: str | None, problem: str) -> KnowledgeError:
    name = f'entry {number} (id "{entry_id}")' if entry_id else f"entry {number}"
    return KnowledgeError(f"{path}: {name}: {problem}")


def parse_faq(data: bytes, path: Path) -> FaqFile:
    """Validate the TOML text of an FAQ file; raise `KnowledgeError` on the first problem."""
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise KnowledgeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise KnowledgeError(f"{path}: TOML error: {_one_line(str(exc))}") from exc
    unknown = sorted(set(document) - {"faq"})
    if unknown:
        raise KnowledgeError(f"{path}: unknown top-level key {unknown[0]!r} (expected [[faq]])")
    raw = document.get("faq")
    if not isinstance(raw, list) or not raw:
        raise KnowledgeError(f"{path}: no [[faq]] entries")
    entries: list[FaqEntry] = []
    seen: dict[str, int] = {}
    for number, item in enumerate(raw, start=1):
        entry = _parse_entry(item, path, number)
        if entry.id in seen:
            raise _entry_error(
                path, number, entry.id, f"duplicate id (entry {seen[entry.id]} has it too)"
            )
        seen[entry.id] = number
        entries.append(entry)
    return FaqFile(path, tuple(entries), hashlib.sha256(data).hexdigest())


def _parse_entry(item: Any, path: Path, number: int) -> FaqEntry:
    if not isinstance(item, dict):
        raise _entry_error(path, number, None, "must be a table ([[faq]])")
    raw_id = item.get("id")
    entry_id = raw_id if isinstance(raw_id, str) else None
    shown = entry_id if entry_id and _ID.match(entry_id) else None

    def fail(problem: str) -> KnowledgeError:
        return _entry_error(path, number, shown, problem)

    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (expected id, questions, answer)")
    if raw_id is None:
        raise fail("id is missing")
    if entry_id is None or not _ID.match(entry_id):
        raise fail(f"id {raw_id!r} must be lower-case letters, digits, '_' or '-'")
    questions = item.get("questions")
    if questions is None:
        raise fail("questions is missing")
    if not isinstance(questions, list) or not questions:
        raise fail("questions must be a non-empty list of strings")
    cleaned: list[str] = []
    for index, question in enumerate(questions, start=1):
        if not isinstance(question, str) or not question.strip():
            raise fail(f"question {index} is empty or not a string")
        cleaned.append(question.strip())
    answer = item.get("answer")
    if answer is None:
        raise fail("answer is missing")
    if not isinstance(answer, str):
        raise fail("answer must be a string")
    if not answer.strip():
        raise fail("answer is empty")
    return FaqEntry(entry_id, tuple(cleaned), answer.strip())


def load_faq(path: Path) -> FaqFile:
    """Read and validate an FAQ file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KnowledgeError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return parse_faq(data, path)
