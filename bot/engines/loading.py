"""Loading a causal LM from a local directory or a hub id, on the right device.

A hub id needs the network; when it can't be reached the error names the key
to change instead of showing a stack of HTTP retries.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bot.config import TextSection
from bot.engines import EngineUnavailable

log = logging.getLogger(__name__)


def resolve_device(
    choice: str, key: str = "text.device", error: type[EngineUnavailable] = EngineUnavailable
) -> Any:
    """CUDA for "cuda", or for "auto" when a GPU is there; else the CPU."""
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise error(f"{key} is 'cuda' but no CUDA GPU is available")
        return torch.device("cuda")
    return torch.device("cpu")


def looks_local(name: str) -> bool:
    """A path that exists, or whose first component is a local directory
    (`models/x` when `models/` exists), is never sent to the hub."""
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute() or name.startswith((".", "~")):
        return True
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all, checked in a few seconds
    instead of the minute of retries a download attempt takes offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def model_missing_message(key: str, name: str) -> str:
    if looks_local(name):
        return (
            f"{key} {name!r} does not exist: train the bundled model with `aigc-bot train` "
            f"or set {key} to a GPT-2-family model directory or hub id"
        )
    return (
        f"{key} {name!r} could not be loaded from the Hugging Face hub (no network?): "
        f"set {key} to a local model directory, e.g. models/chitchat-gpt2"
    )


def convert_conv1d_to_linear(model: Any) -> None:
    """GPT-2 uses `Conv1D` (a transposed Linear); dynamic quantization only
    knows `nn.Linear`, so swap each one for an equivalent Linear."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                in_features, out_features = child.weight.shape
                linear = torch.nn.Linear(in_features, out_features)
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data.clone()
                setattr(module, name, linear)


def quantize_int8(model: Any) -> Any:
    import torch

    convert_conv1d_to_linear(model)
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_causal_lm(config: TextSection, key: str = "text.model") -> tuple[Any, Any, Any]:
    """(model, tokenizer, device), model in eval mode; fp16 on CUDA, fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    name = config.model
    local = looks_local(name)
    if local and not Path(name).expanduser().is_dir():
        raise EngineUnavailable(model_missing_message(key, name))
    device = resolve_device(config.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        try:
            # A hub id already in the local Hugging Face cache loads without the network.
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        except OSError:
            if local:
                raise
            if not hub_reachable():
                raise EngineUnavailable(model_missing_message(key, name)) from None
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as exc:
        log.debug("loading %s failed", name, exc_info=True)
        if local:
            raise EngineUnavailable(
                f"{key} {name!r} is not a loadable model: {exc}".splitlines()[0]
            ) from exc
        raise EngineUnavailable(model_missing_message(key, name)) from exc
    if tokenizer.eos_token_id is None:
        raise EngineUnavailable(f"{key} {name!r}: its tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if config.quantize == "int8":
        if device.type != "cpu":
            raise EngineUnavailable(
                "text.quantize = 'int8' works on the CPU only; set text.device = 'cpu'"
            )
        model = quantize_int8(model)
    model.to(device)
    return model, tokenizer, device
