"""`/draw` end to end: the real diffusers engine on a tiny Stable Diffusion
pipeline built here (no download), the queue, limits, errors, records, and the
PNG reaching the web API, the console, export and /forget.

Queue, cancel and error tests use a pipeline double whose steps wait on a gate,
so positions can be observed exactly; everything about pictures (determinism,
files, delivery) runs the tiny pipeline through the real loader.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.eventually import eventually

from bot.config import Config, load_config
from bot.draw.service import DrawService
from bot.engine_settings import image_engine_settings
from bot.engines.image import ImageEngine
from bot.engines.pipeline import load_pipeline
from bot.messages import Image, Incoming, Notice, NoticeKind, Reply, Text
from bot.testing.tiny_diffusion import TINY_DRAW_SETTINGS, build_tiny_diffusion
from storage import Store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEP_TIMEOUT = 120.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """Tiny tensors gain nothing from more intra-op threads; on a busy 2-core
    machine the extra OpenMP thread's spin-waits make a 0.05 s draw take
    seconds. Restored for the modules after this one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline, saved with save_pretrained, built once."""
    return build_tiny_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd")


def draw_config(
    tmp_path: Path, model: str | Path, *, limits: dict[str, Any] | None = None, **draw: Any
) -> Config:
    return Config.model_validate(
        {
            "bot": {"data_dir": str(tmp_path / "data")},
            "storage": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"},
            "draw": {"model": str(model), **TINY_DRAW_SETTINGS, "progress_every_s": 0, **draw},
            "limits": limits or {},
        }
    )


def incoming(user: str = "ann", text: str = "/draw") -> Incoming:
    return Incoming(
        platform="test", chat_id=f"chat-{user}", user_id=user, user_name=user, text=text
    )


class Replies:
    """Step through one `/draw`'s replies with a timeout on each."""

    def __init__(self, replies: AsyncIterator[Reply]) -> None:
        self.replies = replies
        self.seen: list[Reply] = []

    async def next(self) -> Reply:
        reply = await asyncio.wait_for(anext(self.replies), STEP_TIMEOUT)
        self.seen.append(reply)
        return reply

    async def until(self, kind: type) -> Any:
        while True:
            reply = await self.next()
            if isinstance(reply, kind):
                return reply

    async def rest(self) -> list[Reply]:
        async def drain() -> None:
            async for reply in self.replies:
                self.seen.append(reply)

        await asyncio.wait_for(drain(), STEP_TIMEOUT)
        return self.seen

    async def last(self) -> Reply:
        return (await self.rest())[-1]


async def draw_all(service: DrawService, user: str, args: str) -> list[Reply]:
    return await Replies(service.handle(incoming(user, f"/draw {args}"), args)).rest()


