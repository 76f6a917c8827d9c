"""Keys/values of earlier turns, kept so the next turn only encodes what is new.

A conversation's prompt for turn n+1 starts with the prompt and reply of turn
n. Attention is causal, so the keys/values of a token depend only on the
tokens before it: the cached entries for the longest common prefix of the old
and new token sequences are exactly what recomputation would give. When
history is truncated the sequences diverge at the start and nothing is reused.

Used only from the engine's worker thread, so it takes no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: one conversation's keys and values: `[layers, 2, heads, tokens, head_dim]`
KV = torch.Tensor


@dataclass(slots=True)
class _Entry:
    tokens: list[int]
    layers: KV
    nbytes: int


def _common_prefix(left: Sequence[int], right: Sequence[int]) -> int:
    limit = min(len(left), len(right))
    for index in range(limit):
        if left[index] != right[index]:
            return index
    return limit


class PrefixCache:
    """A bounded LRU of per-conversation keys/values, sized in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, tokens: Sequence[int]) -> tuple[int, KV | None]:
        """How many leading `tokens` have cached keys/values, and those entries.

        At least one token is always left to encode, since the model needs an
        input to produce the next-token logits.
        """
        entry = self._entries.get(key) if key and self.max_bytes else None
        if entry is None:
            self.misses += 1
            return 0, None
        reuse = min(_common_prefix(entry.tokens, tokens), len(tokens) - 1)
        if reuse <= 0:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(key)
        self.hits += 1
        self.reused_tokens += reuse
        return reuse, entry.layers[..., :reuse, :]

    def store(self, key: str, tokens: list[int], layers: KV) -> None:
        if not key or not self.max_bytes:
            return
        self.discard(key)
        nbytes = layers.numel() * layers.element_size()
        if nbytes > self.max_bytes:
            return
        # evict first: `bytes_used` is read from other threads (the engine's
        # `kv_bytes`) and must never show more than `max_bytes`, even for a moment
        while self._entries and self.bytes_used + nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes_used -= evicted.nbytes
        self._entries[key] = _Entry(tokens, layers, nbytes)
        self.bytes_used += nbytes

    def discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes_used = 0
