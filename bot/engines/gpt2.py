"""A lean GPT-2 forward pass over a preallocated, slot-based key/value cache.

The transformers model supplies the weights (shared, not copied) and nothing
else: no per-step cache objects, mask builders or module hooks, so a decode
step is about a hundred tensor operations whatever the batch. The cache is one
tensor, `[layers, keys or values, slots, heads, positions + 1, head_dim]`; row
`i` of a batch lives in slot `i` at its own absolute positions (no padding
inside a row), and the last column is scratch for the padding of a prefill.
Attention over a row reads only its own slot, masked to its length. A decode
step can carry prefills of rows that join the batch: one pass for all.

Only the engine's worker thread calls this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bot.engines import EngineUnavailable
from bot.engines.linears import (
    FUSED_ACTIVATIONS,
    Bf16Linear,
    Linear,
    amx_available,
    linear_of,
    runs_bf16,
)

_TANH_GELU = {"gelu_new", "gelu_pytorch_tanh"}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in _TANH_GELU:
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    from transformers.activations import ACT2FN

    fn: Callable[[torch.Tensor], torch.Tensor] = ACT2FN[name]
    return fn


def supports(model: Any) -> bool:
    return type(model).__name__ == "GPT2LMHeadModel"


#: token counts up to this run through oneDNN as they are; above, padded (`_padded`)
_EXACT_TOKENS = 64


def _padded(tokens: int) -> int:
    """`tokens` rounded up to one of about 8 sizes per doubling (at most 1/8
    more). oneDNN compiles a kernel for every new row count of a product
    (0.5-1 ms each here); a batch that admits rows as they come would meet a
    new count at nearly every step that carries a prefill."""
    if tokens <= _EXACT_TOKENS:
        return tokens
    quantum = 1 << (tokens.bit_length() - 4)
    return -(-tokens // quantum) * quantum


#: How a decode step's rows (one query each) attend:
#: SDPA's fused kernel (on CUDA, and in bf16 on a CPU with AMX: it reads the cache
#: at half the bytes); two products over each row's span (fp32 on the CPU: MKL
#: reads the strided slice of the cache in place); or two products over the
#: slots' whole width, masked (bf16 on a CPU without AMX: SDPA's bf16 kernel took
#: 4-7x as long as products there, and oneDNN's bf16 product copies an operand
#: that is not contiguous, as a slice of the slots' positions is: 46% of a 32-row
#: step went to those copies; the whole width is contiguous).
SDPA, SPAN, WHOLE_WIDTH = "sdpa", "span", "whole width"
DECODE_ATTENTION = (SDPA, SPAN, WHOLE_WIDTH)


def decode_attention(device: torch.device, *, half: bool) -> str:
    """The `DECODE_ATTENTION` a runner on `device` uses (`half`: bf16 on the CPU)."""
    if device.type == "cuda" or (half and amx_available()):
        return SDPA
    return WHOLE_WIDTH if half else SPAN


#: a prefill: `(first_slot, fresh token ids per row, start position per row)`
Prefill = tuple[int, Sequence[Sequence[int]], Sequence[int]]


@dataclass(frozen=True, slots=True)
class _Part:
    """Rows of one forward pass that attend alike: `rows` rows of `width` new
    tokens each (1 for a decode step) at tokens `offset`.. of the pass, in slots
    `first_slot`.., attending over the first `span` positions as `visible`
    (`[rows, 1, width, span]`) allows."""

    offset: int
    first_slot: int
    rows: int
    width: int
    span: int
    visible: torch.Tensor


class Gpt2Runner:
    """Prefill and decode for up to `slots` rows of at most `max_len` tokens each.

    Two precisions. With fp32 (or fp16 on CUDA) weights everything runs in the
    weights' dtype. With bf16 linear layers (`runs_bf16`) the residual stream
    and layer norms stay fp32 while every product, attention and the key/value
    cache are bf16 (AMX tiles; half the bytes each decode step reads), the
    GELU fused into the first MLP product; logits come back fp32."""

    def __init__(self, model: Any, *, slots: int, max_len: int, device: torch.device) -> None:
        if not supports(model):
            raise EngineUnavailable(
                f"the local engine serves GPT-2-family models (GPT2LMHeadModel), not "
                f"{type(model).__name__}: set text.model to one, or use text.engine = 'remote'"
            )
        config = model.config
        if getattr(config, "add_cross_attention", False):
            raise EngineUnavailable("GPT-2 models with cross-attention are not supported")
        self.model = model
        self.device = device
        self.layers = int(config.n_layer)
        self.heads = int(config.n_head)
        self.width = int(config.n_embd)
        self.head_dim = self.width // self.heads
        self.vocab = int(config.vocab_size)
        self.max_len = max_len
        self.slots = slots
        self.eps = float(config.layer_norm_epsilon)
        activation = str(config.activation_function)
        self.act = _activation(activation)
        base = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        inverse = bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))
        self.scales = [base / (index + 1 if inverse else 1) for index in range(self.layers)]
        transformer = model.transformer
        self.half = device.type == "cpu" and runs_bf16(model)
        self.blocks = [
            (
                (block.ln_1.weight.detach(), block.ln_1.bias.detach()),
                self._linear(block.attn.c_attn),
                self._linear(block.attn.c_proj),
                (block.ln_2.weight.detach(), block.ln_2.bias.detach()),
                self._linear(block.mlp.c_fc, activation),
                self._linear(block.mlp.c_proj),
            )
            for block in transformer.h
        ]
        self.wte = transformer.wte.weight.detach()
        self.wpe = transformer.wpe.weight.detach()
        self.ln_f = (transformer.ln_f.weight.detach(), transformer.ln_f.bias.detach())
        self.lm_head = model.lm_head.weight.detach()
        self._head: Linear = (
            Bf16Linear(self.lm_head, None)
            if self.half
            else lambda hidden: F.linear(hidden, self.lm_head)
        )
        #: what products, attention and the cache compute in
        self.dtype = torch.bfloat16 if self.half else self.wte.dtype
        shape = (self.layers, 2, slots, self.heads, max_len + 1, self.head_dim)
        #: each layer's keys and values side by side, so one copy stores a pass's both
        self.cache = torch.zeros(shape, dtype=self.dtype, device=device)
        self.keys, self.values = self.cache[:, 0], self.cache[:, 1]
        # views made once, not in every layer of every pass (each tensor call
        # from Python is a round trip through the GIL): a layer's cache as one
        # row per (k or v, slot, head, position), for its writes; its keys and
        # values as `[slots * heads, positions, head_dim]`, for decode steps
        self._writes = [self.cache[layer].view(-1, self.head_dim) for layer in range(self.layers)]
        per_head = (slots * self.heads, max_len + 1, self.head_dim)
        self._head_keys = [  # transposed, as the scores' product takes them
            self.keys[layer].view(per_head).transpose(1, 2) for layer in range(self.layers)
        ]
        self._head_values = [self.values[layer].view(per_head) for layer in range(self.layers)]
        # and the index arithmetic that is the same in every pass
        stride = max_len + 1
        self._columns = torch.arange(stride, device=device)
        self._rows = torch.arange(slots, device=device)
        #: a token's cells (see `step`) lie at these offsets from its first one
        self._cell_offsets = (
            torch.arange(2, device=device)[:, None] * (slots * self.heads * stride)
            + torch.arange(self.heads, device=device)[None, :] * stride
        )
        self._mask_values = (
            torch.zeros((), dtype=self.dtype, device=device),
            torch.full((), -math.inf, dtype=self.dtype, device=device),
        )
        #: how decode steps attend (`DECODE_ATTENTION`)
        self.decode_attention = decode_attention(device, half=self.half)

    def _linear(self, module: Any, activation: str | None = None) -> Linear:
        """The product of one of the blocks' linear layers, its activation
        (`activation`: the config's name) applied after it."""
        if self.half:
            fused = FUSED_ACTIVATIONS.get(activation) if activation else None
            product = Bf16Linear(module.weight16.t(), module.bias16, fused)
            if activation is None or fused is not None:
                return product
            act = _activation(activation)
            return lambda x: act(product(x))
        linear = linear_of(module)
        if activation is None:
            return linear
        act = _activation(activation)
        return lambda x: act(linear(x))

    @staticmethod
    def slot_bytes(model: Any, max_len: int) -> int:
        """Memory of one slot's keys and values."""
        config = model.config
        element = 2 if runs_bf16(model) else model.transformer.wte.weight.element_size()
        return int(2 * int(config.n_layer) * (max_len + 1) * int(config.n_embd) * element)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    # -- the cache ---------------------------------------------------------------

    def export(self, slot: int, length: int) -> torch.Tensor:
        """A copy of the slot's first `length` positions: `[layers, 2, heads, length, dim]`."""
        return self.cache[:, :, slot, :, :length].clone()

    def load(self, slot: int, layers: torch.Tensor) -> None:
        """Put exported keys/values (`[layers, 2, heads, n, dim]`) at positions 0..n-1."""
        self.cache[:, :, slot, :, : layers.shape[-2]] = layers

    def move(self, source: int, target: int, length: int) -> None:
        self.cache[:, :, target, :, :length] = self.cache[:, :, source, :, :length]

    # -- forward passes ----------------------------------------------------------

    def prefill(
        self, first_slot: int, fresh: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> torch.Tensor:
        """Encode row i's `fresh` tokens at positions `starts[i]`.. in slot
        `first_slot + i` (positions before `starts[i]` must hold its cached
        prefix). Returns each row's next-token logits, `[rows, vocab]`."""
        return self.step(None, None, [(first_slot, fresh, starts)])

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        prefills: Sequence[Prefill] = (),
    ) -> torch.Tensor:
        """One token for each of rows 0..n-1 at `positions`, and with them in the
        same pass the `prefills` (see `step`); their next-token logits in that
        order, `[rows + prefilled rows, vocab]`."""
        return self.step(tokens, positions, prefills)

    def step(
        self,
        tokens: torch.Tensor | None,
        positions: torch.Tensor | None,
        prefills: Sequence[Prefill],
    ) -> torch.Tensor:
        """One forward pass: a decode step of rows 0..n-1 (`tokens` at
        `positions`, or none) and prefills, each `(first_slot, fresh, starts)`
        as in `prefill`. The products and norms run once over every token of
        the pass; attention runs per part, each over its own rows and width. A
        row joining a running batch thus costs its tokens, not a pass of its
        own (about 1.7 ms for one token alone, 40% of a 32-row step)."""
        device, stride = self.device, self.max_len + 1
        parts: list[_Part] = []
        ids: list[torch.Tensor] = []
        firsts: list[torch.Tensor] = []  # per token: its first cell (see below)
        embed: list[torch.Tensor] = []  # per token: its position for the embedding
        picks: list[torch.Tensor] = []  # the tokens whose logits come back
        offset = 0
        if tokens is not None and positions is not None and tokens.shape[0]:
            rows = tokens.shape[0]
            whole = self.decode_attention == WHOLE_WIDTH
            span = stride if whole else int(positions.max().item()) + 1
            visible = torch.le(self._columns[:span], positions[:, None, None, None])
            parts.append(_Part(offset, 0, rows, 1, span, visible))
            ids.append(tokens)
            firsts.append(self._rows[:rows] * (self.heads * stride) + positions)
            embed.append(positions)
            picks.append(self._rows[:rows])
            offset += rows
        for first_slot, fresh, starts in prefills:
            part, tensors = self._prefill_part(offset, first_slot, fresh, starts)
            parts.append(part)
            for into, tensor in zip((ids, firsts, embed, picks), tensors, strict=True):
                into.append(tensor)
            offset += part.rows * part.width
        if not parts:
            raise ValueError("a forward pass needs a decode step or a prefill")
        padding = _padded(offset) - offset if self.half else 0
        if padding:  # rows that only pass through the products; their keys go to scratch
            ids.append(torch.zeros(padding, dtype=torch.long, device=device))
            embed.append(torch.zeros(padding, dtype=torch.long, device=device))
            firsts.append(torch.full((padding,), self.max_len, dtype=torch.long, device=device))
        join = (lambda parts: parts[0]) if len(ids) == 1 else torch.cat
        token_ids, token_positions = join(ids), join(embed)
        x = F.embedding(token_ids, self.wte) + F.embedding(token_positions, self.wpe)
        # a token's keys and values go to (k or v, slot s, head h, position p) of a
        # layer: one flat row ("cell") per (token, k or v, head) in its `[2 * slots
        # * heads * positions, dim]` view; its first is (k, s, 0, p)
        flat = (join(firsts)[:, None, None] + self._cell_offsets).view(-1)
        hidden = self._blocks(x, parts, flat)
        if len(picks) == 1 and picks[0].shape[0] == hidden.shape[0]:  # a decode step
            return self._logits(hidden)
        return self._logits(hidden[join(picks)])

    def _prefill_part(
        self, offset: int, first_slot: int, fresh: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> tuple[_Part, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One prefill's part of a pass, at tokens `offset`.. of it: the part and
        its tokens' ids, first cells (see `step`; pads go to the scratch column),
        embedding positions and the picks (each row's last token)."""
        device, stride = self.device, self.max_len + 1
        rows, width = len(fresh), max(len(row) for row in fresh)
        grid = torch.zeros((rows, width), dtype=torch.long)
        where = torch.full((rows, width), self.max_len, dtype=torch.long)  # pads: scratch
        for index, (row, start) in enumerate(zip(fresh, starts, strict=True)):
            grid[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            where[index, : len(row)] = torch.arange(start, start + len(row))
        grid, where = grid.to(device), where.to(device)
        span = int(max(start + len(row) for row, start in zip(fresh, starts, strict=True)))
        # query t of row i sees keys 0 .. starts[i] + t (its prefix and its own past)
        reach = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)
        visible = torch.arange(span, device=device)[None, None, :] <= reach[:, :, None]
        slots = torch.arange(first_slot, first_slot + rows, device=device)
        last = torch.tensor([len(row) - 1 for row in fresh], device=device)
        return _Part(offset, first_slot, rows, width, span, visible[:, None]), (
            grid.view(-1),
            (slots[:, None] * (self.heads * stride) + where).view(-1),
            where.clamp(max=self.wpe.shape[0] - 1).view(-1),
            offset + torch.arange(rows, device=device) * width + last,
        )

    def _blocks(self, x: torch.Tensor, parts: Sequence[_Part], flat: torch.Tensor) -> torch.Tensor:
        """The transformer blocks over `x` (`[tokens, d_model]`, fp32, the parts'
        tokens one after the other); `flat` is where each token's keys and values
        go."""
        tokens = x.shape[0]
        heads, dim, d_model = self.heads, self.head_dim, self.width
        masks = []
        for part in parts:
            # additive masks, built once per pass: given a bool one, SDPA converts it
            # in every layer; the decode matmuls add theirs inside the first product
            hidden = torch.where(part.visible, *self._mask_values)
            if part.width == 1 and self.decode_attention != SDPA:  # per (row, head): `baddbmm`'s
                hidden = hidden.expand(part.rows, heads, 1, part.span)
                hidden = hidden.reshape(part.rows * heads, 1, part.span)
            masks.append(hidden)
        dtype = self.dtype
        used = sum(part.rows * part.width for part in parts)
        padding = (
            torch.zeros((tokens - used, d_model), dtype=dtype, device=x.device)
            if tokens > used
            else None
        )  # what the padding rows (see `_padded`) attend to
        for layer, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj) in enumerate(self.blocks):
            h = F.layer_norm(x, (d_model,), ln_1[0], ln_1[1], self.eps).to(dtype)
            qkv = c_attn(h).view(tokens, 3, heads, dim)
            query = qkv[:, 0]
            self._writes[layer].index_copy_(0, flat, qkv[:, 1:].reshape(-1, dim))
            attended = [
                self._attend(layer, part, mask, query)
                for part, mask in zip(parts, masks, strict=True)
            ]
            if padding is not None:
                attended.append(padding)
            joined = attended[0] if len(attended) == 1 else torch.cat(attended)
            x = x + c_proj(joined)
            h = F.layer_norm(x, (d_model,), ln_2[0], ln_2[1], self.eps).to(dtype)
            x = x + mlp_proj(c_fc(h))
        return x

    def _attend(
        self, layer: int, part: _Part, mask: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        """One part's attention: `[rows * width, d_model]`."""
        rows, width = part.rows, part.width
        if width == 1 and self.decode_attention != SDPA:
            # one query per row: `[rows * heads]` products of one row each, the scale
            # and the mask applied by the first (15% less than a matmul, a scaling
            # and a masked fill)
            first, count = part.first_slot * self.heads, rows * self.heads
            k = self._head_keys[layer][first : first + count]
            v = self._head_values[layer][first : first + count]
            if part.span < v.shape[1]:
                k, v = k[..., : part.span], v[:, : part.span]
            if part.offset or query.shape[0] > rows:
                query = query[part.offset : part.offset + rows]
            q = query.reshape(count, 1, self.head_dim)
            scores = torch.baddbmm(mask, q, k, alpha=self.scales[layer])
            return torch.bmm(scores.softmax(-1), v).view(rows, self.width)
        q = query[part.offset : part.offset + rows * width].view(rows, width, self.heads, -1)
        q = q.transpose(1, 2)
        k = self.keys[layer][part.first_slot : part.first_slot + rows, :, : part.span]
        v = self.values[layer][part.first_slot : part.first_slot + rows, :, : part.span]
        # SDPA's fused kernel for prefills, and for decode steps where it wins
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scales[layer])
        return attended.transpose(1, 2).reshape(rows * width, self.width)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = F.layer_norm(hidden, (self.width,), self.ln_f[0], self.ln_f[1], self.eps)
        return self._head(hidden.to(self.dtype)).float()
