"""`/draw`: the service the conversation manager calls.

For each request: parse and clamp the options (bot.draw.options), check the
per-user hourly limit (counted in the store, so it survives restarts) and the
queue, record the draw, queue it on the image engine, and turn the engine's
events into replies: a queue-position / progress notice (one `ref` per draw,
so adapters can edit it in place), then the picture, or a short notice when
it can't be drawn. Every outcome is recorded; the PNG is written to
`<bot.data_dir>/draws/<public id>.png`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bot.config import Config
from bot.draw.options import DrawUsageError, parse_draw_args, resolve
from bot.engine_settings import draw_request, image_engine_settings
from bot.engines.image import (
    CANCELLED,
    DONE,
    FAILED,
    LOADING,
    MODEL,
    NSFW,
    OOM,
    POSITION,
    PROGRESS,
    SHUTDOWN,
    STARTED,
    DrawFailure,
    DrawJob,
    ImageEngine,
    QueueFull,
)
from bot.messages import Image, Incoming, Notice, NoticeKind, Reply
from bot.ordering import KeyedLocks
from storage import StorageUnavailable, Store

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
#: Draw outcomes that count against `[limits] draws_per_hour`: what was queued
#: or drawn, and pictures the safety checker blocked (not cancelled, failed, or
#: refused as busy: those cost the user nothing).
LIMITED_STATUSES = ("queued", "done", "blocked")
RESTARTING = "I'm restarting; please ask for that picture again in a minute."
BUSY = (
    "I'm busy drawing for others right now ({waiting} waiting). Please try again in a few minutes."
)
OUT_OF_MEMORY = "I ran out of GPU memory drawing that. Try a smaller --size or fewer --steps."
NSFW_FLAGGED = "The safety filter flagged that picture, so I won't send it. Try a different prompt."
FAILED_TEXT = "Something went wrong while drawing that. Please try again."
CANCELLED_TEXT = "Cancelled your picture."


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _wait_words(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return _plural(minutes, "minute")


class DrawService:
    """Owns the image engine; `handle` serves one `/draw`, `cancel` serves `/cancel`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        metrics: Any = None,
        engine: ImageEngine | None = None,
    ) -> None:
        self.config = config
        self.section = config.draw
        self.store = store
        self.metrics = metrics
        self.engine = engine or ImageEngine(image_engine_settings(config.draw), observer=metrics)
        self.images_dir = config.resolve_path(config.bot.data_dir) / "draws"
        self._admit = KeyedLocks()
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.engine.start(load_now=self.section.load == "start")

    async def close(self) -> None:
        await self.engine.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def cancel(self, platform: str, user_id: str) -> int:
        """Drop the user's queued draws and stop their running one; how many."""
        return len(self.engine.cancel((platform, user_id)))

    # -- one /draw -------------------------------------------------------------------

    async def handle(self, incoming: Incoming, args: str) -> AsyncIterator[Reply]:
        try:
            options = parse_draw_args(args)
        except DrawUsageError as exc:
            yield Notice(str(exc), NoticeKind.INFO)
            return
        if self.engine.closing:
            yield Notice(RESTARTING, NoticeKind.UNAVAILABLE, retry_after=30)
            return
        unavailable = self.engine.load_error()
        if unavailable is not None:
            self._count("draw_model")
            yield Notice(
                f"I can't draw right now: {unavailable}",
                NoticeKind.UNAVAILABLE,
                retry_after=max(1.0, self.section.retry_load_after_s),
            )
            return
        owner = (incoming.platform, incoming.user_id)
        async with self._admit.hold(owner):
            refusal = await self._refusal(incoming)
            if refusal is not None:
                yield refusal
                return
            settings = resolve(options, self.section)
            public_id = secrets.token_urlsafe(16)
            await self.store.draws.add(
                public_id=public_id,
                platform=incoming.platform,
                chat_id=incoming.chat_id,
                user_id=incoming.user_id,
                prompt=settings.prompt,
                options=settings.as_options(),
                seed=settings.seed,
            )
            job = DrawJob(
                public_id,
                owner,
                draw_request(settings),
                asyncio.get_running_loop(),
                caption=settings.caption(),
            )
            busy = self.engine.busy
            try:
                position = self.engine.submit(job)
            except QueueFull:
                await self._finish(public_id, "busy")
                yield self._busy_notice()
                return
        # aclosing: when our caller stops listening, `_follow` drops the job at once.
        async with contextlib.aclosing(self._follow(job, position, busy)) as replies:
            async for reply in replies:
                yield reply

    async def _refusal(self, incoming: Incoming) -> Notice | None:
        """A notice when this user may not draw now (daily or hourly limit, full queue)."""
        daily = self.config.limits.draws_per_day
        if daily > 0:
            now = datetime.now(UTC)
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
            today = await self.store.draws.times_since(
                incoming.platform, incoming.user_id, midnight, LIMITED_STATUSES
            )
            if len(today) >= daily:
                wait = max(1.0, (midnight + timedelta(days=1) - now).total_seconds())
                self._count("draw_rate_limited")
                return Notice(
                    f"You've had your {_plural(daily, 'picture')} for today. "
                    f"Try again in {_wait_words(wait)} (at midnight UTC).",
                    NoticeKind.RATE_LIMITED,
                    retry_after=wait,
                )
        limit = self.config.limits.draws_per_hour
        if limit > 0:
            since = datetime.now(UTC) - HOUR
            times = await self.store.draws.times_since(
                incoming.platform, incoming.user_id, since, LIMITED_STATUSES
            )
            if len(times) >= limit:
                oldest = min(_aware(moment) for moment in times)
                wait = max(1.0, (oldest + HOUR - datetime.now(UTC)).total_seconds())
                self._count("draw_rate_limited")
                return Notice(
                    f"You've had your {_plural(limit, 'picture')} for this hour. "
                    f"Try again in {_wait_words(wait)}.",
                    NoticeKind.RATE_LIMITED,
                    retry_after=wait,
                )
        if self.engine.waiting >= self.section.max_queue:
            return self._busy_notice()
        return None

    def _busy_notice(self) -> Notice:
        self._count("draw_busy")
        return Notice(BUSY.format(waiting=self.engine.waiting), NoticeKind.BUSY, retry_after=60)

    async def _follow(self, job: DrawJob, position: int, busy: bool) -> AsyncGenerator[Reply, None]:
        """The engine's events for one job, as replies."""
        ref = job.id
        settings = job.settings
        started = False
        last_progress = 0.0
        finished = False
        try:
            if busy:
                yield Notice(self._position_text(position), NoticeKind.QUEUED, ref=ref)
            while True:
                kind, payload = await job.events.get()
                if kind == POSITION and not started:
                    yield Notice(self._position_text(payload), NoticeKind.QUEUED, ref=ref)
                elif kind == LOADING:
                    yield Notice(
                        "Loading the drawing model (the first picture takes a while)…",
                        NoticeKind.PROGRESS,
                        ref=ref,
                    )
                elif kind == STARTED:
                    started = True
                    last_progress = time.monotonic()
                    yield Notice(
                        f"Drawing… 0% (0/{settings.steps} steps, seed {settings.seed})",
                        NoticeKind.PROGRESS,
                        ref=ref,
                    )
                elif kind == PROGRESS:
                    step, total = payload
                    now = time.monotonic()
                    if step >= total or now - last_progress < self.section.progress_every_s:
                        continue
                    last_progress = now
                    yield Notice(
                        f"Drawing… {step * 100 // total}% "
                        f"({step}/{total} steps, seed {settings.seed})",
                        NoticeKind.PROGRESS,
                        ref=ref,
                    )
                elif kind == DONE:
                    finished = True
                    if job.cancelled.is_set():
                        await self._finish(job.id, "cancelled")
                        yield Notice(CANCELLED_TEXT, NoticeKind.CANCELLED, ref=ref)
                        return
                    image = await self._deliver(job, payload)
                    if image is not None:
                        yield image
                    return
                elif kind == FAILED:
                    finished = True
                    yield await self._failed(job, payload)
                    return
        finally:
            if not finished:
                # The caller went away (disconnect, shutdown): drop the job.
                self.engine.cancel_job(job)
                self._in_background(self._finish(job.id, "cancelled"))

    @staticmethod
    def _position_text(position: int) -> str:
        if position <= 1:
            return "You're next in the drawing queue."
        ahead = _plural(position - 1, "picture")
        return f"You're #{position} in the drawing queue ({ahead} ahead of yours)."

    async def _deliver(self, job: DrawJob, png: bytes) -> Image | None:
        path = self.images_dir / f"{job.id}.png"
        await asyncio.to_thread(_write_file, path, png)
        try:
            kept = await self.store.draws.finish(job.id, status="done", image_path=str(path))
        except StorageUnavailable as exc:
            log.warning("could not record draw %s as done: %s", job.id, exc)
            kept = True
        if not kept:
            # The user ran /forget while it was drawing: keep nothing.
            await asyncio.to_thread(path.unlink, missing_ok=True)
            return None
        return Image(
            png=png,
            caption=job.caption,
            seed=job.settings.seed,
            path=str(path),
            draw_id=job.id,
        )

    async def _failed(self, job: DrawJob, failure: DrawFailure) -> Notice:
        ref = job.id
        if failure.kind == CANCELLED:
            await self._finish(job.id, "cancelled")
            return Notice(CANCELLED_TEXT, NoticeKind.CANCELLED, ref=ref)
        if failure.kind == SHUTDOWN:
            await self._finish(job.id, "cancelled", "shutdown")
            return Notice(RESTARTING, NoticeKind.UNAVAILABLE, retry_after=30, ref=ref)
        if failure.kind == MODEL:
            self._count("draw_model")
            await self._finish(job.id, "failed", failure.message)
            return Notice(
                f"I can't draw right now: {failure.message}",
                NoticeKind.UNAVAILABLE,
                retry_after=max(1.0, self.section.retry_load_after_s),
                ref=ref,
            )
        if failure.kind == OOM:
            self._count("draw_oom")
            await self._finish(job.id, "failed", "out of memory")
            return Notice(OUT_OF_MEMORY, NoticeKind.ERROR, ref=ref)
        if failure.kind == NSFW:
            self._count("draw_nsfw")
            await self._finish(job.id, "blocked", "flagged by the safety checker")
            return Notice(NSFW_FLAGGED, NoticeKind.INFO, ref=ref)
        self._count("draw_failed")
        await self._finish(job.id, "failed", failure.message or "error")
        return Notice(FAILED_TEXT, NoticeKind.ERROR, ref=ref)

    async def _finish(self, public_id: str, status: str, error: str | None = None) -> None:
        try:
            await self.store.draws.finish(public_id, status=status, error=error)
        except StorageUnavailable as exc:
            log.warning("could not record draw %s as %s: %s", public_id, status, exc)

    def _in_background(self, coroutine: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:
            coroutine.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _count(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(kind).inc()


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes, which are UTC here."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".part")
    temporary.write_bytes(data)
    temporary.replace(path)
