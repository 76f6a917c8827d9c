"""The engines' own settings: small frozen dataclasses, built from the config by
`bot.engine_settings` (engines never see `bot.config` or the environment)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model comes from and where it runs. `key` and `device_key` name
    the settings in error messages (e.g. "text.model")."""

    name: str
    device: str = "auto"  # "auto", "cpu" or "cuda"
    key: str = "text.model"
    device_key: str = "text.device"


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    greedy: bool = False
    #: EOS is impossible before this many tokens (the bench sets it to max_new_tokens)
    min_new_tokens: int = 0
    #: Partial texts are sent at most this often per request (0: every token).
    stream_interval_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelEngineSettings:
    """What both engines that serve a model in this process take from `[text]`."""

    model: ModelSource
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    #: the precision, as `text.quantize` names it (each engine says what it means)
    quantize: str = "auto"
    max_history_tokens: int = 256
    #: CPU threads of the model's kernels (0: the library's default; for CTranslate2,
    #: one on a machine of two cores or fewer: `bot.engines.ct2.intra_threads`)
    threads: int = 0
    max_batch_size: int = 32
    batch_wait_ms: float = 10.0


@dataclass(frozen=True, slots=True)
class LocalEngineSettings(ModelEngineSettings):
    """`quantize`, for the linear layers on the CPU: "none" (fp32), "int8" (int8
    weights and dynamic int8 activations), "bf16", or "auto" (bf16 where the CPU
    multiplies it in hardware)."""

    #: all key/value memory: the running batch's cache and the per-conversation
    #: prefix cache together (0: no prefix cache; the batch still gets its own)
    kv_cache_mb: int = 256
    #: Python's switch interval, set for the whole process once the model is
    #: loaded (0: left as it is). The worker thread releases the GIL for every
    #: tensor operation and must win it back after each; while the event loop
    #: runs Python code that takes up to the interval (5 ms by default) per
    #: operation of ~20-400 µs. 0.2 ms: a 32-user closed-loop bench ran 12% faster.
    gil_switch_interval_s: float = 0.0002


@dataclass(frozen=True, slots=True)
class Ct2EngineSettings(ModelEngineSettings):
    """`quantize`: "auto" (int8 on the CPU, float16 on CUDA), "none" (float32 /
    float16), "int8" (int8 / int8_float16), "bf16"."""

    #: where converted models are kept
    cache_dir: Path = Path("data/ctranslate2")
    #: the most key/value memory a running sub-batch may hold (CTranslate2 keeps
    #: none between turns): fewer rows per sub-batch where the model needs it
    #: (0: no limit)
    kv_cache_mb: int = 256


@dataclass(frozen=True, slots=True)
class RemoteEngineSettings:
    url: str
    model: str
    #: a local directory or cached hub id whose tokenizer measures prompts ("" = estimate)
    tokenizer: str = ""
    api_key: str | None = field(default=None, repr=False)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_history_tokens: int = 256
    request_timeout_s: float = 60.0
    #: a request that fails to connect or gets a 5xx/429 is retried this often
    retries: int = 2
    #: first backoff; doubled after each retry
    retry_backoff_s: float = 0.5
