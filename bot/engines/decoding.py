"""Continuous batching over the slot cache of `bot.engines.gpt2`, with prefix reuse.

Each iteration of `BatchDecoder.run`:

1. admits requests that arrived meanwhile into free slots (copying a
   conversation's cached keys/values from the prefix cache first, so only
   the new tokens are encoded);
2. runs one forward pass: every running row is fed its last token and the
   newcomers' prompts are encoded, together (a newcomer costs its tokens,
   not a pass of its own);
3. samples every row's next token;
4. retires rows that are done (EOS, the token limit, or cancelled: their
   keys/values go to the prefix cache) and fills the holes with rows from
   the end, so rows 0..n-1 always occupy slots 0..n-1.

A short answer never pays for a long one, and a latecomer waits one step,
not a whole batch. Runs only on the engine's worker thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bot.engines.gpt2 import Gpt2Runner, Prefill
from bot.engines.prefix_cache import PrefixCache
from bot.engines.settings import SamplingSettings


@dataclass(slots=True)
class DecodeRequest:
    """One dialogue to continue. `on_text(text_so_far, done)` is called from
    the worker thread; `cancelled` is set by the caller to drop the request."""

    prompt_ids: list[int]
    cache_key: str
    on_text: Callable[[str, bool], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Row:
    request: DecodeRequest
    tokens: list[int]  # the tokens whose keys/values are in the row's slot
    steps: int = 0  # tokens sampled so far
    last_text: str = ""
    last_emit: float = 0.0


#: `admit(room)`: up to `room` requests that are waiting, without blocking.
Admit = Callable[[int], Sequence[DecodeRequest]]


class BatchDecoder:
    def __init__(
        self,
        runner: Gpt2Runner,
        tokenizer: Any,
        *,
        eos_id: int,
        prefix_cache: PrefixCache,
        settings: SamplingSettings,
        observe_rows: Callable[[int], None] | None = None,
        on_tokens: Callable[[int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.cache = prefix_cache
        self.settings = settings
        self.max_rows = runner.slots
        self.device = runner.device
        self.generated_tokens = 0
        self.steps = 0  # decode steps
        self.step_rows = 0  # rows summed over those steps: step_rows / steps = mean batch
        self.joined = 0  # requests that joined a batch already running
        self.prefilled_tokens = 0  # prompt tokens encoded (the rest came from the prefix cache)
        self.observe_rows = observe_rows
        self.on_tokens = on_tokens
        #: 1.0 where a row has generated the token (the repetition penalty's), else 0.0
        self._seen = torch.zeros((runner.slots, runner.vocab), device=self.device)

    # -- sampling --------------------------------------------------------------

    def _penalise(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The repetition penalty on tokens already generated (`seen`: 1.0 for
        them, 0.0 for the rest): a positive logit divided by the penalty, a
        negative one multiplied. Branch-free: for a penalty above 1 that is the
        smaller of `x / p` and `x * p` whatever the sign (the larger for one
        below 1), blended in by `seen` with `lerp`, which returns either end
        exactly. Selecting by `logits > 0` with `torch.where` costs 10x more
        here: a branch the CPU mispredicts half the time."""
        penalty = self.settings.repetition_penalty
        if penalty == 1.0:
            return logits
        pick = torch.minimum if penalty > 1.0 else torch.maximum
        return torch.lerp(logits, pick(logits / penalty, logits * penalty), seen)

    def _next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """A token per row from logits the penalty and EOS mask were applied to."""
        s = self.settings
        if s.greedy:
            return logits.argmax(dim=-1)
        # Top-k first: top-p then works on k sorted candidates, not the whole vocabulary.
        vocabulary = logits.shape[-1]
        k = s.top_k if 0 < s.top_k < vocabulary else vocabulary
        values, candidates = torch.topk(logits, k, dim=-1)  # the temperature keeps the order
        probabilities = (values / s.temperature).softmax(dim=-1)
        if s.top_p < 1.0:
            before = probabilities.cumsum(dim=-1) - probabilities
            probabilities = probabilities.masked_fill(before > s.top_p, 0.0)
        choice = torch.multinomial(probabilities, num_samples=1)
        return candidates.gather(-1, choice).squeeze(-1)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        if logits.dtype != torch.float32:
            logits = logits.float()
        logits = self._penalise(logits, self._seen[: len(rows)])
        minimum = self.settings.min_new_tokens
        early = [row.steps < minimum for row in rows] if minimum else []
        if any(early):
            if self.settings.repetition_penalty == 1.0:  # the runner's own tensor: keep it
                logits = logits.clone()
            if all(early):  # one operation, not four
                logits[:, self.eos_id] = -torch.inf
            else:
                mask = torch.tensor(early, device=self.device)
                logits[:, self.eos_id] = logits[:, self.eos_id].masked_fill(mask, -torch.inf)
        tokens: list[int] = self._next_tokens(logits).tolist()
        return tokens

    # -- the batch -------------------------------------------------------------

    def _place(
        self, requests: Sequence[DecodeRequest], first_slot: int
    ) -> tuple[list[_Row], list[Prefill]]:
        """Put each request in its slot (cached prefix first); returns the rows in
        slot order and the prefills that encode the rest of their prompts.

        Rows are encoded in groups of similar length, shortest first: a row
        whose prefix was cached (a few new tokens) is not padded to the width
        of one that missed (a whole prompt)."""
        looked = []
        for request in requests:
            reuse, layers = self.cache.lookup(request.cache_key, request.prompt_ids)
            looked.append((request, reuse, layers))
        looked.sort(key=lambda item: len(item[0].prompt_ids) - item[1])
        for offset, (request, reuse, layers) in enumerate(looked):
            if layers is not None:
                self.runner.load(first_slot + offset, layers)
            self.prefilled_tokens += len(request.prompt_ids) - reuse
        self._seen[first_slot : first_slot + len(looked)] = 0.0
        prefills: list[Prefill] = []
        for start, end in _length_groups([len(r.prompt_ids) - reuse for r, reuse, _ in looked]):
            group = looked[start:end]
            prefills.append(
                (
                    first_slot + start,
                    [request.prompt_ids[reuse:] for request, reuse, _ in group],
                    [reuse for _, reuse, _ in group],
                )
            )
        rows = [_Row(request, list(request.prompt_ids)) for request, _, _ in looked]
        return rows, prefills

    def _emit(self, row: _Row, done: bool) -> None:
        if not done:
            now = time.monotonic()
            if now - row.last_emit < self.settings.stream_interval_s:
                return
            row.last_emit = now
        text = self.tokenizer.decode(row.request.generated, skip_special_tokens=True)
        if done or (text != row.last_text and not text.endswith("\ufffd")):
            row.last_text = text
            row.request.on_text(text, done)

    def _save_prefix(self, row: _Row, slot: int) -> None:
        if row.request.cache_key and self.cache.max_bytes:
            layers = self.runner.export(slot, len(row.tokens))
            self.cache.store(row.request.cache_key, row.tokens, layers)

    @torch.inference_mode()
    def run(self, requests: Sequence[DecodeRequest], admit: Admit | None = None) -> None:
        """Decode until every row has produced EOS, hit the token limit or been
        cancelled. With `admit`, requests that arrive meanwhile join the running
        batch between steps (continuous batching); `admit(room)` returns at most
        `room` of them without blocking."""
        rows: list[_Row] = []
        tokens: list[int] = []  # each row's token sampled last, not yet fed
        pending = collections.deque(requests)
        while True:
            room = self.max_rows - len(rows)
            joining: list[DecodeRequest] = []
            while pending and len(joining) < room:
                request = pending.popleft()
                if not request.cancelled.is_set():
                    joining.append(request)
            if admit is not None and len(joining) < room:
                latecomers = [r for r in admit(room - len(joining)) if not r.cancelled.is_set()]
                if rows:
                    self.joined += len(latecomers)
                joining += latecomers
            if not rows and not joining:
                if pending:
                    continue
                return
            rows, logits = self._advance(rows, tokens, joining)
            tokens = self._sample(rows, logits)
            rows, tokens = self._retire(rows, tokens)

    def _retire(self, rows: list[_Row], tokens: list[int]) -> tuple[list[_Row], list[int]]:
        """Record each row's token; retire finished rows and compact the rest into
        slots 0..n-1. Returns the rows that go on and their tokens, in slot order."""
        limit = self.settings.max_new_tokens
        finished: list[int] = []
        appended = 0
        for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            request = row.request
            done = token == self.eos_id or request.cancelled.is_set()
            if not done:
                request.generated.append(token)
                appended += 1
            row.steps += 1
            if done or row.steps >= limit:
                finished.append(index)
        self.generated_tokens += appended
        if self.on_tokens is not None and appended:  # counted before any reply is handed over
            self.on_tokens(appended)
        for index in finished:
            row = rows[index]
            self._save_prefix(row, index)
            if not row.request.cancelled.is_set():
                self._emit(row, done=True)
        leaving = set(finished)
        order = [index for index in range(len(rows)) if index not in leaving]
        for index in order:
            self._emit(rows[index], done=False)
        if finished:
            # fill each hole below the new row count with a row from above it
            count = len(order)
            holes = [index for index in finished if index < count]
            movers = [index for index in order if index >= count]
            for hole, mover in zip(holes, movers, strict=True):
                self.runner.move(mover, hole, len(rows[mover].tokens))
                self._seen[hole] = self._seen[mover]
            placed = dict(zip(movers, holes, strict=True))
            order = sorted(order, key=lambda index: placed.get(index, index))
        return [rows[i] for i in order], [tokens[i] for i in order]

    def _advance(
        self, rows: list[_Row], tokens: list[int], joining: Sequence[DecodeRequest]
    ) -> tuple[list[_Row], torch.Tensor]:
        """One forward pass for the whole batch: every running row is fed its new
        token and the `joining` requests are prefilled into the slots after
        them, in the same pass. Returns the rows (the newcomers last) and each
        one's next-token logits."""
        new_rows, prefills = self._place(joining, len(rows)) if joining else ([], [])
        if not rows:
            return new_rows, self.runner.step(None, None, prefills)
        self.steps += 1
        self.step_rows += len(rows)
        if self.observe_rows is not None:
            self.observe_rows(len(rows))
        positions = [len(row.tokens) for row in rows]
        for row, token in zip(rows, tokens, strict=True):
            row.tokens.append(token)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self._seen[: len(rows)].scatter_(1, ids[:, None], 1.0)
        where = torch.tensor(positions, device=self.device)
        return rows + new_rows, self.runner.decode(ids, where, prefills)


#: padding a group may carry, in tokens, before a longer row starts a new group
_PAD_ALLOWANCE = 64


def _length_groups(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Split ascending `lengths` into `(start, end)` runs whose padding to their
    longest row wastes at most about a quarter of their work (or 64 tokens)."""
    groups: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, length in enumerate(lengths):
        padded = (index - start + 1) * length
        if index > start and padded - (total + length) > max(_PAD_ALLOWANCE, (total + length) // 4):
            groups.append((start, index))
            start, total = index, 0
        total += length
    groups.append((start, len(lengths)))
    return groups
