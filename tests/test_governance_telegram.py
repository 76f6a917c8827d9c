"""Governance end to end on Telegram: `BotApp` with its Telegram channel
against the fake Bot API (tests/support/fakes/telegram_server.py) and a
scripted engine. Admin commands in chats, a ban answered once then silence,
chats outside the access lists, a muted group, flood control, a daily quota
and a blocked model reply. Silence is checked once the refusal is counted
(`aigc_bot_refused_total`): the bot has then decided not to answer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.engine_doubles import ScriptedEngine
from support.eventually import eventually
from support.fakes.telegram_server import FakeBotApi

from bot.app import BotApp
from bot.config import Config
from bot.governance import GovernanceService

TOKEN = "123456789:AAFake-token_for-governance-tests-0123"
ADMIN = 1
GROUP = -1001234567890
OTHER_GROUP = -1009876543210


@contextlib.asynccontextmanager
async def governed(app: BotApp) -> AsyncIterator[GovernanceService]:
    """The app's governance service: the one bot.app wires in, or (until it
    does) one made here and handed to the manager."""
    assert app.manager is not None and app.store is not None
    if isinstance(app.manager.governance, GovernanceService):
        yield app.manager.governance
        return
    service = GovernanceService.create(app.config, app.store, app.commands, app.metrics)
    await service.start()
    app.manager.governance = service
    try:
        yield service
    finally:
        await service.close()


class Bot:
    def __init__(self, app: BotApp, api: FakeBotApi) -> None:
        self.app = app
        self.api = api
        self.mention = "@" + api.username

    def refused(self, reason: str) -> float:
        return self.app.metrics.refused.labels(reason)._value.get()

    async def refusals(self, reason: str, count: int) -> None:
        await eventually(lambda: self.refused(reason) >= count)

    async def answers(self, chat: int, count: int) -> list[str]:
        await self.api.wait_until(lambda: len(self.api.texts(chat)) >= count)
        return self.api.texts(chat)


@pytest.fixture
async def api() -> AsyncIterator[FakeBotApi]:
    fake = FakeBotApi(TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def serve(tmp_path: Path, api: FakeBotApi, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)

    @contextlib.asynccontextmanager
    async def factory(engine: Any = None, **sections: dict[str, Any]) -> AsyncIterator[Bot]:
        data: dict[str, dict[str, Any]] = {
            "bot": {"data_dir": str(tmp_path / "data"), "admins": [f"telegram:{ADMIN}"]},
            "storage": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"},
            "limits": {"messages_per_minute": 0},
            "draw": {"enabled": False},
            "web": {"enabled": False},
            "telegram": {"enabled": True, "base_url": api.base_url},
            "discord": {"enabled": False},
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        config = Config.model_validate(data)
        async with BotApp(config, engine=engine or ScriptedEngine()) as app, governed(app):
            [channel] = app.build_channels()
            await channel.start()
            try:
                yield Bot(app, api)
            finally:
                await channel.stop()

    return factory


async def test_an_admin_bans_in_a_chat_and_the_banned_person_hears_once(
    serve: Any, api: FakeBotApi
) -> None:
    async with serve() as bot:
        api.private_message(5, "/ban telegram:7 spam")  # not an admin
        assert "only the bot's admins" in (await bot.answers(5, 1))[-1]
        api.private_message(ADMIN, "/ban telegram:7 spam")
        assert (await bot.answers(ADMIN, 1))[-1].startswith("Banned telegram:7")
        api.private_message(7, "hello")
        assert await bot.answers(7, 1) == ["You can't use this bot."]
        api.group_message(GROUP, 7, f"{bot.mention} hello?")
        api.private_message(7, "/help")
        await bot.refusals("banned", 3)
        assert api.texts(7) == ["You can't use this bot."] and api.texts(GROUP) == []
        api.private_message(ADMIN, "/unban telegram:7")
        assert (await bot.answers(ADMIN, 2))[-1].startswith("Unbanned")
        api.private_message(7, "hello again")
        assert (await bot.answers(7, 2))[-1] == "echo: hello again"
    # The menu shows what everyone may run: the admin commands stay out of it.
    assert not {"ban", "unban", "mute", "usage"} & {c["command"] for c in api.commands}


async def test_groups_outside_the_list_hear_one_refusal_then_silence(
    serve: Any, api: FakeBotApi
) -> None:
    access = {
        "groups": "listed",
        "chats_allow": [f"telegram:{GROUP}"],
        "users_deny": ["telegram:9"],
    }
    async with serve(access=access) as bot:
        api.group_message(OTHER_GROUP, 5, f"{bot.mention} hi")
        assert await bot.answers(OTHER_GROUP, 1) == ["Sorry, I'm not available here."]
        api.group_message(OTHER_GROUP, 6, f"{bot.mention} and me?")
        api.group_message(OTHER_GROUP, 5, f"{bot.mention} hello??")
        api.private_message(9, "hi")
        assert await bot.answers(9, 1) == ["Sorry, I'm not available here."]
        api.private_message(9, "hi?")
        await bot.refusals("access", 5)
        assert len(api.texts(OTHER_GROUP)) == 1 and len(api.texts(9)) == 1
        api.group_message(GROUP, 5, f"{bot.mention} hi")
        api.private_message(5, "hi in private")
        assert await bot.answers(GROUP, 1) == ["echo: hi"]
        assert await bot.answers(5, 1) == ["echo: hi in private"]
        engine = bot.app.engine
        assert isinstance(engine, ScriptedEngine) and len(engine.prompts) == 2


async def test_a_muted_group_is_quiet_for_all_but_admins(serve: Any, api: FakeBotApi) -> None:
    async with serve() as bot:
        api.group_message(GROUP, ADMIN, f"/mute{bot.mention} 15")
        assert "Muted this chat for 15 min" in (await bot.answers(GROUP, 1))[-1]
        api.group_message(GROUP, 5, f"{bot.mention} are you there?")
        api.group_message(GROUP, 5, "/stats")
        await bot.refusals("muted", 2)
        assert len(api.texts(GROUP)) == 1
        api.group_message(GROUP, ADMIN, f"{bot.mention} admins still get answers")
        assert (await bot.answers(GROUP, 2))[-1] == "echo: admins still get answers"
        api.private_message(5, "and in private?")
        assert await bot.answers(5, 1) == ["echo: and in private?"]
        api.group_message(GROUP, ADMIN, "/mute 0")
        assert (await bot.answers(GROUP, 3))[-1] == "I'll answer here again."
        api.group_message(GROUP, 5, f"{bot.mention} now?")
        assert (await bot.answers(GROUP, 4))[-1] == "echo: now?"
        kinds = [entry.kind for entry in await bot.app.store.governance.entries()]  # type: ignore[union-attr]
        assert kinds == ["mute", "unmute"]


async def test_flood_control_and_a_daily_quota_in_chats(serve: Any, api: FakeBotApi) -> None:
    limits = {"messages_per_minute": 0, "chat_messages_per_minute": 2, "messages_per_day": 2}
    async with serve(limits=limits) as bot:
        api.group_message(GROUP, 5, f"{bot.mention} one")
        await bot.answers(GROUP, 1)
        api.group_message(GROUP, 6, f"{bot.mention} two")
        await bot.answers(GROUP, 2)
        api.group_message(GROUP, 7, f"{bot.mention} three")
        assert "more than 2 messages a minute" in (await bot.answers(GROUP, 3))[-1]
        api.group_message(GROUP, 8, f"{bot.mention} four")
        await bot.refusals("flood", 2)
        assert len(api.texts(GROUP)) == 3
        api.private_message(5, "private one")  # user 5 has one message today, in the group
        assert await bot.answers(5, 1) == ["echo: private one"]
        api.private_message(5, "private two")
        [*_, notice] = await bot.answers(5, 2)
        assert "today's limit of 2 messages" in notice and "resets at midnight UTC" in notice
        api.private_message(5, "/stats")
        [*_, stats] = await bot.answers(5, 3)
        assert "Today: 2 of 2 messages." in stats


async def test_a_blocked_model_reply_is_replaced_not_streamed(serve: Any, api: FakeBotApi) -> None:
    engine = ScriptedEngine(lambda turns: "sure, here is a very Bàd word for you")
    async with serve(engine, moderation={"blocked_patterns": [r"\bbad\b"]}) as bot:
        api.private_message(5, "say something")
        assert await bot.answers(5, 1) == ["Sorry, I can't help with that."]
        assert not api.called("editMessageText")
        [entry] = await bot.app.store.governance.entries()  # type: ignore[union-attr]
        assert (entry.kind, entry.user_id, entry.detail) == (
            "moderation",
            "5",
            r"output: pattern /\bbad\b/",
        )
