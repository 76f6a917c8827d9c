"""Loading the diffusers text-to-image pipeline for the image engine.

`AutoPipelineForText2Image.from_pretrained([draw] model)` loads a local
directory or a hub id (a cached hub model is used without touching the
network) through the shared loader, on CUDA in fp16 when there is a GPU, else
on the CPU in fp32.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from bot.engines.image import ImageEngineSettings, ImageEngineUnavailable
from bot.engines.loading import load_local_or_hub, looks_local, resolve_device

log = logging.getLogger(__name__)


def model_missing_message(name: str) -> str:
    if looks_local(name):
        return (
            f"draw.model {name!r} does not exist: set draw.model to a diffusers model directory "
            "or a Hugging Face hub id "
            "(`python -m bot.testing.tiny_diffusion DIR` builds a tiny test one)"
        )
    return (
        f"draw.model {name!r} could not be loaded from the Hugging Face hub (no network?): "
        f"download it once with a network, or set draw.model to a local diffusers directory"
    )


def load_pipeline(settings: ImageEngineSettings) -> tuple[Any, Any]:
    """(pipeline, device) ready to call; `ImageEngineUnavailable` if not."""
    try:
        import torch
        from diffusers import AutoPipelineForText2Image
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError as exc:
        raise ImageEngineUnavailable(
            f"drawing needs torch, diffusers and transformers installed ({exc})"
        ) from exc

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    name = settings.model
    device = resolve_device(settings.device, "draw.device", ImageEngineUnavailable)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def load(target: str, local_only: bool) -> Any:
        with warnings.catch_warnings():
            # Newer diffusers call it `dtype`; `torch_dtype` works in every version.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return AutoPipelineForText2Image.from_pretrained(  # type: ignore[no-untyped-call]
                target, torch_dtype=dtype, local_files_only=local_only
            )

    pipeline = load_local_or_hub(
        name,
        load,
        missing=model_missing_message(name),
        invalid=f"draw.model {name!r} is not a loadable diffusers text-to-image model",
        error=ImageEngineUnavailable,
    )
    pipeline.set_progress_bar_config(disable=True)
    if settings.attention_slicing:
        pipeline.enable_attention_slicing()
    if settings.cpu_offload and device.type == "cuda":
        try:
            pipeline.enable_model_cpu_offload()
        except ImportError as exc:
            raise ImageEngineUnavailable(
                "draw.cpu_offload needs the accelerate package: pip install accelerate"
            ) from exc
    else:
        if settings.cpu_offload:
            log.warning("draw.cpu_offload is ignored on the CPU")
        pipeline.to(device)
    return pipeline, device
