"""From config sections to engines: the only place that reads `[text]` and
`[draw]` for them (and the remote API key from the environment), so the
engines themselves stay pure (`bot.engines.settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import DrawSection, TextSection, read_secret
from bot.engines import EngineObserver, TextEngine
from bot.engines.settings import (
    Ct2EngineSettings,
    LocalEngineSettings,
    ModelSource,
    RemoteEngineSettings,
    SamplingSettings,
)

if TYPE_CHECKING:
    from bot.draw.options import DrawSettings
    from bot.engines.image import DrawRequest, ImageEngineSettings


def sampling_settings(section: TextSection) -> SamplingSettings:
    return SamplingSettings(
        max_new_tokens=section.max_new_tokens,
        min_new_tokens=min(section.min_new_tokens, section.max_new_tokens),
        temperature=section.temperature,
        top_k=section.top_k,
        top_p=section.top_p,
        repetition_penalty=section.repetition_penalty,
        greedy=section.greedy,
        stream_interval_s=section.stream_interval_ms / 1000,
    )


def _model_engine_fields(section: TextSection) -> dict[str, Any]:
    """`ModelEngineSettings`' fields from `[text]`."""
    return {
        "model": ModelSource(section.model, section.device),
        "sampling": sampling_settings(section),
        "quantize": section.quantize,
        "max_history_tokens": section.max_history_tokens,
        "threads": section.threads,
        "max_batch_size": section.max_batch_size,
        "batch_wait_ms": section.batch_wait_ms,
    }


def local_engine_settings(section: TextSection) -> LocalEngineSettings:
    return LocalEngineSettings(
        **_model_engine_fields(section),
        kv_cache_mb=section.kv_cache_mb,
        gil_switch_interval_s=section.gil_switch_interval_ms / 1000,
    )


def ct2_engine_settings(section: TextSection, data_dir: Path) -> Ct2EngineSettings:
    return Ct2EngineSettings(
        **_model_engine_fields(section),
        cache_dir=data_dir / "ctranslate2",
        kv_cache_mb=section.kv_cache_mb,
    )


def remote_engine_settings(section: TextSection) -> RemoteEngineSettings:
    key = read_secret(section.api_key_env)
    return RemoteEngineSettings(
        url=section.remote_url,
        model=section.remote_model or section.model,
        tokenizer=section.model,
        api_key=key.get_secret_value() if key is not None else None,
        sampling=sampling_settings(section),
        max_history_tokens=section.max_history_tokens,
        request_timeout_s=section.request_timeout_s,
        retries=section.remote_retries,
        retry_backoff_s=section.remote_backoff_s,
    )


#: what "auto" resolves to on a CPU with AMX or without VNNI (`bot.engines.hybrid`)
HYBRID = "local + ctranslate2"


def resolved_engine(section: TextSection) -> str:
    """`text.engine`, with "auto" decided for this machine (docs/PERFORMANCE.md):
    "ctranslate2" on a CPU with VNNI and without AMX when CTranslate2 is
    installed, where it answered one user 2.4x and 32 users 1.2x as fast as the
    local engine through the whole bot, at the same perplexity; `HYBRID` on a CPU
    with AMX, where CTranslate2 was 3-4x as fast for one user but the local
    engine ahead at 32 users, and on one without VNNI, where CTranslate2's int8
    products are slow (2x as fast for one user, the local engine in fp32
    1.2-1.3x ahead at 32); "local" on CUDA (fp16, continuous batching, prefix
    reuse) and where CTranslate2 is missing or cannot run the precision."""
    if section.engine != "auto":
        return section.engine
    from bot.engines import ct2

    if ct2.ctranslate2_missing() is not None:
        return "local"
    import ctranslate2
    import torch

    from bot.engines.linears import amx_available, int8_is_fast

    cuda = torch.cuda.is_available() or ctranslate2.get_cuda_device_count() > 0
    if section.device == "cuda" or (section.device == "auto" and cuda):
        return "local"
    # a precision CTranslate2 cannot run here (bf16 without AVX512-BF16 kernels)
    compute_type = ct2.COMPUTE_TYPES["cpu"][section.quantize]
    if ct2.compute_type_missing("cpu", compute_type):
        return "local"
    # CTranslate2 alone where its int8 products are fast (VNNI) and ours have no
    # AMX; both engines where either is missing: the local engine is ahead at 32
    # users there (bf16 on AMX; fp32 against int8 without VNNI)
    return "ctranslate2" if int8_is_fast() and not amx_available() else HYBRID


def build_text_engine(
    section: TextSection,
    observer: EngineObserver | None = None,
    *,
    data_dir: Path = Path("data"),
) -> TextEngine:
    """The engine `[text] engine` names, not started yet (`data_dir`: `[bot]
    data_dir`, where the CTranslate2 engine keeps its converted models)."""
    engine = resolved_engine(section)
    if engine == "remote":
        from bot.engines.remote import RemoteTextEngine

        return RemoteTextEngine(remote_engine_settings(section), observer)
    if engine == "ctranslate2":
        from bot.engines.ct2 import Ct2TextEngine

        return Ct2TextEngine(ct2_engine_settings(section, data_dir), observer)
    if engine == HYBRID:
        from bot.engines.hybrid import HybridTextEngine

        return HybridTextEngine(
            local_engine_settings(section), ct2_engine_settings(section, data_dir), observer
        )
    from bot.engines.text import LocalTextEngine

    return LocalTextEngine(local_engine_settings(section), observer)


def image_engine_settings(section: DrawSection) -> ImageEngineSettings:
    from bot.engines.image import ImageEngineSettings

    return ImageEngineSettings(
        model=section.model,
        device=section.device,
        attention_slicing=section.attention_slicing,
        cpu_offload=section.cpu_offload,
        max_queue=section.max_queue,
        retry_load_after_s=section.retry_load_after_s,
    )


def draw_request(settings: DrawSettings) -> DrawRequest:
    """What the image engine draws for a parsed and clamped `/draw`."""
    from bot.engines.image import DrawRequest

    return DrawRequest(
        prompt=settings.prompt,
        negative=settings.negative,
        seed=settings.seed,
        steps=settings.steps,
        width=settings.width,
        height=settings.height,
        guidance=settings.guidance,
    )
