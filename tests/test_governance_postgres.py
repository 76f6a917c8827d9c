"""Two bot processes on one PostgreSQL database: two stores, two governance
services and two managers, as two `aigc-bot run` would have. Quotas are
counted in the database, so the second process sees what the first counted;
a ban or mute made in one applies in the other once it reloads, and a banned
person is told once in all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.engine_doubles import ScriptedEngine
from support.eventually import eventually

from bot.commands import CommandRegistry
from bot.config import Config
from bot.governance import GovernanceService
from bot.manager import ConversationManager
from bot.messages import Incoming, Notice, NoticeKind, Reply, Text
from bot.metrics import Metrics
from storage import Store

ADMIN = "telegram:1"


class Process:
    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.metrics = Metrics()
        commands = CommandRegistry()
        self.service = GovernanceService.create(
            config, store, commands, self.metrics, refresh_s=0.05, global_ttl_s=0
        )
        self.manager = ConversationManager(
            config,
            store,
            ScriptedEngine(),
            commands=commands,
            metrics=self.metrics,
            governance=self.service,
        )

    async def send(self, text: str, user: str = "5", chat: str | None = None) -> list[Reply]:
        incoming = Incoming(
            "telegram", chat or user, user, f"User{user}", text, is_private=chat is None
        )
        return [reply async for reply in self.manager.handle(incoming)]

    async def say(self, text: str, user: str = "5", chat: str | None = None) -> str:
        replies = await self.send(text, user, chat)
        seen = [r for r in replies if isinstance(r, Notice) or (isinstance(r, Text) and r.final)]
        return "\n".join(r.text for r in seen)


@pytest.fixture
async def processes(postgres_url: str) -> AsyncIterator[tuple[Process, Process]]:
    config = Config.model_validate(
        {
            "bot": {"admins": [ADMIN]},
            "storage": {"url": postgres_url},
            "limits": {"messages_per_minute": 0, "messages_per_day": 3},
            "draw": {"enabled": False},
        }
    )
    started: list[Process] = []
    try:
        for _ in range(2):
            process = Process(config, await Store.open(postgres_url))
            started.append(process)
            await process.service.start()
        yield started[0], started[1]
    finally:
        for process in started:
            await process.service.close()
            await process.store.close()


async def test_a_daily_quota_is_shared_by_two_processes(processes: Any) -> None:
    first, second = processes
    assert await first.say("one") == "echo: one"
    assert await first.say("two") == "echo: two"
    assert await second.say("three") == "echo: three"  # the second counts the first's two
    [notice] = await second.send("four")
    assert isinstance(notice, Notice) and notice.kind is NoticeKind.RATE_LIMITED
    assert "today's limit of 3 messages" in notice.text and notice.retry_after
    [notice] = await first.send("five")  # and the first counts the second's
    assert isinstance(notice, Notice) and notice.kind is NoticeKind.RATE_LIMITED
    stats = await second.say("/stats")
    assert "Today: 3 of 3 messages." in stats


async def test_a_ban_and_a_mute_made_in_one_process_apply_in_the_other(processes: Any) -> None:
    first, second = processes
    assert "Banned telegram:7" in await first.say("/ban telegram:7", user="1")
    await eventually(lambda: second.service.sanctions.banned("telegram", "7"))
    assert await second.say("hi", user="7") == "You can't use this bot."
    assert await first.say("hi", user="7") == ""  # told once, whichever process told them
    assert await second.say("hi", user="7") == ""

    assert "Muted this chat" in await first.say("/mute 5", user="1", chat="-100")
    await eventually(lambda: second.service.sanctions.muted("telegram", "-100") is not None)
    assert await second.say("anyone?", user="5", chat="-100") == ""
    assert "I'll answer here again" in await second.say("/mute 0", user="1", chat="-100")
    await eventually(lambda: first.service.sanctions.muted("telegram", "-100") is None)
    assert await first.say("back?", user="5", chat="-100") == "echo: back?"
    kinds = [entry.kind for entry in await first.store.governance.entries()]
    assert kinds == ["ban", "mute", "unmute"]
