"""Batched autoregressive decoding for GPT-2-family models, with prefix reuse.

One call decodes a batch of independent dialogues together. Each row's
sequence in the key/value cache is laid out as

    [pad .. cached prefix][pad .. new prompt tokens][generated tokens ...]

with an attention mask over the pads and explicit position ids, so rows with
different cached and new lengths share one forward pass, and every real token
sees exactly the positions it would see alone. Finished rows leave the batch
at once, so a short answer does not pay for a long one.

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
    last_text: str = ""
    last_emit: float = 0.0


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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.device = device
        self.cache = prefix_cache
        self.settings = settings
        self.generated_tokens = 0

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
    def run(self, requests: Sequence[DecodeRequest]) -> None:
        """Decode until every row has produced EOS, hit the token limit or been cancelled."""
        live = [r for r in requests if not r.cancelled.is_set()]
        if not live:
            return
        rows, logits, past, mask = self._prefill(live)
        vocab = logits.shape[-1]
        seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=self.device)
        for step in range(self.settings.max_new_tokens):
            tokens = self._next_tokens(logits, seen).tolist()
            keep: list[int] = []
            for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
                request = row.request
                finished = token == self.eos_id or request.cancelled.is_set()
                if not finished:
                    request.generated.append(token)
                    self.generated_tokens += 1
                last_step = step == self.settings.max_new_tokens - 1
                if finished or last_step:
                    self._save_prefix(row, past, index)
                    if not request.cancelled.is_set():
                        self._emit(row, done=True)
                    continue
                self._emit(row, done=False)
                keep.append(index)
            if not keep:
                return
            if len(keep) < len(rows):
                selector = torch.tensor(keep, device=self.device)
                past.batch_select_indices(selector)
                mask = mask.index_select(0, selector)
                seen = seen.index_select(0, selector)
                rows = [rows[i] for i in keep]
                tokens = [tokens[i] for i in keep]
            next_ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(-1)
            seen.scatter_(1, next_ids, True)
            column = mask.shape[1]
            positions = torch.tensor([[row.next_position] for row in rows], device=self.device)
            for row, token in zip(rows, tokens, strict=True):
                row.columns.append(column)
                row.tokens.append(token)
                row.next_position += 1
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            output = self.model(
                input_ids=next_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
            )
            past = output.past_key_values
            logits = output.logits[:, -1, :]
