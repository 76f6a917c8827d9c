"""One loader for every model the bot uses: the text model, the image pipeline
and the training base. It picks the device, tells a local directory from a hub
id, loads a hub id from the local cache first and from the network only when
the hub answers, so an offline machine gets an error naming the key to change
instead of a minute of HTTP retries.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from bot.engines import EngineUnavailable
from bot.engines.settings import ModelSource

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    """Whether the Hugging Face hub answers at all, checked in a few seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def model_missing_message(key: str, name: str) -> str:
    """The text model's message (also used by `aigc-bot doctor`)."""
    if looks_local(name):
        return (
            f"{key} {name!r} does not exist: train the bundled model with `aigc-bot train` "
            f"or set {key} to a GPT-2-family model directory or hub id"
        )
    return (
        f"{key} {name!r} could not be loaded from the Hugging Face hub (no network?): "
        f"set {key} to a local model directory, e.g. models/chitchat-gpt2"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_local_or_hub(
    name: str,
    load: Callable[[str, bool], T],
    *,
    missing: str,
    invalid: str,
    error: type[EngineUnavailable] = EngineUnavailable,
) -> T:
    """`load(path_or_id, local_files_only)` for a local directory (once) or a hub
    id (from the cache, then from the network if the hub answers). `missing`
    is the error when there is nothing to load; `invalid` (+ the cause's first
    line) when a local directory does not load."""
    local = looks_local(name)
    if local and not Path(name).expanduser().is_dir():
        raise error(missing)
    target = str(Path(name).expanduser()) if local else name
    try:
        return load(target, True)
    except Exception as exc:
        log.debug("loading %s from local files failed", name, exc_info=True)
        if local:
            raise error(f"{invalid}: {_first_line(exc)}") from exc
    if not hub_reachable():
        raise error(missing)
    try:
        return load(target, False)
    except Exception as exc:
        log.debug("downloading %s failed", name, exc_info=True)
        raise error(missing) from exc


def load_tokenizer(name: str, local_files_only: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)


def load_pretrained_lm(
    name: str,
    *,
    missing: str,
    invalid: str,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) of a causal LM in a local directory or on the hub;
    the tokenizer always has an EOS token and a pad token."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    def load(target: str, local_only: bool) -> tuple[Any, Any]:
        tokenizer = load_tokenizer(target, local_only)
        extra = {} if dtype is None else {"dtype": dtype}
        model = AutoModelForCausalLM.from_pretrained(target, local_files_only=local_only, **extra)
        return model, tokenizer

    model, tokenizer = load_local_or_hub(name, load, missing=missing, invalid=invalid)
    if tokenizer.eos_token_id is None:
        raise EngineUnavailable(f"{invalid}: its tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_causal_lm(source: ModelSource) -> tuple[Any, Any, Any]:
    """(model, tokenizer, device) for serving: eval mode, fp16 on CUDA, fp32 on CPU."""
    import torch

    device = resolve_device(source.device, source.device_key)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_pretrained_lm(
        source.name,
        missing=model_missing_message(source.key, source.name),
        invalid=f"{source.key} {source.name!r} is not a loadable model",
        dtype=dtype,
    )
    model.eval()
    model.to(device)
    return model, tokenizer, device


def model_positions(model: Any) -> int:
    config = model.config
    positions: Any = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", 1024
    )
    return int(positions)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    """After an out-of-memory error: collect garbage and return cached GPU memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
