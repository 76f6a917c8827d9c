"""A lean GPT-2 forward pass over a preallocated, slot-based key/value cache.

The transformers model supplies the weights (shared, not copied) and nothing
else: no per-step cache objects, mask builders or module hooks, so a decode
step is about a hundred tensor operations whatever the batch. The cache is one
tensor per layer for keys and one for values, `[slots, heads, positions + 1,
head_dim]`; row `i` of a batch lives in slot `i` at its own absolute positions
(no padding inside a row), and the last column is scratch for the padding of
a prefill. Attention over a row reads only its own slot, masked to its length.

Only the engine's worker thread calls this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bot.engines import EngineUnavailable

Linear = Callable[[torch.Tensor], torch.Tensor]
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


class Int8Conv1D(torch.nn.Module):
    """GPT-2's `Conv1D` with int8 weights (one scale per output channel) and
    int8 activations (one scale per row, found on the fly), multiplied by
    `torch._int_mm` (VNNI/AMX kernels on x86). A module, so the transformers
    model itself runs quantized too (for perplexity)."""

    weight8: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv: Any) -> None:
        super().__init__()
        weight = conv.weight.detach().float()
        scale = (weight.abs().amax(dim=0) / 127.0).clamp(min=1e-8)
        quantized = (weight / scale).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.register_buffer("weight8", quantized)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", conv.bias.detach().float().clone())

    def forward2d(self, x: torch.Tensor) -> torch.Tensor:
        x_scale = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8)
        x8 = (x / x_scale).round_().to(torch.int8)
        product = torch._int_mm(x8, self.weight8)
        return torch.addcmul(self.bias, product.float(), x_scale * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.forward2d(x.reshape(-1, shape[-1])).view(*shape[:-1], -1)


class Bf16Conv1D(torch.nn.Module):
    """GPT-2's `Conv1D` multiplied in bfloat16 when the input has many rows (a
    prefill: AMX tiles make that several times faster than fp32), in fp32 when
    it has few (a decode step, where bf16 only adds conversions). Inputs and
    outputs are fp32, so attention, the cache and the LM head stay fp32."""

    #: rows (tokens) from which the bf16 product pays for its conversions
    MIN_ROWS = 64

    weight: torch.Tensor
    bias: torch.Tensor
    weight16: torch.Tensor
    bias16: torch.Tensor

    def __init__(self, conv: Any) -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight.detach())
        self.register_buffer("bias", conv.bias.detach())
        self.register_buffer("weight16", conv.weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias16", conv.bias.detach().to(torch.bfloat16).clone())

    def forward2d(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < self.MIN_ROWS:
            return torch.addmm(self.bias, x, self.weight)
        return torch.addmm(self.bias16, x.to(torch.bfloat16), self.weight16).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.forward2d(x.reshape(-1, shape[-1])).view(*shape[:-1], -1)


def bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def _packed_linears_available() -> bool:
    return bool(torch._C._has_mkldnn) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


#: activations oneDNN can fuse into a linear layer: (post-op, algorithm)
_FUSED_ACTIVATIONS = {
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu": ("gelu", "none"),
    "relu": ("relu", ""),
}


class _Bf16Linear:
    """`x @ W + b` in bfloat16 for a bf16 `x`, through oneDNN with the weight
    reordered once into its blocked layout (a plain bf16 `addmm` reorders it on
    every call: 41 µs against 25 µs for 32 x 256 x 768 here), optionally with
    the activation fused in. bf16 in, bf16 out; oneDNN accumulates in fp32."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activation: tuple[str, str] | None = None,
    ) -> None:
        """`weight` is `[out, in]` (a `Conv1D`'s transposed, or an `nn.Linear`'s)."""
        weight = weight.detach().to(torch.bfloat16).contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.post, self.algorithm = activation or ("none", "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, self.post, [], self.algorithm
        )
        return out