class FakePipeline:
    """Stands in for a diffusers pipeline: each step waits for `gate`, then
    calls the step callback; `fail` raises on the next calls; `nsfw` flags."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.fail: list[BaseException] = []
        self.nsfw = False
        self.calls: list[str] = []

    def __call__(
        self,
        prompt: str,
        num_inference_steps: int,
        width: int,
        height: int,
        guidance_scale: float,
        generator: Any,
        negative_prompt: str | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
    ) -> Any:
        from PIL import Image as PILImage

        self.calls.append(prompt)
        if self.fail:
            raise self.fail.pop(0)
        for step in range(num_inference_steps):
            assert self.gate.wait(STEP_TIMEOUT)
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, 1000 - step, {})
        picture = PILImage.new("RGB", (width, height), (generator.initial_seed() % 256, 80, 160))
        return SimpleNamespace(images=[picture], nsfw_content_detected=[self.nsfw])


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """make(pipeline=None, **draw) -> a started DrawService on one database;
    with a pipeline double it is "loaded" instantly, else the tiny model is."""
    made: list[tuple[DrawService, Store]] = []

    async def make(
        pipeline: Any = None,
        *,
        model: str | Path = "fake",
        limits: dict[str, Any] | None = None,
        **draw: Any,
    ) -> DrawService:
        import torch

        config = draw_config(tmp_path, model, limits=limits, **draw)
        store = await Store.open(config.storage.url)
        loader = (
            load_pipeline if pipeline is None else (lambda section: (pipeline, torch.device("cpu")))
        )
        service = DrawService(
            config, store, engine=ImageEngine(image_engine_settings(config.draw), loader=loader)
        )
        await service.start()
        made.append((service, store))
        return service

    yield make
    for service, store in made:
        await service.close()
        await store.close()


async def draw_row(service: DrawService, user: str) -> list[dict[str, Any]]:
    return await service.store.draws.export("test", user)


# -- pictures from the real engine ------------------------------------------------------


async def test_same_seed_same_png_and_a_different_seed_a_different_one(
    services: Callable[..., Any], tiny_sd_dir: Path
) -> None:
    from PIL import Image as PILImage

    service = await services(model=tiny_sd_dir)
    first = await Replies(service.handle(incoming(), '"a red cat" --seed 5')).until(Image)
    again = await Replies(service.handle(incoming(), '"a red cat" --seed 5')).until(Image)
    other = await Replies(service.handle(incoming(), '"a red cat" --seed 6')).until(Image)
    assert first.png.startswith(PNG_SIGNATURE)
    assert PILImage.open(io.BytesIO(first.png)).size == (64, 64)
    assert first.png == again.png and first.png != other.png
    assert first.draw_id != again.draw_id
    assert file_bytes(first.path) == first.png
    assert Path(first.path).parent == tmp_data(service) / "draws"
    assert "seed 5" in first.caption and "2 steps" in first.caption and "64x64" in first.caption
    assert first.seed == 5

    # Without --seed the caption names the seed that re-makes the picture.
    random = await Replies(service.handle(incoming(), "a red cat")).until(Image)
    remade = await Replies(service.handle(incoming(), f"a red cat --seed {random.seed}")).until(
        Image
    )
    assert f"seed {random.seed}" in random.caption and remade.png == random.png


def file_bytes(path: str | Path | None) -> bytes | None:
    """The file's bytes, or None when there is no such file."""
    if path is None or not Path(path).is_file():
        return None
    return Path(path).read_bytes()


def tmp_data(service: DrawService) -> Path:
    return service.config.bot.data_dir


async def test_loaded_at_start_and_clamped_options_are_what_is_drawn_and_said(
    services: Callable[..., Any], tiny_sd_dir: Path
) -> None:
    from PIL import Image as PILImage

    service = await services(model=tiny_sd_dir, load="start")
    # draw.load = "start": loaded before any /draw
    await eventually(lambda: service.engine.loaded, within=STEP_TIMEOUT)
    replies = Replies(
        service.handle(incoming(), 'dunes --size 1000x500 --steps 99 --negative "people" --seed 1')
    )
    image = await replies.until(Image)
    assert not any(isinstance(r, Notice) and "Loading" in r.text for r in replies.seen)
    assert PILImage.open(io.BytesIO(image.png)).size == (128, 64)
    assert (
        "4 steps" in image.caption
        and "128x64" in image.caption
        and "negative: people" in image.caption
    )
    assert "steps lowered from 99 to the maximum, 4" in image.caption
    assert "size 1000x500 changed to 128x64 to fit the 128x128 limit" in image.caption


