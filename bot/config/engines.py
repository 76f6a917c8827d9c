"""`[text]` and `[draw]`: the engines' settings as the operator writes them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from bot.config.section import Section


class TextSection(Section):
    #: "auto" ("ctranslate2" on a CPU without AMX when CTranslate2 is installed,
    #: both on a CPU with AMX: CTranslate2 for small batches, ours for large ones,
    #: else "local": `bot.engine_settings.resolved_engine`), "local" (our engine),
    #: "ctranslate2" (the same model through CTranslate2), "remote" (an
    #: OpenAI-compatible server)
    engine: Literal["auto", "local", "ctranslate2", "remote"] = "auto"
    model: str = "models/chitchat-gpt2"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: the linear layers on the CPU: "auto" = bf16 where the CPU multiplies it in
    #: hardware (AMX or AVX512-BF16), else fp32 ("none"); "int8"; "bf16"
    quantize: Literal["auto", "none", "int8", "bf16"] = "auto"
    max_new_tokens: Annotated[int, Field(gt=0, le=1024)] = 48
    #: shortest reply in tokens: EOS is impossible before (the bench sets it to max_new_tokens)
    min_new_tokens: Annotated[int, Field(ge=0, le=1024)] = 0
    max_history_tokens: Annotated[int, Field(gt=0)] = 256
    temperature: Annotated[float, Field(gt=0)] = 0.8
    top_k: Annotated[int, Field(ge=0)] = 40
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.9
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.2
    greedy: bool = False
    stream_interval_ms: Annotated[float, Field(ge=0)] = 150.0
    threads: Annotated[int, Field(ge=0)] = 0
    max_batch_size: Annotated[int, Field(gt=0)] = 32
    batch_wait_ms: Annotated[float, Field(ge=0)] = 10.0
    kv_cache_mb: Annotated[int, Field(ge=0)] = 256
    #: engine = "local": Python's GIL switch interval once the model is loaded (0 = Python's 5 ms)
    gil_switch_interval_ms: Annotated[float, Field(ge=0, le=100)] = 0.2
    fallback_reply: str = "Sorry, I have nothing to say to that. Could you put it another way?"
    remote_url: str = "http://127.0.0.1:8000/v1"
    remote_model: str = ""
    api_key_env: str = "AIGC_BOT_TEXT_API_KEY"
    request_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    #: engine = "remote": retries of a request the server refused (429/5xx) or never answered
    remote_retries: Annotated[int, Field(ge=0, le=10)] = 2
    #: engine = "remote": wait before the first retry, doubled for each next one
    remote_backoff_s: Annotated[float, Field(ge=0)] = 0.5
    #: A reply that takes longer than this is given up with a notice (0 = no limit).
    timeout_s: Annotated[float, Field(ge=0)] = 120.0

    @field_validator("fallback_reply")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class DrawSection(Section):
    enabled: bool = True
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    load: Literal["lazy", "start"] = "lazy"
    attention_slicing: bool = False
    cpu_offload: bool = False
    default_steps: Annotated[int, Field(gt=0)] = 25
    max_steps: Annotated[int, Field(gt=0)] = 50
    default_width: Annotated[int, Field(gt=0)] = 512
    default_height: Annotated[int, Field(gt=0)] = 512
    max_width: Annotated[int, Field(gt=0)] = 768
    max_height: Annotated[int, Field(gt=0)] = 768
    guidance: Annotated[float, Field(ge=0, le=30)] = 7.5
    max_queue: Annotated[int, Field(gt=0)] = 16
    progress_every_s: Annotated[float, Field(ge=0)] = 2.0
    retry_load_after_s: Annotated[float, Field(ge=0)] = 60.0

    @field_validator("default_width", "default_height", "max_width", "max_height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8 or value < 64:
            raise ValueError("must be a multiple of 8, at least 64")
        return value

    @field_validator("max_steps", "max_width", "max_height")
    @classmethod
    def _not_below_default(cls, value: int, info: ValidationInfo) -> int:
        default = info.data.get(str(info.field_name).replace("max_", "default_"))
        if default is not None and value < default:
            name = str(info.field_name).replace("max_", "default_")
            raise ValueError(f"must be >= draw.{name} ({default})")
        return value
