"""Governance units: folding and the block list, access lists, periods, the
stored records (SQLite and PostgreSQL), and the service behind the manager on
a real SQLite store with a scripted engine (bans, access, mutes, quotas,
moderation, audit, and no extra database round trip when nothing is set)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from support.engine_doubles import ScriptedEngine

from bot.commands import CommandRegistry
from bot.config import Config
from bot.config.governance import AccessSection, ModerationSection
from bot.engines import TextChunk
from bot.governance import GovernanceError, GovernanceService
from bot.governance.access import AccessPolicy
from bot.governance.moderation import BlockList, fold
from bot.governance.periods import day_start, duration, parse_since, until_reset
from bot.manager import ConversationManager
from bot.messages import Incoming, Notice, NoticeKind, Reply, Text
from bot.metrics import Metrics
from storage import Store

ADMIN = "telegram:1"


def config_for(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, dict[str, Any]] = {
        "bot": {"data_dir": str(tmp_path / "data"), "admins": [ADMIN]},
        "storage": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"},
        "limits": {"messages_per_minute": 0},
        "draw": {"enabled": False},
        "telegram": {"enabled": False},
        "discord": {"enabled": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.model_validate(data)


def message(
    text: str, user: str = "5", chat: str | None = None, platform: str = "telegram", **extra: Any
) -> Incoming:
    return Incoming(
        platform=platform,
        chat_id=chat if chat is not None else user,
        user_id=user,
        user_name=f"User{user}",
        text=text,
        is_private=chat is None,
        **extra,
    )


class TokenEngine(ScriptedEngine):
    """A scripted engine whose final chunk says how many tokens it generated."""

    def __init__(self, reply: Any = lambda turns: f"echo: {turns[-1]}", tokens: int = 10) -> None:
        super().__init__(reply)
        self.tokens = tokens

    async def stream(  # type: ignore[override]
        self, turns: Sequence[str], *, conversation: str = ""
    ) -> AsyncIterator[TextChunk]:
        self.prompts.append(list(turns))
        yield TextChunk(self.reply(turns), True, tokens=self.tokens)


class Drawer:
    """/draw without pictures: says what it would draw."""

    async def handle(self, incoming: Incoming, args: str) -> AsyncIterator[Reply]:
        yield Text(f"drawing {args}")

    def cancel(self, platform: str, user_id: str) -> int:
        return 0


class Bot:
    """A manager with governance on one store, and how to talk to it."""

    def __init__(self, config: Config, store: Store, engine: Any = None) -> None:
        self.metrics = Metrics()
        self.commands = CommandRegistry()
        self.engine = engine or TokenEngine()
        self.service = GovernanceService.create(
            config, store, self.commands, self.metrics, refresh_s=0, global_ttl_s=0
        )
        self.manager = ConversationManager(
            config,
            store,
            self.engine,
            commands=self.commands,
            drawer=Drawer(),
            metrics=self.metrics,
            governance=self.service,
        )

    async def send(self, incoming: Incoming) -> list[Reply]:
        return [reply async for reply in self.manager.handle(incoming)]

    async def say(self, incoming: Incoming) -> str:
        """The texts and notices the user sees, joined ("" for silence)."""
        seen = [r.text for r in await self.send(incoming) if isinstance(r, Text | Notice)]
        return "\n".join(seen)

    def refused(self, reason: str) -> float:
        return self.metrics.refused.labels(reason)._value.get()


@pytest.fixture
async def open_bot(tmp_path: Path) -> AsyncIterator[Any]:
    stores: list[Store] = []
    services: list[GovernanceService] = []

    async def factory(engine: Any = None, **sections: dict[str, Any]) -> Bot:
        config = config_for(tmp_path, **sections)
        store = await Store.open(config.storage.url)
        stores.append(store)
        bot = Bot(config, store, engine)
        await bot.service.start()
        services.append(bot.service)
        return bot

    yield factory
    for service in services:
        await service.close()
    for store in stores:
        await store.close()


# -- folding and the block list ----------------------------------------------------------


def test_fold_drops_case_accents_invisible_characters_and_compatibility_forms() -> None:
    assert fold("Café CAFÉ ca\u200bfé") == "cafe cafe cafe"
    assert fold("İstanbul Straße ﬁne Ｆｕｌｌ") == "istanbul strasse fine full"


def test_terms_are_whole_words_or_phrases_in_any_case_and_accent() -> None:
    blocked = BlockList(["ass", "free  crypto", "Crème brûlée"], [])
    assert blocked.check("a class act") is None
    assert blocked.check("you ASS!") is not None
    assert blocked.check("get FREE\n crypto now") is not None
    verdict = blocked.check("creme BRULEE please")
    assert verdict is not None and verdict.describe() == 'term "Crème brûlée"'
    assert blocked.check("crypto is free") is None


def test_patterns_search_the_folded_text_and_lose_their_own_accents() -> None:
    blocked = BlockList([], [r"idi[o0]t\w*", "café", r"\d{4}-\d{4}"])
    assert blocked.check("IDIOTS everywhere") is not None
    assert blocked.check("Idi0tic") is not None
    assert blocked.check("a CAFE") is not None
    assert blocked.check("ａ ｃａｆé") is not None
    assert blocked.check("call 1234-5678") is not None
    assert blocked.check("a nice day") is None
    assert not BlockList([], [])


def test_a_pattern_that_matches_everything_or_nothing_valid_is_refused() -> None:
    with pytest.raises(ValidationError, match="empty text"):
        ModerationSection(blocked_patterns=["a*"])
    with pytest.raises(ValidationError, match="bad regular expression"):
        ModerationSection(blocked_patterns=["(unclosed"])
    with pytest.raises(ValidationError, match="empty entries"):
        ModerationSection(blocked_terms=["ok", "  "])


# -- access lists ----------------------------------------------------------------------


def outside(section: AccessSection, incoming: Incoming) -> str | None:
    found = AccessPolicy(section).check(incoming)
    return None if found is None else f"{found.scope}: {found.why}"


def test_user_lists() -> None:
    section = AccessSection(users_allow=["telegram:5", "telegram:6"], users_deny=["telegram:6"])
    assert outside(section, message("hi", "5")) is None
    assert outside(section, message("hi", "6")) == "user: in access.users_deny"
    assert outside(section, message("hi", "7")) == "user: not in access.users_allow"
    assert outside(section, message("hi", "5", platform="discord")) is not None
    assert not AccessPolicy(AccessSection()).enabled


def test_chat_lists_and_group_modes() -> None:
    group, other = "-100", "-200"
    listed = AccessSection(groups="listed", chats_allow=[f"telegram:{group}"])
    assert outside(listed, message("hi", "5")) is None  # private chats stay open
    assert outside(listed, message("hi", "5", chat=group)) is None
    assert outside(listed, message("hi", "5", chat=other)) == (
        "chat: group chat not in access.chats_allow"
    )
    private = AccessSection(groups="private")
    assert outside(private, message("hi", "5")) is None
    assert outside(private, message("hi", "5", chat=group)) is not None
    only = AccessSection(chats_allow=[f"telegram:{group}"])  # groups = "all": only what it names
    assert outside(only, message("hi", "5", chat=group)) is None
    assert outside(only, message("hi", "5")) == "chat: chat not in access.chats_allow"
    denied = AccessSection(chats_deny=[f"telegram:{other}"])
    assert outside(denied, message("hi", "5", chat=other)) == "chat: chat in access.chats_deny"
    assert outside(denied, message("hi", "5", chat=group)) is None


# -- periods -------------------------------------------------------------------------------


def test_days_reset_at_midnight_utc_and_durations_read_well() -> None:
    now = datetime(2024, 5, 1, 18, 47, 30, tzinfo=UTC)
    assert day_start(now) == datetime(2024, 5, 1, tzinfo=UTC)
    assert until_reset(now) == 5 * 3600 + 12 * 60 + 30
    assert duration(until_reset(now)) == "5 h 13 min"
    assert duration(3600) == "1 h"
    assert duration(90) == "2 min"
    assert duration(0.2) == "1 s"
    assert parse_since("2024-04-02", now) == datetime(2024, 4, 2, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("today", now) == day_start(now)
    with pytest.raises(GovernanceError, match="YYYY-MM-DD"):
        parse_since("last week", now)


# -- the stored records, on SQLite and PostgreSQL ----------------------------------------


async def test_records_bans_mutes_audit_and_counts(db_url: str) -> None:
    store = await Store.open(db_url)
    records = store.governance
    try:
        assert await records.add_ban("telegram", "9", by=ADMIN, reason="spam")
        assert not await records.add_ban("telegram", "9", by=ADMIN)
        assert [(b.platform, b.user_id, b.reason) for b in await records.bans()] == [
            ("telegram", "9", "spam")
        ]
        assert await records.claim_ban_notice("telegram", "9")
        assert not await records.claim_ban_notice("telegram", "9")
        assert await records.remove_ban("telegram", "9")
        assert not await records.remove_ban("telegram", "9")

        now = datetime.now(UTC)
        await records.set_mute("telegram", "-100", until=now + timedelta(minutes=5), by=ADMIN)
        await records.set_mute("telegram", "-100", until=now + timedelta(minutes=9), by=ADMIN)
        await records.set_mute("telegram", "-200", until=now - timedelta(minutes=1), by=ADMIN)
        [mute] = await records.active_mutes(now)
        assert (mute.chat_id, mute.until) == ("-100", now + timedelta(minutes=9))
        assert not await records.remove_mute("telegram", "-200")  # ran out already
        assert await records.remove_mute("telegram", "-100")

        await records.record("ban", actor=ADMIN, platform="telegram", user_id="9", detail="x")
        await records.record("mute", actor=ADMIN, platform="telegram", chat_id="-100")
        assert await records.has_entry("ban", platform="telegram", chat_id="", user_id="9")
        assert not await records.has_entry("ban", platform="telegram", chat_id="", user_id="8")
        entries = await records.entries()
        assert [e.kind for e in entries] == ["ban", "mute"]
        assert entries[0].as_dict()["at"].endswith("Z")
        assert [e.kind for e in await records.entries(kind="mute")] == ["mute"]
        assert [e.kind for e in await records.entries(limit=1)] == ["mute"]
        assert await records.entries(since=now + timedelta(hours=1)) == []

        for text in ("one", "two"):
            intake = await store.conversations.add_user_message(
                platform="telegram", chat_id="-100", owner="5", user_id="5", user_name="Ann",
                text=text, address=None, dedup_key=None, handled_by=None,
            )  # fmt: skip
            await store.conversations.add_bot_message(
                reply_to=intake.message, platform="telegram", user_id="5", text="ok", tokens=7
            )
        counts = await records.counts(
            "telegram", "5", "-100", day=day_start(now), window=now - timedelta(minutes=1)
        )
        assert (counts.messages, counts.tokens, counts.chat_messages) == (2, 14, 2)
        assert counts.chat_oldest is not None and counts.chat_oldest <= datetime.now(UTC)
        assert await records.tokens_since(day_start(now)) == 14
        totals = await records.totals(day_start(now))
        assert (totals.messages, totals.tokens) == (2, 14)
        assert [(r.id, r.name, r.messages, r.tokens) for r in totals.users] == [("5", "Ann", 2, 14)]
        assert [(r.id, r.messages, r.tokens) for r in totals.chats] == [("-100", 2, 14)]
    finally:
        await store.close()


# -- the service behind the manager ---------------------------------------------------------


async def test_admins_ban_and_unban_and_a_banned_person_is_told_once(open_bot: Any) -> None:
    bot = await open_bot()
    admin = message("/ban telegram:5 spamming", user="1")
    assert "Banned telegram:5" in await bot.say(admin)
    assert "banned already" in await bot.say(admin)
    assert await bot.say(message("hello")) == "You can't use this bot."
    assert await bot.say(message("hello?")) == ""
    assert await bot.say(message("/start")) == ""
    assert bot.engine.prompts == []
    assert bot.refused("banned") == 3
    assert "Unbanned telegram:5" in await bot.say(message("/unban telegram:5", user="1"))
    assert (await bot.say(message("hello"))).startswith("echo:")
    kinds = [(e.kind, e.actor, e.user_id, e.detail) for e in await bot.service.records.entries()]
    assert kinds == [("ban", ADMIN, "5", "spamming"), ("unban", ADMIN, "5", "")]


async def test_admin_commands_are_refused_to_others_and_validated(open_bot: Any) -> None:
    bot = await open_bot()
    assert "only the bot's admins" in await bot.say(message("/ban telegram:6"))
    assert "Usage: /ban" in await bot.say(message("/ban 6", user="1"))
    assert "can't be banned" in await bot.say(message(f"/ban {ADMIN}", user="1"))
    assert "Usage: /mute" in await bot.say(message("/mute soon", user="1"))
    assert "was not banned" in await bot.say(message("/unban telegram:6", user="1"))
    assert "/ban" in await bot.say(message("/help", user="1"))
    assert "/ban" not in await bot.say(message("/help"))


async def test_bans_survive_a_restart_and_the_notice_is_not_repeated(
    tmp_path: Path, open_bot: Any
) -> None:
    first = await open_bot()
    await first.say(message("/ban telegram:5", user="1"))
    assert await first.say(message("hi")) == "You can't use this bot."
    second = await open_bot()  # a restart: a new store and service on the same database
    assert await second.say(message("hi")) == ""
    assert second.engine.prompts == []


async def test_access_refusal_is_said_once_per_person_and_per_chat(open_bot: Any) -> None:
    bot = await open_bot(access={"users_deny": ["telegram:6"], "groups": "private"})
    assert await bot.say(message("hi", user="6")) == "Sorry, I'm not available here."
    assert await bot.say(message("hi again", user="6")) == ""
    assert await bot.say(message("hi", user="7", chat="-100")) == "Sorry, I'm not available here."
    assert await bot.say(message("me too", user="8", chat="-100")) == ""  # once per chat
    assert (await bot.say(message("hi", user="1", chat="-100"))).startswith("echo:")  # an admin
    assert bot.engine.prompts == [["hi"]]
    entries = await bot.service.records.entries(kind="access")
    assert [(e.chat_id, e.user_id) for e in entries] == [("", "6"), ("-100", "")]
    again = await open_bot(access={"users_deny": ["telegram:6"], "groups": "private"})
    assert await again.say(message("hi", user="6")) == ""  # after a restart too


async def test_silent_refusal_and_the_web_always_answers_403(open_bot: Any) -> None:
    bot = await open_bot(access={"users_allow": ["web:w1"], "refusal": ""})
    assert await bot.say(message("hi", user="6")) == ""
    for _ in range(2):
        [notice] = await bot.send(message("hi", user="w2", platform="web"))
        assert isinstance(notice, Notice) and notice.kind is NoticeKind.FORBIDDEN


async def test_a_muted_chat_hears_nothing_until_unmuted(open_bot: Any) -> None:
    bot = await open_bot()
    group = "-100"
    assert "Muted this chat for 30 min" in await bot.say(message("/mute 30", "1", chat=group))
    assert await bot.say(message("hello", "5", chat=group, addressed=True)) == ""
    assert (await bot.say(message("elsewhere", "5"))).startswith("echo:")
    assert "I'll answer here again" in await bot.say(message("/mute 0", "1", chat=group))
    assert (await bot.say(message("hello", "5", chat=group))).startswith("echo:")
    assert "was not muted" in await bot.say(message("/mute 0", "1", chat=group))
    assert bot.refused("muted") == 1
    assert [e.kind for e in await bot.service.records.entries()] == ["mute", "unmute"]


async def test_daily_messages_quota_and_stats(open_bot: Any) -> None:
    bot = await open_bot(limits={"messages_per_day": 2, "tokens_per_day": 100})
    for text in ("one", "two"):
        assert (await bot.say(message(text))).startswith("echo:")
    [notice] = await bot.send(message("three"))
    assert isinstance(notice, Notice) and notice.kind is NoticeKind.RATE_LIMITED
    assert "today's limit of 2 messages" in notice.text
    assert notice.retry_after == pytest.approx(until_reset(datetime.now(UTC)), abs=5)
    assert await bot.say(message("four")) == ""  # reminded at most every 10 minutes
    stats = await bot.say(message("/stats"))  # commands still work
    assert "Today: 2 of 2 messages, 20 of 100 tokens." in stats
    assert "Left: 0 messages, 80 tokens; resets at midnight UTC, in " in stats
    assert (await bot.say(message("one", user="6"))).startswith("echo:")  # per person
    assert bot.refused("quota") == 2


async def test_token_quotas_per_person_and_for_everyone(open_bot: Any) -> None:
    bot = await open_bot(TokenEngine(tokens=30), limits={"tokens_per_day": 50})
    assert (await bot.say(message("one"))).startswith("echo:")
    assert (await bot.say(message("two"))).startswith("echo:")  # 30 < 50 before it
    assert "today's 50 tokens" in await bot.say(message("three"))
    everyone = await open_bot(TokenEngine(tokens=30), limits={"global_tokens_per_day": 100})
    for user in ("5", "6"):  # 60 + the 60 above = 120 tokens today
        assert (await everyone.say(message("hi", user))).startswith("echo:")
    assert "all the answers I can for today" in await everyone.say(message("hi", "7"))
    assert "Everyone together today: 120 of 100 tokens." in await everyone.say(message("/stats"))


async def test_flood_control_counts_a_group_chat_not_private_ones(open_bot: Any) -> None:
    bot = await open_bot(limits={"chat_messages_per_minute": 2})
    group = "-100"
    assert (await bot.say(message("a", "5", chat=group))).startswith("echo:")
    assert (await bot.say(message("b", "6", chat=group))).startswith("echo:")
    [notice] = await bot.send(message("c", "7", chat=group))
    assert isinstance(notice, Notice) and "more than 2 messages a minute" in notice.text
    assert notice.retry_after is not None and 1 <= notice.retry_after <= 60
    assert await bot.say(message("d", "8", chat=group)) == ""  # told once for the chat
    for text in ("x", "y", "z"):
        assert (await bot.say(message(text, "5"))).startswith("echo:")
    assert bot.refused("flood") == 2


async def test_moderation_on_input_output_and_draw_prompts_with_audit(open_bot: Any) -> None:
    engine = TokenEngine(lambda turns: "Buy FREE Crypto today" if "deal" in turns[-1] else "ok")
    bot = await open_bot(
        engine,
        moderation={"blocked_terms": ["free crypto"], "blocked_patterns": [r"b[a@]d\w*"]},
    )
    answer = "Sorry, I can't help with that."
    assert await bot.say(message("you BÂD boy")) == answer
    assert engine.prompts == []  # blocked input never reaches the model
    replies = await bot.send(message("any deal?"))
    assert [r.text for r in replies if isinstance(r, Text)] == [answer]  # nothing streamed
    assert await bot.say(message("/draw a bad cat")) == answer
    assert await bot.say(message("/draw a good cat")) == "drawing a good cat"
    assert await bot.say(message("fine")) == "ok"
    details = [(e.kind, e.user_id, e.detail) for e in await bot.service.records.entries()]
    assert details == [
        ("moderation", "5", "input: pattern /b[a@]d\\w*/"),
        ("moderation", "5", 'output: term "free crypto"'),
        ("moderation", "5", "draw: pattern /b[a@]d\\w*/"),
    ]
    for where in ("input", "output", "draw"):
        assert bot.metrics.moderation.labels(where)._value.get() == 1
    stored = await bot.manager.store.people.export("telegram", "5")
    assert ("bot", "Buy FREE Crypto today") not in [
        (m.role, m.text) for c in stored for m in c.messages
    ]


async def test_usage_lists_people_and_chats(open_bot: Any) -> None:
    bot = await open_bot()
    await bot.say(message("hi", "5", chat="-100"))
    await bot.say(message("hi", "6", chat="-100"))
    await bot.say(message("hi", "6"))
    usage = await bot.say(message("/usage", "1"))
    assert usage.splitlines()[0].endswith("UTC: 3 messages, 30 tokens.")
    assert "telegram:6 (User6) — 2 messages, 20 tokens" in usage
    assert "telegram:-100 — 2 messages, 20 tokens" in usage
    assert "not a period" in await bot.say(message("/usage yesterday", "1"))
    assert "Since " in await bot.say(message("/usage 7d", "1"))


async def test_with_nothing_configured_governance_adds_no_database_round_trip(
    tmp_path: Path,
) -> None:
    """The message path with the service costs exactly the transactions it costs without."""
    config = config_for(tmp_path)
    store = await Store.open(config.storage.url)
    calls: list[str] = []
    read, write = store.db.read, store.db.write

    async def counted_read(work: Any) -> Any:
        calls.append("read")
        return await read(work)

    async def counted_write(work: Any) -> Any:
        calls.append("write")
        return await write(work)

    store.db.read, store.db.write = counted_read, counted_write  # type: ignore[method-assign]
    try:
        plain = ConversationManager(config, store, TokenEngine())
        bot = Bot(config, store)
        await bot.service.start()
        await bot.service.close()
        counts = []
        for user, manager in (("5", plain), ("6", bot.manager), ("7", plain), ("8", bot.manager)):
            calls.clear()
            replies = [r async for r in manager.handle(message("hello", user))]
            assert any(isinstance(r, Text) for r in replies)
            counts.append(len(calls))
        assert counts[0] == counts[1] and counts[2] == counts[3], counts
    finally:
        await store.close()
