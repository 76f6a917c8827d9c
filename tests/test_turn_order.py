"""Turns of one conversation run in arrival order even across processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.engine_doubles import ScriptedEngine

from bot.config import Config
from bot.manager import ConversationManager
from bot.messages import MODEL, Incoming, Text, Typing
from storage import Store


def slow_to_lock(store: Store) -> Store:
    """A process that is slow to ask for the conversation's lock (a new pool
    connection, a busy event loop) after committing its message."""
    turn_lock = store.turns.lock

    @contextlib.asynccontextmanager
    async def slow(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        await asyncio.sleep(0.3)
        async with turn_lock(*args, **kwargs) as lock:
            yield lock

    store.turns.lock = slow  # type: ignore[method-assign]
    return store


async def test_an_earlier_message_goes_first_even_if_its_process_is_slower(
    postgres_url: str,
) -> None:
    config = Config.model_validate(
        {"storage": {"url": postgres_url}, "limits": {"messages_per_minute": 0}}
    )
    slow = slow_to_lock(await Store.open(postgres_url))
    fast = await Store.open(postgres_url)
    engines = [ScriptedEngine(), ScriptedEngine()]
    managers = [
        ConversationManager(config, slow, engines[0]),
        ConversationManager(config, fast, engines[1]),
    ]
    try:
        first = managers[0].handle(Incoming("test", "room", "ann", "Ann", "first"))
        assert isinstance(await anext(first), Typing)  # "first" is committed

        async def rest_of_first() -> None:
            async for _ in first:
                pass

        async def second() -> None:
            async for _ in managers[1].handle(Incoming("test", "room", "ann", "Ann", "second")):
                pass

        await asyncio.gather(rest_of_first(), second())
    finally:
        await slow.close()
        await fast.close()
    assert engines[0].prompts == [["first"]]
    assert engines[1].prompts == [["first", "echo: first", "second"]]


async def _turn_done(store: Store, message_id: int) -> bool:
    from sqlalchemy import text

    async with store.engine.connect() as connection:
        return bool(
            await connection.scalar(
                text("SELECT turn_done FROM messages WHERE id = :id"), {"id": message_id}
            )
        )


async def test_a_reply_or_a_failure_ends_the_turn(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        answered = (
            await store.conversations.add_user_message(
                platform="test", chat_id="c", owner="ann", user_id="ann", user_name="Ann", text="hi"
            )
        ).message
        failed = (
            await store.conversations.add_user_message(
                platform="test", chat_id="c", owner="ann", user_id="ann", user_name="Ann", text="yo"
            )
        ).message
        assert not await _turn_done(store, answered.id)
        await store.conversations.add_bot_message(
            reply_to=answered, platform="test", user_id="ann", text="hey"
        )
        await store.turns.finish(failed)
        assert await _turn_done(store, answered.id) and await _turn_done(store, failed.id)
    finally:
        await store.close()


async def test_a_failed_turn_does_not_hold_up_the_next_one(postgres_url: str) -> None:
    """The engine fails on the first message: its turn is still marked over,
    so the next message (from another process) does not wait for it."""
    config = Config.model_validate(
        {"storage": {"url": postgres_url}, "limits": {"messages_per_minute": 0}}
    )
    stores = [await Store.open(postgres_url), await Store.open(postgres_url)]
    broken, working = ScriptedEngine(fail=True), ScriptedEngine()
    try:
        failing = ConversationManager(config, stores[0], broken)
        [_ async for _ in failing.handle(Incoming("test", "room", "bob", "Bob", "first"))]
        loop = asyncio.get_running_loop()
        started = loop.time()
        manager = ConversationManager(config, stores[1], working)
        [_ async for _ in manager.handle(Incoming("test", "room", "bob", "Bob", "second"))]
        assert loop.time() - started < 5  # TURN_WAIT_S is 30
        history = await stores[1].conversations.active_history("test", "room", "bob")
        assert all([await _turn_done(stores[1], m.id) for m in history])
    finally:
        for store in stores:
            await store.close()
    assert working.prompts == [["first", "second"]]


async def test_a_turn_left_unfinished_by_a_dead_process_is_waited_for_only_so_long(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import bot.turns

    monkeypatch.setattr(bot.turns, "TURN_WAIT_S", 0.3)
    config = Config.model_validate(
        {"storage": {"url": postgres_url}, "limits": {"messages_per_minute": 0}}
    )
    store = await Store.open(postgres_url)
    engine = ScriptedEngine()
    try:
        # committed by a process that died before its turn
        orphan = (
            await store.conversations.add_user_message(
                platform="test",
                chat_id="room",
                owner="cy",
                user_id="cy",
                user_name="Cy",
                text="lost",
            )
        ).message
        manager = ConversationManager(config, store, engine)
        replies = [r async for r in manager.handle(Incoming("test", "room", "cy", "Cy", "hello"))]
    finally:
        await store.close()
    assert replies[-1] == Text("echo: hello", final=True, source=MODEL)
    assert engine.prompts == [["lost", "hello"]]
    assert f"unfinished earlier message {orphan.id}" in caplog.text


def test_the_migration_keeps_existing_messages_and_marks_their_turns_over(
    tmp_path: Path,
) -> None:
    from alembic import command
    from sqlalchemy import create_engine, text

    from storage.database import alembic_config

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO conversations (id, platform, chat_id, owner, active, started_at) "
                "VALUES (1, 'test', 'c', 'ann', 1, '2026-01-01 00:00:00')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO messages (id, conversation_id, platform, user_id, role, text, "
                "created_at) VALUES (1, 1, 'test', 'ann', 'user', 'old hello', "
                "'2026-01-01 00:00:00')"
            )
        )
        command.upgrade(config, "head")
        row = connection.execute(text("SELECT text, turn_done FROM messages")).one()
    engine.dispose()
    assert tuple(row) == ("old hello", 1)
