"""The image engine: a diffusers text-to-image pipeline owned by one worker thread.

`AutoPipelineForText2Image.from_pretrained([draw] model)` loads a local
directory or a hub id (a cached hub model is used without touching the
network), on CUDA in fp16 when there is a GPU, else on the CPU in fp32. The
pipeline is loaded once, by the worker thread, on the first job or at start.

Jobs wait in a bounded FIFO. The worker takes one at a time and reports back
to the event loop with `call_soon_threadsafe`: the job's queue position as the
line moves, "loading", "started", each finished step, then the PNG or a
failure. A cancelled job is dropped from the line, or stopped at the next step
if it is running. Out-of-memory, a model that can't be loaded, an NSFW flag
and any other error end only that job; the worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from bot.engines import EngineObserver, EngineUnavailable
from bot.engines.loading import free_memory, is_out_of_memory

log = logging.getLogger(__name__)

# Event kinds a job receives (see `DrawJob.events`).
POSITION, LOADING, STARTED, PROGRESS, DONE, FAILED = (
    "position",
    "loading",
    "started",
    "progress",
    "done",
    "failed",
)
# Failure kinds (the payload of a FAILED event is a `DrawFailure`).
OOM, MODEL, NSFW, CANCELLED, SHUTDOWN, ERROR = (
    "oom",
    "model",
    "nsfw",
    "cancelled",
    "shutdown",
    "error",
)


class ImageEngineUnavailable(EngineUnavailable):
    """The pipeline can't be loaded; the message names `draw.model` (or the key to fix)."""


class QueueFull(Exception):
    """`[draw] max_queue` jobs are already waiting."""


class _Interrupted(Exception):
    """Raised from the step callback to stop a cancelled job."""


@dataclass(frozen=True, slots=True)
class ImageEngineSettings:
    model: str
    device: str = "auto"
    attention_slicing: bool = False
    cpu_offload: bool = False
    #: jobs that may wait; more are refused with `QueueFull`
    max_queue: int = 16
    #: after a failed load, jobs fail at once for this long before loading is tried again
    retry_load_after_s: float = 60.0


