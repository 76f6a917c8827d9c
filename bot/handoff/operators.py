"""Operator tokens: who may use the operator console.

They come only from the env var `[handoff] operator_tokens_env` names
(default `AIGC_BOT_OPERATOR_TOKENS`), as comma-separated `name:token` pairs,
e.g. `anna:3f9c...,ben:81d0...`. Each token is registered for log redaction
when it is read, never printed, and compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
import re

from pydantic import SecretStr

from bot.config import read_secret

log = logging.getLogger(__name__)

_NAME = re.compile(r"[\w .@-]{1,64}")
#: Shorter tokens work, with a warning: they can be guessed.
MIN_TOKEN_CHARS = 16


class OperatorTokensError(ValueError):
    """The operator tokens env var cannot be read; says which part, never the token."""


def parse_tokens(value: str, env_name: str = "the operator tokens") -> list[tuple[str, SecretStr]]:
    """`name:token,name:token` -> [(name, token)]."""
    pairs: list[tuple[str, SecretStr]] = []
    seen: set[str] = set()
    for number, entry in enumerate(value.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        name, colon, token = entry.partition(":")
        name, token = name.strip(), token.strip()
        if not colon or not name or not token:
            raise OperatorTokensError(f"{env_name}: entry {number} is not name:token")
        if not _NAME.fullmatch(name):
            raise OperatorTokensError(
                f"{env_name}: entry {number}: a name is 1-64 letters, digits, spaces or . _ @ -"
            )
        if any(char.isspace() for char in token):
            raise OperatorTokensError(f"{env_name}: entry {number}: the token contains a space")
        if token in seen:
            raise OperatorTokensError(f"{env_name}: entry {number} repeats another's token")
        seen.add(token)
        if len(token) < MIN_TOKEN_CHARS:
            log.warning(
                "%s: %s's token is shorter than %d characters and could be guessed",
                env_name,
                name,
                MIN_TOKEN_CHARS,
            )
        pairs.append((name, SecretStr(token)))
    return pairs


class Operators:
    """The people who may sign in to the console, by token."""

    def __init__(self, pairs: list[tuple[str, SecretStr]]) -> None:
        self._pairs = [(name, token.get_secret_value().encode()) for name, token in pairs]

    @classmethod
    def from_env(cls, env_name: str) -> Operators:
        """Read the tokens (registering each for redaction); none when the var is unset."""
        secret = read_secret(env_name)
        if secret is None:
            return cls([])
        pairs = parse_tokens(secret.get_secret_value(), env_name)
        from bot.logging_setup import register_secret

        for _name, token in pairs:
            register_secret(token.get_secret_value())
        return cls(pairs)

    @property
    def names(self) -> list[str]:
        return [name for name, _token in self._pairs]

    def __len__(self) -> int:
        return len(self._pairs)

    def authenticate(self, token: str) -> str | None:
        """The operator whose token this is, or None. Every token is compared,
        each in constant time, so timing tells nothing about which matched."""
        offered = token.strip().encode()
        found: str | None = None
        for name, known in self._pairs:
            if hmac.compare_digest(offered, known) and found is None:
                found = name
        return found if offered else None
