"""The conversation manager on a real SQLite store with a scripted engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.engine_doubles import ScriptedEngine, jitter
from support.eventually import eventually

from bot.cli import main
from bot.config import Config
from bot.manager import ConversationManager
from bot.messages import Incoming, Notice, NoticeKind, Reply, Text, Typing
from storage import StorageUnavailable, Store
from storage.history import RecentTurns


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(limits={"messages_per_minute": 0})


@pytest.fixture
async def store(config: Config):
    opened = await Store.open(config.storage.url)
    yield opened
    await opened.close()


def message(text: str, user: str = "ann", chat: str = "chat1", **extra: Any) -> Incoming:
    return Incoming(
        platform="test", chat_id=chat, user_id=user, user_name=user.title(), text=text, **extra
    )


async def replies(manager: ConversationManager, incoming: Incoming) -> list[Reply]:
    return [reply async for reply in manager.handle(incoming)]


def final_text(collected: list[Reply]) -> str:
    finals = [r for r in collected if isinstance(r, Text) and r.final]
    assert len(finals) == 1, collected
    return finals[0].text


async def test_a_message_is_stored_answered_and_the_answer_stored(
    config: Config, store: Store
) -> None:
    engine = ScriptedEngine()
    manager = ConversationManager(config, store, engine)
    collected = await replies(manager, message("hello there"))
    assert isinstance(collected[0], Typing)
    assert [r.text for r in collected if isinstance(r, Text) and not r.final] == [
        "echo:",
        "echo: hello",
    ]
    assert final_text(collected) == "echo: hello there"
    exported = await store.people.export("test", "ann")
    assert [(m.role, m.text) for m in exported[0].messages] == [
        ("user", "hello there"),
        ("bot", "echo: hello there"),
    ]


async def test_the_message_is_committed_before_generation(config: Config, store: Store) -> None:
    seen: list[list[str]] = []
    engine = ScriptedEngine()
    manager = ConversationManager(config, store, engine)
    engine.release = asyncio.Event()
    task = asyncio.create_task(replies(manager, message("keep me")))
    await engine.started.wait()
    # The engine is still working; a fresh connection already sees the message.
    other = await Store.open(config.storage.url)
    seen = [[m.text for m in c.messages] for c in await other.people.export("test", "ann")]
    await other.close()
    engine.release.set()
    await task
    assert seen == [["keep me"]]


async def test_twenty_messages_at_once_are_answered_and_stored_in_order(
    config: Config, store: Store
) -> None:
    engine = ScriptedEngine(delay=jitter(0, 0.01))
    manager = ConversationManager(config, store, engine)
    texts = [f"message {i}" for i in range(20)]
    results = await asyncio.gather(*(replies(manager, message(t)) for t in texts))
    assert [final_text(r) for r in results] == [f"echo: {t}" for t in texts]
    # Each prompt holds every earlier exchange, in order: strict serialisation.
    for index, prompt in enumerate(engine.prompts):
        expected: list[str] = []
        for earlier in texts[:index]:
            expected += [earlier, f"echo: {earlier}"]
        assert prompt == [*expected, texts[index]]
    exported = await store.people.export("test", "ann")
    stored = [m.text for m in exported[0].messages]
    assert stored == [x for t in texts for x in (t, f"echo: {t}")]


async def test_different_conversations_run_concurrently(config: Config, store: Store) -> None:
    engine = ScriptedEngine()
    engine.release = asyncio.Event()
    manager = ConversationManager(config, store, engine)
    tasks = [asyncio.create_task(replies(manager, message("hi", user=f"u{i}"))) for i in range(5)]
    await eventually(lambda: len(engine.prompts) == 5)  # all five generate at the same time
    engine.release.set()
    await asyncio.gather(*tasks)


def test_fifty_users_each_find_only_their_own_messages_in_export(
    make_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(limits={"messages_per_minute": 0})

    async def chat() -> None:
        store = await Store.open(config.storage.url)
        manager = ConversationManager(config, store, ScriptedEngine(delay=jitter()))
        await asyncio.gather(
            *(
                replies(
                    manager, message(f"I am user {i}, turn {turn}", user=f"user{i}", chat="lobby")
                )
                for i in range(50)
                for turn in range(2)
            )
        )
        await store.close()

    asyncio.run(chat())
    config_file = tmp_path / "export.toml"
    config_file.write_text(f'[storage]\nurl = "{config.storage.url}"\n')
    for i in range(50):
        assert (
            main(
                ["--config", str(config_file), "export", "--platform", "test", "--user", f"user{i}"]
            )
            == 0
        )
        document = json.loads(capsys.readouterr().out)
        assert document["platform"] == "test" and document["user_id"] == f"user{i}"
        texts = [m["text"] for c in document["conversations"] for m in c["messages"]]
        assert texts == [
            f"I am user {i}, turn 0",
            f"echo: I am user {i}, turn 0",
            f"I am user {i}, turn 1",
            f"echo: I am user {i}, turn 1",
        ]


async def test_history_scope_chat_shares_a_group_history(
    make_config: Callable[..., Config], store: Store
) -> None:
    config = make_config(bot={"history_scope": "chat"}, limits={"messages_per_minute": 0})
    engine = ScriptedEngine()
    manager = ConversationManager(config, store, engine)
    await replies(manager, message("from ann", user="ann", is_private=False))
    await replies(manager, message("from bob", user="bob", is_private=False))
    assert engine.prompts[-1] == ["from ann", "echo: from ann", "from bob"]


async def test_user_scope_keeps_people_apart_in_a_group(config: Config, store: Store) -> None:
    engine = ScriptedEngine()
    manager = ConversationManager(config, store, engine)
    await replies(manager, message("from ann", user="ann", is_private=False))
    await replies(manager, message("from bob", user="bob", is_private=False))
    assert engine.prompts[-1] == ["from bob"]


async def test_unaddressed_group_messages_are_ignored(config: Config, store: Store) -> None:
    engine = ScriptedEngine()
    manager = ConversationManager(config, store, engine)
    assert await replies(manager, message("chatter", is_private=False, addressed=False)) == []
    assert engine.prompts == []


@pytest.mark.parametrize(
    ("text", "kind"),
    [("", NoticeKind.EMPTY), ("   \n\t ", NoticeKind.EMPTY), ("x" * 5000, NoticeKind.TOO_LONG)],
)
async def test_empty_and_huge_messages_get_a_clear_answer(
    config: Config, store: Store, text: str, kind: NoticeKind
) -> None:
    engine = ScriptedEngine()
    collected = await replies(ConversationManager(config, store, engine), message(text))
    assert len(collected) == 1 and isinstance(collected[0], Notice) and collected[0].kind == kind
    assert engine.prompts == []


async def test_odd_unicode_round_trips(config: Config, store: Store) -> None:
    text = "héllo 👋🏽 مرحبا \u200b 你好 \U0001f600 e\u0301"
    collected = await replies(ConversationManager(config, store, ScriptedEngine()), message(text))
    assert final_text(collected) == f"echo: {text}"
    exported = await store.people.export("test", "ann")
    assert exported[0].messages[0].text == text


async def test_commands(config: Config, store: Store) -> None:
    engine = ScriptedEngine()
    manager = ConversationManager(config, store, engine)
    assert final_text(await replies(manager, message("/start"))) == config.bot.welcome
    assert "/draw" in final_text(await replies(manager, message("/help")))
    unknown = final_text(await replies(manager, message("/frobnicate now")))
    assert "/frobnicate" in unknown and "/reset" in unknown
    await replies(manager, message("remember this"))
    assert "1 messages, 1 replies" in final_text(await replies(manager, message("/stats@aigcbot")))
    await replies(manager, message("/reset"))
    await replies(manager, message("new topic"))
    assert engine.prompts[-1] == ["new topic"]
    assert "4 messages" in final_text(await replies(manager, message("/forget")))
    assert await store.people.export("test", "ann") == []
    assert engine.prompts.count(["/start"]) == 0  # commands never reach the model


async def test_cancel_drops_a_running_request(config: Config, store: Store) -> None:
    engine = ScriptedEngine()
    engine.release = asyncio.Event()
    manager = ConversationManager(config, store, engine)
    running = asyncio.create_task(replies(manager, message("slow one")))
    queued = asyncio.create_task(replies(manager, message("queued one")))
    await engine.started.wait()
    assert final_text(await replies(manager, message("/cancel"))) == "Cancelled 2 requests."
    for task in (running, queued):
        collected = await task
        assert any(isinstance(r, Notice) and r.kind == NoticeKind.CANCELLED for r in collected)
    # Both messages were accepted and stay stored; no reply was stored.
    exported = await store.people.export("test", "ann")
    assert [m.role for c in exported for m in c.messages] == ["user", "user"]
    assert (
        final_text(await replies(manager, message("/cancel")))
        == "You have nothing queued or running."
    )


async def test_rate_limit_answers_with_the_wait(
    make_config: Callable[..., Config], store: Store
) -> None:
    config = make_config(limits={"messages_per_minute": 2})
    manager = ConversationManager(config, store, ScriptedEngine())
    await replies(manager, message("one"))
    await replies(manager, message("two"))
    collected = await replies(manager, message("three"))
    assert isinstance(collected[0], Notice) and collected[0].kind == NoticeKind.RATE_LIMITED
    assert collected[0].retry_after and 0 < collected[0].retry_after <= 60
    # Someone else is not limited.
    assert final_text(await replies(manager, message("hi", user="bob"))) == "echo: hi"


async def test_engine_down_keeps_the_message_and_says_so(config: Config, store: Store) -> None:
    manager = ConversationManager(config, store, ScriptedEngine(fail=True))
    collected = await replies(manager, message("are you there?"))
    notice = collected[-1]
    assert isinstance(notice, Notice) and notice.kind == NoticeKind.UNAVAILABLE
    exported = await store.people.export("test", "ann")
    assert [m.text for m in exported[0].messages] == ["are you there?"]


async def test_database_down_is_a_notice_not_a_crash(config: Config, store: Store) -> None:
    class Down:
        async def add_user_message(self, **_: Any) -> Any:
            raise StorageUnavailable("OperationalError")

        async def stats(self, *_: Any) -> Any:
            raise StorageUnavailable("OperationalError")

    class DownStore:
        conversations = people = Down()
        recent = RecentTurns(0)

    manager = ConversationManager(config, DownStore(), ScriptedEngine())  # type: ignore[arg-type]
    for text in ("hello", "/stats"):
        collected = await replies(manager, message(text))
        assert isinstance(collected[-1], Notice) and collected[-1].kind == NoticeKind.UNAVAILABLE


async def test_unexpected_errors_become_a_generic_notice(config: Config, store: Store) -> None:
    engine = ScriptedEngine(reply=lambda turns: 1 / 0)  # type: ignore[arg-type,return-value]
    manager = ConversationManager(config, store, engine)
    collected = await replies(manager, message("boom"))
    assert isinstance(collected[-1], Notice) and collected[-1].kind == NoticeKind.ERROR
    assert "ZeroDivision" not in collected[-1].text
    assert (
        final_text(
            await replies(ConversationManager(config, store, ScriptedEngine()), message("ok"))
        )
        == "echo: ok"
    )


async def test_close_lets_replies_in_flight_finish_then_refuses(
    config: Config, store: Store
) -> None:
    engine = ScriptedEngine(delay=lambda: 0.1)
    manager = ConversationManager(config, store, engine)
    in_flight = asyncio.create_task(replies(manager, message("finish me")))
    await engine.started.wait()
    await manager.close(grace=5)
    assert final_text(await in_flight) == "echo: finish me"
    late = await replies(manager, message("too late"))
    assert isinstance(late[0], Notice) and late[0].kind == NoticeKind.UNAVAILABLE


async def test_close_cancels_what_outlives_the_grace_period(config: Config, store: Store) -> None:
    engine = ScriptedEngine()
    engine.release = asyncio.Event()
    manager = ConversationManager(config, store, engine)
    stuck = asyncio.create_task(replies(manager, message("never finishes")))
    await engine.started.wait()
    await manager.close(grace=0.05)
    collected = await asyncio.wait_for(stuck, 5)
    assert isinstance(collected[-1], Notice) and collected[-1].kind == NoticeKind.CANCELLED


async def test_a_caller_that_goes_away_stops_the_generation(config: Config, store: Store) -> None:
    engine = ScriptedEngine()
    engine.release = asyncio.Event()
    manager = ConversationManager(config, store, engine)
    consumer = asyncio.create_task(replies(manager, message("I will hang up")))
    await engine.started.wait()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await eventually(lambda: engine.streams_closed == 1)  # told to stop, not left running
    # The conversation is free again at once: the next message is answered.
    engine.release = None
    collected = await asyncio.wait_for(replies(manager, message("hello again")), 5)
    assert final_text(collected) == "echo: hello again"


async def test_a_reply_that_cannot_be_stored_still_reaches_the_user(
    config: Config, store: Store
) -> None:
    async def reply_store_down(**_: Any) -> Any:
        raise StorageUnavailable("OperationalError")

    store.conversations.add_bot_message = reply_store_down  # type: ignore[method-assign]
    manager = ConversationManager(config, store, ScriptedEngine())
    assert final_text(await replies(manager, message("still there?"))) == "echo: still there?"
    exported = await store.people.export("test", "ann")
    assert [m.text for m in exported[0].messages] == ["still there?"]


async def test_a_reply_that_takes_longer_than_timeout_s_is_given_up(
    make_config: Callable[..., Config], store: Store
) -> None:
    """The engine hangs: past `text.timeout_s` the user gets a notice, the
    engine's stream is closed (so it drops the request) and the next message
    is answered."""
    config = make_config(text={"timeout_s": 0.2})
    engine = ScriptedEngine()
    engine.release = asyncio.Event()  # never set for the first message
    manager = ConversationManager(config, store, engine)
    collected = await replies(manager, message("are you stuck?"))
    assert isinstance(collected[-1], Notice) and collected[-1].kind is NoticeKind.UNAVAILABLE
    assert "too long" in collected[-1].text
    assert engine.streams_closed == 1
    engine.release.set()
    assert final_text(await replies(manager, message("hello again"))) == "echo: hello again"
