"""Batched autoregressive decoding for GPT-2-family models, with prefix reuse.

One call decodes a batch of independent dialogues together. Each row's
sequence in the key/value cache is laid out as

    [pad .. cached prefix][pad .. new prompt tokens][generated tokens ...]

with an attention mask over the pads and explicit position ids, so rows with
different cached and new lengths share one forward pass, and every real token
sees exactly the positions it would see alone. Finished rows leave the batch
at once, so a short answer does not pay for a long one, and requests that
arrive meanwhile join it between two steps (continuous batching): they are
prefilled on their own, then both caches are left-padded to one width and
stacked. Columns no row uses any more are trimmed from the left, so a batch
that lives on as rows come and go stays as wide as its longest row.

Runs only on the engine's worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from bot.engines.prefix_cache import LayerKV, PrefixCache


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    greedy: bool = False
    #: Partial texts are sent at most this often per request (0: every token).
    stream_interval_s: float = 0.0


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
    columns: list[int]  # positions in the batch cache that hold this row's tokens
    tokens: list[int]  # the tokens at those positions
    next_position: int
    steps: int = 0  # tokens sampled for this row so far
    last_text: str = ""
    last_emit: float = 0.0


@dataclass(slots=True)
class _Batch:
    """The rows being decoded together and their shared state."""

    rows: list[_Row]
    logits: torch.Tensor  # the next-token logits of every row
    past: DynamicCache
    mask: torch.Tensor  # (rows, cache columns)
    seen: torch.Tensor  # (rows, vocabulary): tokens already in each reply


#: `admit(room)`: up to `room` requests that are waiting, without blocking.
Admit = Callable[[int], Sequence[DecodeRequest]]


class BatchDecoder:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        *,
        eos_id: int,
        device: torch.device,
        prefix_cache: PrefixCache,
        settings: SamplingSettings,
        max_rows: int = 32,
        observe_rows: Callable[[int], None] | None = None,
        on_tokens: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.device = device
        self.cache = prefix_cache
        self.settings = settings
        self.max_rows = max_rows
        self.generated_tokens = 0
        self.steps = 0  # decode steps (forward passes after the prefill)
        self.step_rows = 0  # rows summed over those steps: step_rows / steps = mean batch
        self.joined = 0  # requests that joined a batch already running
        self.observe_rows = observe_rows
        self.on_tokens = on_tokens
        self._reported_tokens = 0

    # -- sampling --------------------------------------------------------------

    def _next_tokens(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        s = self.settings
        logits = logits.float()
        if s.repetition_penalty != 1.0:
            penalised = torch.where(
                logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty
            )
            logits = torch.where(seen, penalised, logits)
        if s.greedy:
            return logits.argmax(dim=-1)
        # Top-k first: top-p then works on k sorted candidates, not the whole
        # vocabulary (a full sort per row costs more than the forward pass).
        vocabulary = logits.shape[-1]
        k = s.top_k if 0 < s.top_k < vocabulary else vocabulary
        values, candidates = torch.topk(logits / s.temperature, k, dim=-1)
        probabilities = values.softmax(dim=-1)
        if s.top_p < 1.0:
            before = probabilities.cumsum(dim=-1) - probabilities
            probabilities = probabilities.masked_fill(before > s.top_p, 0.0)
        choice = torch.multinomial(probabilities, num_samples=1)
        return candidates.gather(-1, choice).squeeze(-1)

    # -- the batch -------------------------------------------------------------

    def _prefill(
        self, requests: Sequence[DecodeRequest]
    ) -> tuple[list[_Row], torch.Tensor, DynamicCache, torch.Tensor]:
        """Encode every row's uncached prompt tokens in one forward pass."""
        lookups = [self.cache.lookup(r.cache_key, r.prompt_ids) for r in requests]
        cached_width = max(reuse for reuse, _ in lookups)
        new_width = max(
            len(r.prompt_ids) - reuse for r, (reuse, _) in zip(requests, lookups, strict=True)
        )
        batch = len(requests)
        device = self.device

        input_ids = torch.full((batch, new_width), self.eos_id, dtype=torch.long)
        positions = torch.zeros((batch, new_width), dtype=torch.long)
        mask = torch.zeros((batch, cached_width + new_width), dtype=torch.long)
        rows: list[_Row] = []
        for index, (request, (reuse, _)) in enumerate(zip(requests, lookups, strict=True)):
            fresh = request.prompt_ids[reuse:]
            start = new_width - len(fresh)
            input_ids[index, start:] = torch.tensor(fresh, dtype=torch.long)
            positions[index, start:] = torch.arange(reuse, reuse + len(fresh))
            mask[index, cached_width - reuse : cached_width] = 1
            mask[index, cached_width + start :] = 1
            columns = list(range(cached_width - reuse, cached_width)) + list(
                range(cached_width + start, cached_width + new_width)
            )
            rows.append(_Row(request, columns, list(request.prompt_ids), len(request.prompt_ids)))

        past = DynamicCache()
        if cached_width:
            layer_count = len(next(layers for _, layers in lookups if layers is not None))
            for layer in range(layer_count):
                template = next(layers for _, layers in lookups if layers is not None)[layer][0]
                heads, _, head_dim = template.shape
                keys = torch.zeros(
                    (batch, heads, cached_width, head_dim), dtype=template.dtype, device=device
                )
                values = torch.zeros_like(keys)
                for index, (reuse, layers) in enumerate(lookups):
                    if layers is not None:
                        keys[index, :, cached_width - reuse :] = layers[layer][0]
                        values[index, :, cached_width - reuse :] = layers[layer][1]
                past.update(keys, values, layer)
        mask = mask.to(device)
        output = self.model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=positions.to(device),
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        return rows, output.logits[:, -1, :], output.past_key_values, mask

    def _save_prefix(self, row: _Row, past: DynamicCache, batch_index: int) -> None:
        if not row.request.cache_key or not self.cache.max_bytes:
            return
        columns = torch.tensor(row.columns, device=self.device)
        layers: list[LayerKV] = [
            (
                layer.keys[batch_index].index_select(-2, columns),
                layer.values[batch_index].index_select(-2, columns),
            )
            for layer in past.layers
        ]
        self.cache.store(row.request.cache_key, list(row.tokens), layers)

    def _emit(self, row: _Row, done: bool) -> None:
        if not done:
            now = time.monotonic()
            if now - row.last_emit < self.settings.stream_interval_s:
                return
            row.last_emit = now
        text = self.tokenizer.decode(row.request.generated, skip_special_tokens=True)  # type: ignore[attr-defined]
        if done or (text != row.last_text and not text.endswith("\ufffd")):
            row.last_text = text
            row.request.on_text(text, done)

    @torch.inference_mode()
    def run(self, requests: Sequence[DecodeRequest], admit: Admit | None = None) -> None:
        """Decode until every row has produced EOS, hit the token limit or been
        cancelled. With `admit`, requests that arrive meanwhile join the running
        batch between steps (continuous batching) instead of waiting for it to
        finish; `admit(room)` returns at most `room` of them without blocking."""
        live = [r for r in requests if not r.cancelled.is_set()]
        batch = self._start(live) if live else None
        while True:
            tokens = self._sample(batch) if batch is not None else []
            room = self.max_rows - (len(batch.rows) if batch is not None else 0)
            if admit is not None and room > 0:
                joining = [r for r in admit(room) if not r.cancelled.is_set()]
                if joining:
                    if batch is not None and batch.rows:
                        self.joined += len(joining)
                    newcomers = self._start(joining)
                    new_tokens = self._sample(newcomers)
                    if batch is None or not batch.rows:
                        batch, tokens = newcomers, new_tokens
                    elif newcomers.rows:
                        batch = self._merge(batch, newcomers)
                        tokens = tokens + new_tokens
            if batch is None or not batch.rows:
                return
            self._advance(batch, tokens)

    def _start(self, requests: Sequence[DecodeRequest]) -> _Batch:
        rows, logits, past, mask = self._prefill(requests)
        seen = torch.zeros((len(rows), logits.shape[-1]), dtype=torch.bool, device=self.device)
        return _Batch(rows, logits, past, mask, seen)

    def _sample(self, batch: _Batch) -> list[int]:
        """Pick every row's next token; rows that are done report their reply
        and leave the batch. Returns the tokens of the rows that stay."""
        tokens = self._next_tokens(batch.logits, batch.seen).tolist()
        keep: list[int] = []
        finishing: list[int] = []
        for index, (row, token) in enumerate(zip(batch.rows, tokens, strict=True)):
            request = row.request
            finished = token == self.eos_id or request.cancelled.is_set()
            if not finished:
                request.generated.append(token)
                self.generated_tokens += 1
            row.steps += 1
            if finished or row.steps >= self.settings.max_new_tokens:
                finishing.append(index)
            else:
                keep.append(index)
        # counted before any reply is handed over, so whoever sees a reply
        # also sees its tokens in the counter
        if self.on_tokens is not None:
            self.on_tokens(self.generated_tokens - self._reported_tokens)
            self._reported_tokens = self.generated_tokens
        for index in finishing:
            row = batch.rows[index]
            self._save_prefix(row, batch.past, index)
            if not row.request.cancelled.is_set():
                self._emit(row, done=True)
        for index in keep:
            self._emit(batch.rows[index], done=False)
        if len(keep) < len(batch.rows):
            self._select(batch, keep)
        return [tokens[i] for i in keep]

    def _select(self, batch: _Batch, keep: list[int]) -> None:
        """Keep only the rows `keep`, and drop cache columns no row uses any more."""
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            return
        selector = torch.tensor(keep, device=self.device)
        batch.past.batch_select_indices(selector)
        batch.mask = batch.mask.index_select(0, selector)
        batch.seen = batch.seen.index_select(0, selector)
        batch.logits = batch.logits.index_select(0, selector)
        first = min(row.columns[0] for row in batch.rows if row.columns)
        if first > 0:  # only padding left of here: trim it, or a long-lived batch grows forever
            for layer in batch.past.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            batch.mask = batch.mask[:, first:]
            for row in batch.rows:
                row.columns = [column - first for column in row.columns]

    def _merge(self, running: _Batch, newcomers: _Batch) -> _Batch:
        """One batch of both: the narrower cache is padded on the left (masked
        out), so every row keeps its own positions and its tokens' columns."""
        width = max(running.mask.shape[1], newcomers.mask.shape[1])
        past = DynamicCache()
        for index, (old, new) in enumerate(
            zip(running.past.layers, newcomers.past.layers, strict=True)
        ):
            keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            past.update(keys, values, index)
        for group in (running, newcomers):
            shift = width - group.mask.shape[1]
            if shift:
                for row in group.rows:
                    row.columns = [column + shift for column in row.columns]
        mask = torch.cat([_left_pad(running.mask, width), _left_pad(newcomers.mask, width)])
        return _Batch(
            running.rows + newcomers.rows,
            torch.cat([running.logits, newcomers.logits]),
            past,
            mask,
            torch.cat([running.seen, newcomers.seen]),
        )

    def _advance(self, batch: _Batch, tokens: list[int]) -> None:
        """Feed every row its new token: one forward pass for the whole batch."""
        self.steps += 1
        self.step_rows += len(batch.rows)
        if self.observe_rows is not None:
            self.observe_rows(len(batch.rows))
        next_ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(-1)
        batch.seen.scatter_(1, next_ids, True)
        column = batch.mask.shape[1]
        positions = torch.tensor([[row.next_position] for row in batch.rows], device=self.device)
        for row, token in zip(batch.rows, tokens, strict=True):
            row.columns.append(column)
            row.tokens.append(token)
            row.next_position += 1
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        output = self.model(
            input_ids=next_ids,
            attention_mask=batch.mask,
            position_ids=positions,
            past_key_values=batch.past,
            use_cache=True,
        )
        batch.past = output.past_key_values
        batch.logits = output.logits[:, -1, :]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` widened to `width` along its sequence axis (the last for a
    mask, the one before the last for keys and values) with zeros on the left."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[axis]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
