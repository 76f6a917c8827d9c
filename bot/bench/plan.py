"""What `aigc-bot bench` runs: user counts, turns, tokens, threads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_USERS = (1, 8, 32)
QUICK_USERS = (1, 4)
BUNDLED_MODEL = "models/chitchat-gpt2"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run. `new_tokens` None: the config's text.max_new_tokens."""

    users: tuple[int, ...] = DEFAULT_USERS
    turns: int = 20
    new_tokens: int | None = None
    model: str | None = None
    overhead_users: int = 32
    overhead_turns: int = 40
    int8_users: int = 8
    int8_turns: int = 5
    heldout_dialogues: int = 40
    turn_repeats: int = 3
    threads: int | None = None
    #: `--peers`: users' first messages spread over this many seconds (closed loop)
    ramp_s: float = 1.0
    #: The knowledge base's added latency per message (an FAQ of this many entries; 0 = skip)
    knowledge_entries: int = 100

    @classmethod
    def quick(cls, **overrides: Any) -> Plan:
        values: dict[str, Any] = {
            "users": QUICK_USERS,
            "turns": 4,
            "new_tokens": 8,
            "overhead_users": 8,
            "overhead_turns": 5,
            "int8_users": 2,
            "int8_turns": 2,
            "turn_repeats": 1,
            "heldout_dialogues": 4,
            "ramp_s": 0.05,
            "knowledge_entries": 0,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)