async def test_out_of_memory_in_the_real_pipeline_is_a_notice_and_the_next_draw_works(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    import torch

    config = draw_config(tmp_path, tiny_sd_dir)
    calls = {"n": 0}

    def loader(section: Any) -> tuple[Any, Any]:
        pipeline, device = load_pipeline(section)
        forward = pipeline.unet.forward

        def failing_once(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(*args, **kwargs)

        pipeline.unet.forward = failing_once
        return pipeline, device

    store = await Store.open(config.storage.url)
    service = DrawService(
        config, store, engine=ImageEngine(image_engine_settings(config.draw), loader=loader)
    )
    await service.start()
    try:
        notice = await Replies(service.handle(incoming(), "a cat --seed 1")).last()
        assert isinstance(notice, Notice) and notice.kind is NoticeKind.ERROR
        assert "out of GPU memory" in notice.text and "--size" in notice.text
        image = await Replies(service.handle(incoming(), "a cat --seed 1")).last()
        assert isinstance(image, Image) and image.png.startswith(PNG_SIGNATURE)
        rows = await store.draws.export("test", "ann")
        assert [(row["status"], row["error"]) for row in rows] == [
            ("failed", "out of memory"),
            ("done", None),
        ]
    finally:
        await service.close()
        await store.close()


# -- the queue ---------------------------------------------------------------------------


async def test_progress_notices_share_the_draws_ref_and_are_throttled(
    services: Callable[..., Any],
) -> None:
    service = await services(FakePipeline(), default_steps=4)
    replies = await draw_all(service, "ann", "a cat --seed 3")
    image = replies[-1]
    assert isinstance(image, Image)
    notices = [r for r in replies if isinstance(r, Notice)]
    assert [n.text for n in notices] == [
        "Loading the drawing model (the first picture takes a while)…",
        "Drawing… 0% (0/4 steps, seed 3)",
        "Drawing… 25% (1/4 steps, seed 3)",
        "Drawing… 50% (2/4 steps, seed 3)",
        "Drawing… 75% (3/4 steps, seed 3)",
    ]
    assert {n.ref for n in notices} == {image.draw_id}

    slow = await services(FakePipeline(), default_steps=4, progress_every_s=3600)
    replies = await draw_all(slow, "ann", "a cat --seed 3")
    assert [r.text for r in replies if isinstance(r, Notice) and r.kind is NoticeKind.PROGRESS][
        -1
    ] == ("Drawing… 0% (0/4 steps, seed 3)")


async def test_queue_positions_move_and_a_full_queue_says_busy(
    services: Callable[..., Any],
) -> None:
    pipeline = FakePipeline()
    pipeline.gate.clear()
    service = await services(pipeline, max_queue=2)
    first = Replies(service.handle(incoming("ann"), "one"))
    assert (await first.next()).kind is NoticeKind.PROGRESS  # loading
    assert (await first.next()).text.startswith("Drawing… 0%")

    second = Replies(service.handle(incoming("bob"), "two"))
    queued = await second.next()
    assert (queued.kind, queued.text) == (NoticeKind.QUEUED, "You're next in the drawing queue.")
    third = Replies(service.handle(incoming("cat"), "three"))
    queued3 = await third.next()
    assert queued3.kind is NoticeKind.QUEUED
    assert queued3.text == "You're #2 in the drawing queue (1 picture ahead of yours)."

    busy = await Replies(service.handle(incoming("dan"), "four")).rest()
    assert len(busy) == 1 and busy[0].kind is NoticeKind.BUSY and busy[0].retry_after
    assert "try again" in busy[0].text
    assert await draw_row(service, "dan") == []  # refused before it was queued

    pipeline.gate.set()
    assert isinstance(await first.last(), Image)
    second_replies = await second.rest()
    third_replies = await third.rest()
    assert isinstance(second_replies[-1], Image) and isinstance(third_replies[-1], Image)
    third_texts = [r.text for r in third_replies if isinstance(r, Notice)]
    assert third_texts[:2] == [
        "You're #2 in the drawing queue (1 picture ahead of yours).",
        "You're next in the drawing queue.",
    ]
    assert {r.ref for r in third_replies if isinstance(r, Notice)} == {third_replies[-1].draw_id}
    assert pipeline.calls == ["one", "two", "three"]


async def test_cancel_drops_a_queued_draw_and_stops_a_running_one(
    services: Callable[..., Any],
) -> None:
    pipeline = FakePipeline()
    pipeline.gate.clear()
    service = await services(pipeline)
    running = Replies(service.handle(incoming("ann"), "one"))
    await running.next()
    await running.next()  # drawing
    queued = Replies(service.handle(incoming("bob"), "two"))
    await queued.next()
    last = Replies(service.handle(incoming("cat"), "three"))
    assert (await last.next()).text.startswith("You're #2")

    assert service.cancel("test", "nobody") == 0
    assert service.cancel("test", "bob") == 1
    cancelled = await queued.last()
    assert (cancelled.kind, cancelled.text) == (NoticeKind.CANCELLED, "Cancelled your picture.")
    assert (await last.next()).text == "You're next in the drawing queue."
    assert [row["status"] for row in await draw_row(service, "bob")] == ["cancelled"]

    assert service.cancel("test", "ann") == 1
    pipeline.gate.set()
    stopped = await running.last()
    assert stopped.kind is NoticeKind.CANCELLED
    assert isinstance(await last.last(), Image)
    assert pipeline.calls == ["one", "three"]
    assert [row["status"] for row in await draw_row(service, "ann")] == ["cancelled"]
    assert not list(
        (tmp_data(service) / "draws").glob(f"{(await draw_row(service, 'ann'))[0]['id']}*")
    )


async def test_an_abandoned_request_leaves_the_queue(services: Callable[..., Any]) -> None:
    pipeline = FakePipeline()
    pipeline.gate.clear()
    service = await services(pipeline)
    running = Replies(service.handle(incoming("ann"), "one"))
    await running.next()
    waiting_replies = service.handle(incoming("bob"), "two")
    await Replies(waiting_replies).next()
    assert service.engine.waiting == 1
    await waiting_replies.aclose()  # the client went away
    assert service.engine.waiting == 0
    pipeline.gate.set()
    assert isinstance(await running.last(), Image)

    async def cancelled() -> bool:
        return [row["status"] for row in await draw_row(service, "bob")] == ["cancelled"]

    await eventually(cancelled)


async def test_shutdown_answers_queued_and_running_draws(services: Callable[..., Any]) -> None:
    pipeline = FakePipeline()
    pipeline.gate.clear()
    service = await services(pipeline)
    running = Replies(service.handle(incoming("ann"), "one"))
    await running.next()
    await running.next()
    queued = Replies(service.handle(incoming("bob"), "two"))
    await queued.next()
    closing = asyncio.create_task(service.close())
    await eventually(lambda: service.engine.closing)  # shutting down, the picture still running
    pipeline.gate.set()
    await asyncio.wait_for(closing, STEP_TIMEOUT)
    for replies in (running, queued):
        notice = await replies.last()
        assert notice.kind is NoticeKind.UNAVAILABLE and "restarting" in notice.text
    after = await draw_all(service, "cat", "three")
    assert after[0].kind is NoticeKind.UNAVAILABLE


# -- errors -------------------------------------------------------------------------------


async def test_pipeline_errors_and_nsfw_flags_are_short_notices_and_the_worker_goes_on(
    services: Callable[..., Any],
) -> None:
    import torch

    pipeline = FakePipeline()
    service = await services(pipeline)
    pipeline.fail = [torch.cuda.OutOfMemoryError("CUDA out of memory"), ValueError("something odd")]
    oom = (await draw_all(service, "ann", "one"))[-1]
    assert oom.kind is NoticeKind.ERROR and "out of GPU memory" in oom.text
    odd = (await draw_all(service, "ann", "two"))[-1]
    assert (
        odd.kind is NoticeKind.ERROR
        and odd.text == "Something went wrong while drawing that. Please try again."
    )
    pipeline.nsfw = True
    flagged = (await draw_all(service, "ann", "three"))[-1]
    assert flagged.kind is NoticeKind.INFO and "safety filter" in flagged.text
    pipeline.nsfw = False
    assert isinstance((await draw_all(service, "ann", "four"))[-1], Image)
    rows = await draw_row(service, "ann")
    assert [(row["status"], row["error"]) for row in rows] == [
        ("failed", "out of memory"),
        ("failed", "ValueError: something odd"),
        ("blocked", "flagged by the safety checker"),
        ("done", None),
    ]
    assert [row["image"] is not None for row in rows] == [False, False, False, True]
    assert len(list((tmp_data(service) / "draws").iterdir())) == 1


async def test_bad_options_answer_with_usage_and_record_nothing(
    services: Callable[..., Any],
) -> None:
    service = await services(FakePipeline())
    for args in ("", "a cat --seed many", "a cat --style noir"):
        replies = await draw_all(service, "ann", args)
        assert len(replies) == 1 and replies[0].kind is NoticeKind.INFO
        assert "Usage: /draw <prompt> [--seed N]" in replies[0].text
    assert await draw_row(service, "ann") == []


async def test_a_missing_local_model_names_draw_model(
    services: Callable[..., Any], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    service = await services(model=missing)
    notice = (await draw_all(service, "ann", "a cat"))[-1]
    assert notice.kind is NoticeKind.UNAVAILABLE
    assert "draw.model" in notice.text and str(missing) in notice.text
    assert [row["status"] for row in await draw_row(service, "ann")] == ["failed"]
    # Answered at once (no new record) until draw.retry_load_after_s has passed.
    again = await draw_all(service, "ann", "a cat")
    assert len(again) == 1 and "draw.model" in again[0].text
    assert len(await draw_row(service, "ann")) == 1


async def test_a_hub_model_without_network_names_draw_model(
    services: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    service = await services(model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    notice = (await draw_all(service, "ann", "a cat"))[-1]
    assert notice.kind is NoticeKind.UNAVAILABLE
    assert "draw.model 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in notice.text
    assert "hub" in notice.text


# -- limits --------------------------------------------------------------------------------


async def test_hourly_limit_per_user_counts_from_the_store(services: Callable[..., Any]) -> None:
    import torch

    pipeline = FakePipeline()
    service = await services(pipeline, limits={"draws_per_hour": 2})
    pipeline.fail = [torch.cuda.OutOfMemoryError("CUDA out of memory")]
    assert (await draw_all(service, "ann", "failed, not counted"))[-1].kind is NoticeKind.ERROR
    for prompt in ("one", "two"):
        assert isinstance((await draw_all(service, "ann", prompt))[-1], Image)
    limited = await draw_all(service, "ann", "three")
    assert len(limited) == 1 and limited[0].kind is NoticeKind.RATE_LIMITED
    assert 3500 < limited[0].retry_after <= 3600
    assert "2 pictures for this hour" in limited[0].text and re.search(
        r"Try again in \d+ minutes?\.", limited[0].text
    )
    assert isinstance((await draw_all(service, "bob", "mine"))[-1], Image)

    # A restart forgets nothing: the count comes from the database.
    await service.close()
    restarted = await services(FakePipeline(), limits={"draws_per_hour": 2})
    assert (await draw_all(restarted, "ann", "four"))[-1].kind is NoticeKind.RATE_LIMITED
    unlimited = await services(FakePipeline(), limits={"draws_per_hour": 0})
    assert isinstance((await draw_all(unlimited, "ann", "five"))[-1], Image)


async def test_daily_limit_per_user_counts_from_midnight_utc(
    services: Callable[..., Any],
) -> None:
    service = await services(FakePipeline(), limits={"draws_per_day": 1, "draws_per_hour": 0})
    assert isinstance((await draw_all(service, "ann", "one"))[-1], Image)
    [limited] = await draw_all(service, "ann", "two")
    assert limited.kind is NoticeKind.RATE_LIMITED and "1 picture for today" in limited.text
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert limited.retry_after is not None
    assert abs(limited.retry_after - (midnight - now).total_seconds()) < 5
    assert isinstance((await draw_all(service, "bob", "mine"))[-1], Image)


# -- records, export, forget, delivery --------------------------------------------------------


def test_every_draw_is_recorded_and_exported(
    tmp_path: Path, tiny_sd_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import main

    path = tmp_path / "bot.toml"
    path.write_text(
        f'[bot]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path / "bot.db"}"\n'
        f'[draw]\nmodel = "{tiny_sd_dir}"\ndefault_steps = 2\nmax_steps = 4\n'
        "default_width = 64\ndefault_height = 64\n"
    )
    config = load_config(path, environ={})

    async def draw() -> list[Reply]:
        store = await Store.open(config.storage.url)
        service = DrawService(config, store)
        await service.start()
        try:
            return await draw_all(
                service, "ann", '"a blue house" --seed 11 --negative trees --steps 9'
            )
        finally:
            await service.close()
            await store.close()

    image = asyncio.run(draw())[-1]
    assert isinstance(image, Image)
    assert main(["--config", str(path), "export", "--platform", "test", "--user", "ann"]) == 0
    document = json.loads(capsys.readouterr().out)
    (row,) = document["draws"]
    assert row["id"] == image.draw_id and row["status"] == "done"
    assert row["prompt"] == "a blue house" and row["seed"] == 11 and row["chat_id"] == "chat-ann"
    assert row["options"] == {
        "steps": 4,
        "width": 64,
        "height": 64,
        "guidance": 7.5,
        "negative": "trees",
        "adjusted": ["steps lowered from 9 to the maximum, 4"],
    }
    assert row["image"] == image.path and Path(row["image"]).read_bytes() == image.png
    assert row["at"].endswith("Z") and row["finished_at"].endswith("Z")


@pytest.fixture
async def drawing_app(make_config: Callable[..., Config], tiny_sd_dir: Path) -> AsyncIterator[Any]:
    from bot.app import BotApp

    config = make_config(draw={"enabled": True, "model": str(tiny_sd_dir), **TINY_DRAW_SETTINGS})
    async with BotApp(config) as app:
        yield app


async def ask(app: Any, text: str, user: str = "ann") -> list[Reply]:
    message = Incoming(platform="test", chat_id="c1", user_id=user, user_name=user, text=text)
    return [reply async for reply in app.manager.handle(message)]


async def test_forget_deletes_the_pictures_too(drawing_app: Any) -> None:
    image = (await ask(drawing_app, "/draw a cat --seed 2"))[-1]
    assert isinstance(image, Image) and file_bytes(image.path) == image.png
    answer = (await ask(drawing_app, "/forget"))[-1]
    assert isinstance(answer, Text) and "1 pictures" in answer.text
    assert file_bytes(image.path) is None
    assert await drawing_app.store.draws.export("test", "ann") == []
    assert await drawing_app.store.draws.image_path(image.draw_id) is None


async def test_cancel_command_drops_a_queued_draw(drawing_app: Any) -> None:
    drawer = drawing_app.drawer
    gate = threading.Event()
    original = drawer.engine._loader

    def gated(section: Any) -> tuple[Any, Any]:
        gate.wait(STEP_TIMEOUT)
        return original(section)

    drawer.engine._loader = gated
    first = Replies(drawing_app.manager.handle(incoming("bob", "/draw one")))
    assert "Loading" in (await first.next()).text
    queued = Replies(drawing_app.manager.handle(incoming("ann", "/draw two")))
    assert (await queued.next()).kind is NoticeKind.QUEUED
    answer = (await ask(drawing_app, "/cancel", user="ann"))[-1]
    assert answer.text == "Cancelled 1 request."
    assert (await queued.last()).kind is NoticeKind.CANCELLED
    gate.set()
    assert isinstance(await first.last(), Image)


async def test_the_png_reaches_the_web_api(drawing_app: Any) -> None:
    import aiohttp

    from adapters.web import WebChannel

    channel = WebChannel.create(drawing_app.services)
    assert channel is not None
    await channel.start()
    try:
        base = f"http://127.0.0.1:{channel.port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/api/sessions") as response:
                token = (await response.json())["session"]
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(
                f"{base}/api/messages", json={"text": '/draw "a red cat" --seed 7'}, headers=headers
            ) as response:
                assert response.status == 200
                replies = (await response.json())["replies"]
            (image,) = [reply for reply in replies if reply["type"] == "image"]
            assert (
                image["seed"] == 7
                and image["url"].startswith("/media/")
                and image["url"].endswith(".png")
            )
            draw_id = image["url"].removeprefix("/media/").removesuffix(".png")
            assert len(draw_id) >= 20  # unguessable
            async with http.get(base + image["url"]) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "image/png"
                body = await response.read()
            assert body.startswith(PNG_SIGNATURE)
            path = await drawing_app.store.draws.image_path(draw_id)
            assert file_bytes(path) == body
            async with http.get(f"{base}/media/{'x' * 22}.png") as response:
                assert response.status == 404
    finally:
        await channel.stop()


async def test_the_console_saves_the_picture_and_prints_its_path(drawing_app: Any) -> None:
    from adapters.console import ConsoleChannel

    stdout = io.StringIO()
    console = ConsoleChannel(
        drawing_app.manager.handle,
        data_dir=drawing_app.config.bot.data_dir,
        stdin=io.StringIO("/draw a green tree --seed 4\n"),
        stdout=stdout,
    )
    await console.start()
    await asyncio.wait_for(console.wait_closed(), STEP_TIMEOUT)
    output = stdout.getvalue()
    assert "seed 4" in output
    saved = output.split("picture saved to ", 1)[1].splitlines()[0]
    assert (file_bytes(saved) or b"").startswith(PNG_SIGNATURE)
    assert (
        Path(saved).parent
        == drawing_app.config.resolve_path(drawing_app.config.bot.data_dir) / "draws"
    )


async def test_chat_keeps_working_when_the_draw_model_is_missing(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    from bot.app import BotApp

    missing = tmp_path / "no-model-here"
    async with BotApp(make_config(draw={"enabled": True, "model": str(missing)})) as app:
        notice = (await ask(app, "/draw a cat"))[-1]
        assert isinstance(notice, Notice) and notice.kind is NoticeKind.UNAVAILABLE
        assert f"draw.model {str(missing)!r}" in notice.text
        answer = (await ask(app, "hello there"))[-1]
        assert isinstance(answer, Text) and answer.final and answer.text
