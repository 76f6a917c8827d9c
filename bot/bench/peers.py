"""The engines a user would pick instead of ours, each behind one call that turns
a batch of prompts into exactly N new tokens per prompt:

* transformers' static-batch `generate` (left padding, `min_new_tokens`);
* CTranslate2's `Generator.generate_batch` in float32 and in int8, on the same
  model converted offline with its converter (`min_length`).

`PeerServer` puts a dynamic batcher in front of a peer: a worker thread takes
whatever is waiting (after the same `batch_wait_ms` our engine waits), runs it
as one batch and hands every reply back to the event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bot.engines.settings import SamplingSettings


class Peer(Protocol):
    name: str

    def generate(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        """Exactly `new_tokens` new token ids for each prompt."""
        ...


@dataclass(frozen=True, slots=True)
class Skipped:
    """A peer that could not run here, and why."""

    name: str
    note: str


class TransformersPeer:
    """`model.generate` on all waiting prompts at once, left padded."""

    def __init__(
        self, model: Any, tokenizer: Any, device: Any, sampling: SamplingSettings, new_tokens: int
    ) -> None:
        self.name = "transformers generate"
        self.model = model
        self.device = device
        self.eos_id = int(tokenizer.eos_token_id)
        self.new_tokens = new_tokens
        options: dict[str, Any] = {
            "do_sample": not sampling.greedy,
            "repetition_penalty": sampling.repetition_penalty,
        }
        if not sampling.greedy:
            options.update(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
            )
        self.options = options

    def generate(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        import torch

        width = max(len(ids) for ids in prompts)
        ids = torch.full((len(prompts), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            output = self.model.generate(
                ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                pad_token_id=self.eos_id,
                eos_token_id=self.eos_id,
                **self.options,
            )
        rows: list[list[int]] = output[:, width:].tolist()
        return rows


class CTranslate2Peer:
    """`ctranslate2.Generator.generate_batch` on a converted copy of the model."""

    def __init__(
        self,
        model_dir: Path,
        tokenizer: Any,
        *,
        compute_type: str,
        device: str = "cpu",
        threads: int,
        sampling: SamplingSettings,
        new_tokens: int,
    ) -> None:
        import ctranslate2

        self.name = f"CTranslate2 {compute_type}"
        self.tokenizer = tokenizer
        self.generator = ctranslate2.Generator(
            str(model_dir), device=device, compute_type=compute_type, intra_threads=threads
        )
        self.new_tokens = new_tokens
        self.max_batch_size = 0  # 0: one batch; else CTranslate2 sorts by length and splits
        self.options: dict[str, Any] = {
            "max_length": new_tokens,
            "min_length": new_tokens,
            "repetition_penalty": sampling.repetition_penalty,
            "include_prompt_in_result": False,
            "sampling_topk": 1 if sampling.greedy else sampling.top_k,
            "sampling_topp": 1.0 if sampling.greedy else sampling.top_p,
            "sampling_temperature": 1.0 if sampling.greedy else sampling.temperature,
        }

    def generate(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        tokens = [self.tokenizer.convert_ids_to_tokens(ids) for ids in prompts]
        results = self.generator.generate_batch(
            tokens, max_batch_size=self.max_batch_size, **self.options
        )
        return [list(result.sequences_ids[0]) for result in results]

    def tune(self, prompts: Sequence[list[int]]) -> int:
        """Give the peer its best batching: CTranslate2 feeds the prompt tokens
        beyond the shortest prompt of a batch one step at a time, so prompts of
        unequal lengths can go faster in length-sorted sub-batches
        (`max_batch_size`). Tries a few on `prompts` and keeps the fastest."""
        best, best_time = 0, float("inf")
        for size in (0, 16, 8, 4):
            if size and size >= len(prompts):
                continue
            self.max_batch_size = size
            started = time.perf_counter()
            self.generate(prompts)
            elapsed = time.perf_counter() - started
            if elapsed < best_time:
                best, best_time = size, elapsed
        self.max_batch_size = best
        return best


def ctranslate2_missing() -> str | None:
    """Why the CTranslate2 peers cannot run, or None when they can."""
    if importlib.util.find_spec("ctranslate2") is None:
        return "ctranslate2 is not installed (pip install 'aigc-bot[ctranslate2]')"
    return None


def convert_for_ctranslate2(model_dir: str, output: Path, quantization: str) -> Path:
    """The model in CTranslate2's format, converted with its own converter."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(model_dir).convert(str(output), quantization=quantization, force=True)
    return output


def build_peers(
    model_dir: str,
    model: Any,
    tokenizer: Any,
    device: Any,
    workdir: Path,
    *,
    sampling: SamplingSettings,
    new_tokens: int,
    threads: int,
) -> tuple[list[Peer], list[Skipped]]:
    """Every peer that can run here, and a note for each that cannot."""
    peers: list[Peer] = [TransformersPeer(model, tokenizer, device, sampling, new_tokens)]
    skipped: list[Skipped] = []
    # the CTranslate2 compute types matching ours: fp32/int8 on the CPU, fp16 on CUDA
    types = ("float32", "int8") if device.type == "cpu" else ("float16", "int8_float16")
    names = tuple(f"CTranslate2 {compute}" for compute in types)
    missing = ctranslate2_missing()
    if missing is None and device.type == "cuda":
        import ctranslate2

        if ctranslate2.get_cuda_device_count() < 1:
            missing = "this ctranslate2 build sees no CUDA device"
    if missing is not None:
        return peers, [Skipped(name, missing) for name in names]
    for compute in types:
        converted = convert_for_ctranslate2(model_dir, workdir / f"ct2-{compute}", compute)
        peers.append(
            CTranslate2Peer(
                converted,
                tokenizer,
                compute_type=compute,
                device=device.type,
                threads=threads,
                sampling=sampling,
                new_tokens=new_tokens,
            )
        )
    return peers, skipped


# -- the dynamic batcher ---------------------------------------------------------


@dataclass(slots=True)
class _Job:
    prompt: list[int]
    future: asyncio.Future[list[int]]


class PeerServer:
    """A dynamic batcher in front of a peer: whatever waits goes in the next batch."""

    def __init__(self, peer: Peer, *, max_batch: int, batch_wait_ms: float) -> None:
        self.peer = peer
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []

    def __enter__(self) -> PeerServer:
        self._thread = threading.Thread(target=self._work, name="peer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    async def reply(self, prompt: list[int]) -> list[int]:
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._queue.put(_Job(prompt, future))
        return await future

    def _work(self) -> None:
        import torch

        torch.set_flush_denormal(True)  # as our engine's thread does
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                batch.append(job)
            self.batches.append(len(batch))
            try:
                results = self.peer.generate([job.prompt for job in batch])
            except Exception as exc:
                for job in batch:
                    _resolve(job.future, exc)
                continue
            for job, result in zip(batch, results, strict=True):
                _resolve(job.future, result)


def _resolve(future: asyncio.Future[list[int]], value: list[int] | BaseException) -> None:
    def settle() -> None:
        if future.done():
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    future.get_loop().call_soon_threadsafe(settle)