@dataclass(frozen=True, slots=True)
class DrawRequest:
    """One picture, its options already clamped to the limits."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 25
    width: int = 512
    height: int = 512
    guidance: float = 7.5


@dataclass(frozen=True, slots=True)
class DrawFailure:
    kind: str
    message: str = ""


@dataclass(eq=False)
class DrawJob:
    """One picture to draw. The worker puts `(kind, payload)` tuples on
    `events`, on the loop that created the job."""

    id: str
    owner: Hashable
    settings: DrawRequest
    loop: asyncio.AbstractEventLoop
    #: what the caller shows with the picture (the engine never reads it)
    caption: str = ""
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, payload: Any = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


def _load_pipeline(settings: ImageEngineSettings) -> tuple[Any, Any]:
    from bot.engines.pipeline import load_pipeline

    return load_pipeline(settings)


def encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- the engine --------------------------------------------------------------------


class ImageEngine:
    """The bounded job queue and the worker thread that owns the pipeline.

    `submit`, `cancel` and the properties may be called from the event loop;
    they hold a lock only for a few list operations."""

    def __init__(
        self,
        settings: ImageEngineSettings,
        *,
        observer: EngineObserver | None = None,
        loader: Callable[[ImageEngineSettings], tuple[Any, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.observer = observer
        self._loader = loader or _load_pipeline
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: deque[DrawJob] = deque()
        self._running: DrawJob | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._load_requested = False
        self.pipeline: Any = None
        self.device: Any = None
        self._load_error: str | None = None
        self._load_failed_at: float | None = None
        self.drawn = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self, *, load_now: bool = False) -> None:
        """Start the worker; with `load_now` it loads the pipeline right away
        (in the background: the bot keeps starting and chatting meanwhile)."""
        if self._thread is not None:
            return
        self._stopping = False
        self._load_requested = load_now
        self._thread = threading.Thread(target=self._worker, name="image-engine", daemon=True)
        self._thread.start()

    async def close(self, join_s: float = 10.0) -> None:
        """Stop: waiting jobs fail with SHUTDOWN, a running one stops at its next step."""
        with self._cond:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        for job in dropped:
            job.cancelled.set()
            job.post(FAILED, DrawFailure(SHUTDOWN))
        self._observe()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, join_s)
            if thread.is_alive():
                log.warning("the image worker is still busy (loading?); it ends with the process")
        self.pipeline = None

    @property
    def closing(self) -> bool:
        return self._stopping

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None or bool(self._waiting)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def load_error(self) -> str | None:
        """Why the pipeline could not be loaded, while `retry_load_after_s` has not passed."""
        if self._load_error is None or self._load_failed_at is None:
            return None
        if self._clock() - self._load_failed_at >= self.settings.retry_load_after_s:
            return None
        return self._load_error

    # -- jobs ------------------------------------------------------------------

    def submit(self, job: DrawJob) -> int:
        """Queue a job; returns its place in line (1 = next). `QueueFull` when
        `max_queue` jobs are already waiting."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the image engine is stopping")
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFull(f"{len(self._waiting)} drawings are waiting")
            self._waiting.append(job)
            position = len(self._waiting)
            self._cond.notify_all()
        self._observe()
        return position

    def cancel(self, owner: Hashable) -> list[DrawJob]:
        """Drop the owner's waiting jobs and stop their running one at its next step."""
        with self._cond:
            dropped = [job for job in self._waiting if job.owner == owner]
            running = self._running
        stopped = (
            []
            if running is None or running.owner != owner or running.cancelled.is_set()
            else [running]
        )
        for job in dropped:
            self.cancel_job(job)
        for job in stopped:
            job.cancelled.set()
        return dropped + stopped

    def cancel_job(self, job: DrawJob) -> bool:
        """Cancel one job; True if it was waiting or running and not already cancelled."""
        if job.cancelled.is_set():
            return False
        with self._cond:
            job.cancelled.set()
            try:
                self._waiting.remove(job)
            except ValueError:
                return job is self._running
            moved = list(self._waiting)
        job.post(FAILED, DrawFailure(CANCELLED))
        self._announce(moved)
        self._observe()
        return True

    def _announce(self, waiting: list[DrawJob]) -> None:
        for position, job in enumerate(waiting, start=1):
            job.post(POSITION, position)

    def _observe(self) -> None:
        if self.observer is not None:
            self.observer.observe_queue("image", len(self._waiting))

    # -- worker thread -----------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping and not self._load_requested:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft() if self._waiting else None
                self._running = job
                self._load_requested = False
                moved = list(self._waiting)
            self._announce(moved)
            self._observe()
            try:
                if job is None:
                    with contextlib.suppress(ImageEngineUnavailable):
                        self._ensure_pipeline(None)
                elif job.cancelled.is_set():
                    job.post(FAILED, DrawFailure(CANCELLED))
                else:
                    self._run(job)
            except BaseException:  # never let the worker die
                log.exception("the image worker failed")
                if job is not None:
                    job.post(FAILED, DrawFailure(ERROR))
            finally:
                with self._cond:
                    self._running = None

    def _ensure_pipeline(self, job: DrawJob | None) -> Any:
        if self.pipeline is not None:
            return self.pipeline
        error = self.load_error()
        if error is not None:
            raise ImageEngineUnavailable(error)
        if job is not None:
            job.post(LOADING)
        started = time.monotonic()
        try:
            self.pipeline, self.device = self._loader(self.settings)
        except ImageEngineUnavailable as exc:
            self._load_error, self._load_failed_at = str(exc), self._clock()
            log.warning("drawing is unavailable: %s", exc)
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._load_error = f"draw.model {self.settings.model!r} could not be loaded: {first}"
            self._load_failed_at = self._clock()
            log.warning("drawing is unavailable: %s", self._load_error, exc_info=True)
            raise ImageEngineUnavailable(self._load_error) from exc
        self._load_error = self._load_failed_at = None
        log.info(
            "image model %s loaded on %s in %.1f s",
            self.settings.model,
            self.device,
            time.monotonic() - started,
        )
        return self.pipeline

    def _run(self, job: DrawJob) -> None:
        try:
            pipeline = self._ensure_pipeline(job)
            if job.cancelled.is_set():
                raise _Interrupted
            job.post(STARTED, job.settings.steps)
            png, flagged = self._generate(pipeline, job)
        except _Interrupted:
            job.post(FAILED, DrawFailure(SHUTDOWN if self._stopping else CANCELLED))
            return
        except ImageEngineUnavailable as exc:
            job.post(FAILED, DrawFailure(MODEL, str(exc)))
            return
        except Exception as exc:
            if is_out_of_memory(exc):
                log.warning(
                    "out of memory drawing %dx%d, %d steps",
                    job.settings.width,
                    job.settings.height,
                    job.settings.steps,
                )
                free_memory()
                job.post(FAILED, DrawFailure(OOM))
            else:
                log.exception("drawing failed")
                job.post(FAILED, DrawFailure(ERROR, f"{type(exc).__name__}: {exc}".splitlines()[0]))
            return
        if flagged:
            job.post(FAILED, DrawFailure(NSFW))
            return
        self.drawn += 1
        job.post(DONE, png)

    def _generate(self, pipeline: Any, job: DrawJob) -> tuple[bytes, bool]:
        import torch

        settings = job.settings
        device = self.device if self.device is not None else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        total = settings.steps

        def on_step_end(
            _pipeline: Any, step: int, _timestep: Any, _tensors: dict[str, Any]
        ) -> dict[str, Any]:
            if job.cancelled.is_set() or self._stopping:
                raise _Interrupted
            job.post(PROGRESS, (step + 1, total))
            return {}

        accepted = inspect.signature(pipeline.__call__).parameters
        arguments: dict[str, Any] = {
            "prompt": settings.prompt,
            "num_inference_steps": settings.steps,
            "width": settings.width,
            "height": settings.height,
            "guidance_scale": settings.guidance,
            "generator": generator,
        }
        if settings.negative and "negative_prompt" in accepted:
            arguments["negative_prompt"] = settings.negative
        if "callback_on_step_end" in accepted:
            arguments["callback_on_step_end"] = on_step_end
        output = pipeline(**arguments)
        flags = getattr(output, "nsfw_content_detected", None)
        flagged = bool(flags and flags[0])
        if job.cancelled.is_set():
            raise _Interrupted
        return (b"" if flagged else encode_png(output.images[0])), flagged
