"""The linear layers of a GPT-2 block in the precisions the CPU serves them in:
`Int8Conv1D` and `Bf16Conv1D` replace transformers' `Conv1D` inside the model
(so the model itself runs quantized, e.g. for perplexity); `Bf16Linear` is
what `bot.engines.gpt2.Gpt2Runner` multiplies with in bf16 (oneDNN, weights
prepacked, activation fused).

Only the engine's worker thread calls this module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

Linear = Callable[[torch.Tensor], torch.Tensor]


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


def _cpu_has(probe_name: str) -> bool:
    probe = getattr(torch.cpu, probe_name, None)
    return bool(probe is not None and probe())


def amx_available() -> bool:
    """Whether this CPU has AMX tiles (where SDPA's bf16 kernel is fast too)."""
    return _cpu_has("_is_amx_tile_supported")


def bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: AMX, or AVX512-BF16's
    dot products (an AMD EPYC with AVX512-BF16: oneDNN's bf16 products 2-2.6x as
    fast as fp32 from 8 rows up)."""
    return amx_available() or _cpu_has("_is_avx512_bf16_supported")


def int8_is_fast() -> bool:
    """Whether this CPU has VNNI, the int8 dot products CTranslate2's int8 products
    are fast with. Without them (an AVX2-only AMD EPYC of the first generation),
    CTranslate2 int8 served 32 users 0.78x as fast as our fp32 engine."""
    return _cpu_has("_is_vnni_supported")


@functools.cache
def packed_linears_available() -> bool:
    """Whether oneDNN's prepacked bf16 products run here: PyTorch built with
    them, and a CPU they support (AVX-512 or AVX-NE-CONVERT: on a CPU with
    AVX2 alone, an AMD EPYC of the first generation, the reorder refuses to
    run). Without them a `Bf16Conv1D` multiplies through plain `addmm`."""
    ops = torch.ops.mkldnn
    if not torch._C._has_mkldnn or not all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    ):
        return False
    try:  # the one reliable probe: what the CPU feature checks inside oneDNN say
        ops._reorder_linear_weight(torch.zeros((32, 32), dtype=torch.bfloat16), 32)
    except RuntimeError:
        return False
    return True


#: activations oneDNN can fuse into a linear layer: (post-op, algorithm)
FUSED_ACTIVATIONS = {
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu": ("gelu", "none"),
    "relu": ("relu", ""),
}


class Bf16Linear:
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


def linear_of(module: Any) -> Linear:
    """`x @ W + b` for a 2-D `x`, sharing the module's tensors."""
    if isinstance(module, Int8Conv1D | Bf16Conv1D):
        return module.forward2d
    weight, bias = module.weight.detach(), module.bias.detach()
    return lambda x: torch.addmm(bias, x, weight)


def runs_bf16(model: Any) -> bool:
    """Whether a runner of `model` computes in bfloat16: every linear layer of
    its blocks is a `Bf16Conv1D` (`text.quantize = "bf16"`, or "auto" on a CPU
    with AMX) and oneDNN is there. Then its keys/values are bf16 too."""
    if not packed_linears_available():
        return False
    linears = [
        child
        for block in model.transformer.h
        for parent in (block.attn, block.mlp)
        for child in parent.children()
        if isinstance(child, torch.nn.Module) and hasattr(child, "weight")
    ]
    return bool(linears) and all(isinstance(child, Bf16Conv1D) for child in linears)