def quantize_linears(model: Any, kind: str) -> int:
    """Swap every `Conv1D` of the transformer blocks for an `Int8Conv1D` ("int8")
    or a `Bf16Conv1D` ("bf16"), in place; returns how many were swapped. The
    embeddings and the LM head stay as they are."""
    from transformers.pytorch_utils import Conv1D

    wrapper = {"int8": Int8Conv1D, "bf16": Bf16Conv1D}[kind]
    swapped = 0
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    setattr(parent, name, wrapper(child))
                    swapped += 1
    return swapped


def quantize_int8(model: Any) -> int:
    return quantize_linears(model, "int8")


def _linear(module: Any) -> Linear:
    """`x @ W + b` for a 2-D `x`, sharing the module's tensors."""
    if isinstance(module, Int8Conv1D | Bf16Conv1D):
        return module.forward2d
    weight, bias = module.weight.detach(), module.bias.detach()
    return lambda x: torch.addmm(bias, x, weight)


def supports(model: Any) -> bool:
    return type(model).__name__ == "GPT2LMHeadModel"


def runs_bf16(model: Any) -> bool:
    """Whether a runner of `model` computes in bfloat16: every linear layer of
    its blocks is a `Bf16Conv1D` (`text.quantize = "bf16"`, or "auto" on a CPU
    with AMX) and oneDNN is there. Then its keys/values are bf16 too."""
    if not _packed_linears_available():
        return False
    linears = [
        child
        for block in model.transformer.h
        for parent in (block.attn, block.mlp)
        for child in parent.children()
        if isinstance(child, torch.nn.Module) and hasattr(child, "weight")
    ]
    return bool(linears) and all(isinstance(child, Bf16Conv1D) for child in linears)


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
            _Bf16Linear(self.lm_head, None)
            if self.half
            else lambda hidden: F.linear(hidden, self.lm_head)
        )
        #: what products, attention and the cache compute in
        self.dtype = torch.bfloat16 if self.half else self.wte.dtype
        shape = (self.layers, slots, self.heads, max_len + 1, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=device)
        # SDPA's fused kernel wins for prefills, on CUDA, and in bf16 (its bf16
        # kernel reads the cache at half the bytes); for one fp32 query per row
        # on the CPU two matmuls beat it
        self._sdpa_decode = device.type == "cuda" or self.half

    def _linear(self, module: Any, activation: str | None = None) -> Linear:
        """The product of one of the blocks' linear layers, its activation
        (`activation`: the config's name) applied after it."""
        if self.half:
            fused = _FUSED_ACTIVATIONS.get(activation) if activation else None
            product = _Bf16Linear(module.weight16.t(), module.bias16, fused)
            if activation is None or fused is not None:
                return product
            act = _activation(activation)
            return lambda x: act(product(x))
        linear = _linear(module)
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
        return torch.stack(
            (self.keys[:, slot, :, :length], self.values[:, slot, :, :length]), dim=1
        ).clone()

    def load(self, slot: int, layers: torch.Tensor) -> None:
        """Put exported keys/values (`[layers, 2, heads, n, dim]`) at positions 0..n-1."""
        length = layers.shape[-2]
        self.keys[:, slot, :, :length] = layers[:, 0]
        self.values[:, slot, :, :length] = layers[:, 1]

    def move(self, source: int, target: int, length: int) -> None:
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]

    # -- forward passes ----------------------------------------------------------

    def prefill(
        self, first_slot: int, fresh: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> torch.Tensor:
        """Encode row i's `fresh` tokens at positions `starts[i]`.. in slot
        `first_slot + i` (positions before `starts[i]` must hold its cached
        prefix). Returns each row's next-token logits, `[rows, vocab]`."""
        rows, device = len(fresh), self.device
        width = max(len(ids) for ids in fresh)
        ids = torch.zeros((rows, width), dtype=torch.long)
        positions = torch.full((rows, width), self.max_len, dtype=torch.long)  # pads: scratch
        for index, (tokens, start) in enumerate(zip(fresh, starts, strict=True)):
            ids[index, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            positions[index, : len(tokens)] = torch.arange(start, start + len(tokens))
        ids, positions = ids.to(device), positions.to(device)
        span = int(max(start + len(tokens) for tokens, start in zip(fresh, starts, strict=True)))
        # query t of row i sees keys 0 .. starts[i] + t (its prefix and its own past)
        reach = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)
        visible = torch.arange(span, device=device)[None, None, :] <= reach[:, :, None]
        slots = torch.arange(first_slot, first_slot + rows, device=device)
        embed_positions = positions.clamp(max=self.wpe.shape[0] - 1)
        x = (F.embedding(ids, self.wte) + F.embedding(embed_positions, self.wpe)).view(
            rows * width, self.width
        )

        def write(cache: torch.Tensor, new: torch.Tensor) -> None:
            cache[slots[:, None], :, positions] = new

        hidden = self._blocks(x, (rows, width), write, first_slot, span, visible[:, None])
        last = torch.tensor([len(tokens) - 1 for tokens in fresh], device=device)
        hidden = hidden.view(rows, width, self.width)[torch.arange(rows, device=device), last]
        return self._logits(hidden)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of rows 0..n-1 at `positions`; their next-token logits."""
        rows, device = tokens.shape[0], self.device
        span = int(positions.max().item()) + 1
        x = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)
        visible = torch.arange(span, device=device)[None, :] <= positions[:, None]
        # each layer's new keys go to (slot r, head h, position p): one flat index
        # per (row, head) in a `[slots * heads * positions, dim]` view of the layer
        base = torch.arange(rows * self.heads, device=device).view(rows, self.heads)
        flat = (base * (self.max_len + 1) + positions[:, None]).view(-1)

        def write(cache: torch.Tensor, new: torch.Tensor) -> None:
            cache.view(-1, self.head_dim).index_copy_(0, flat, new.reshape(-1, self.head_dim))

        hidden = self._blocks(x, (rows, 1), write, 0, span, visible[:, None, None])
        return self._logits(hidden)

    def _blocks(
        self,
        x: torch.Tensor,
        shape: tuple[int, int],
        write: Callable[[torch.Tensor, torch.Tensor], None],
        first_slot: int,
        span: int,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """The transformer blocks over `x` (`[rows * width, d_model]`, fp32);
        `write(layer_cache, new)` stores a layer's new keys or values (`[rows,
        width, heads, dim]`)."""
        rows, width = shape
        heads, dim, d_model = self.heads, self.head_dim, self.width
        slot_range = slice(first_slot, first_slot + rows)
        sdpa = self._sdpa_decode or width > 1
        hidden = visible.logical_not()
        if sdpa:  # an additive mask, built once: given a bool one, SDPA converts it per layer
            hidden = torch.zeros(visible.shape, dtype=self.dtype, device=x.device).masked_fill_(
                hidden, -math.inf
            )
        dtype = self.dtype
        for layer, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj) in enumerate(self.blocks):
            h = F.layer_norm(x, (d_model,), ln_1[0], ln_1[1], self.eps).to(dtype)
            qkv = c_attn(h).view(rows, width, 3, heads, dim)
            query, key, value = qkv.unbind(2)
            keys, values = self.keys[layer], self.values[layer]
            write(keys, key)
            write(values, value)
            k = keys[slot_range, :, :span]
            v = values[slot_range, :, :span]
            q = query.transpose(1, 2)
            if sdpa:
                attended = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=hidden, scale=self.scales[layer]
                )
            else:
                scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.scales[layer])
                attended = torch.matmul(scores.masked_fill_(hidden, -math.inf).softmax(-1), v)
            x = x + c_proj(attended.transpose(1, 2).reshape(rows * width, d_model))
            h = F.layer_norm(x, (d_model,), ln_2[0], ln_2[1], self.eps).to(dtype)
            x = x + mlp_proj(c_fc(h))
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = F.layer_norm(hidden, (self.width,), self.ln_f[0], self.ln_f[1], self.eps)
        return self._head(hidden.to(self.dtype)).float()
