"""The store API against SQLite and PostgreSQL (the same tests, parametrised)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from storage import StorageUnavailable, Store
from storage.database import create_engine


async def _say(store: Store, user: str, text: str, chat: str = "c1", owner: str | None = None):
    intake = await store.conversations.add_user_message(
        platform="test",
        chat_id=chat,
        owner=user if owner is None else owner,
        user_id=user,
        user_name=user.title(),
        text=text,
    )
    return intake.message


# alembic and SQLAlchemy say they cannot compare the expression index; it has its own test
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based")
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
async def test_fresh_database_gets_the_schema(db_url: str) -> None:
    """Migrations bring a new database to the newest revision, and what they
    build is exactly what storage.models declares (no drift either way)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from storage.database import alembic_config
    from storage.models import Base

    store = await Store.open(db_url)
    try:
        async with store.engine.connect() as connection:
            version = await connection.scalar(text("SELECT version_num FROM alembic_version"))
            drift = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
            )
        assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert drift == []
        await store.ping()
    finally:
        await store.close()
    # Opening again is a no-op migration, not an error.
    await (await Store.open(db_url)).close()


async def test_history_is_read_through_its_index_not_sorted(db_url: str) -> None:
    """The newest-turn-first read uses ix_messages_turn_order (alembic cannot
    compare expression indexes, so the drift check above does not see it)."""
    from sqlalchemy.dialects import sqlite

    from storage.statements import HISTORY

    store = await Store.open(db_url)
    try:
        async with store.engine.connect() as connection:
            if store.engine.dialect.name == "sqlite":
                compiled = HISTORY.compile(dialect=sqlite.dialect())
                values = {"conversation_id": 1, "limit": 10}
                params = tuple(values.get(name, 0) for name in compiled.positiontup or ())
                result = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
                plan = result.all()
                details = " ".join(str(row[-1]) for row in plan)
                assert "ix_messages_turn_order" in details and "TEMP B-TREE" not in details
            else:
                names = await connection.scalars(
                    text("SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")
                )
                assert "ix_messages_turn_order" in set(names)
    finally:
        await store.close()


async def test_sqlite_uses_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x' / 'bot.db'}", busy_timeout_ms=1234)
    async with engine.connect() as connection:
        assert (await connection.scalar(text("PRAGMA journal_mode"))) == "wal"
        assert (await connection.scalar(text("PRAGMA busy_timeout"))) == 1234
        assert (await connection.scalar(text("PRAGMA foreign_keys"))) == 1
    await engine.dispose()


async def test_history_is_in_turn_order_and_bounded(store: Store) -> None:
    first = await _say(store, "ann", "hello")
    second = await _say(store, "ann", "are you there?")
    await store.conversations.add_bot_message(
        reply_to=first, platform="test", user_id="ann", text="hi ann"
    )
    await store.conversations.add_bot_message(
        reply_to=second, platform="test", user_id="ann", text="yes"
    )
    history = await store.conversations.history(first.conversation_id)
    assert [m.text for m in history] == ["hello", "hi ann", "are you there?", "yes"]
    # What came before the second message: the first exchange only.
    before = await store.conversations.history(first.conversation_id, before_id=second.id)
    assert [m.text for m in before] == ["hello", "hi ann"]
    assert [m.text for m in await store.conversations.history(first.conversation_id, limit=2)] == [
        "are you there?",
        "yes",
    ]


async def test_users_do_not_see_each_other(store: Store) -> None:
    ann = await _say(store, "ann", "I'm Ann")
    bob = await _say(store, "bob", "I'm Bob")
    assert ann.conversation_id != bob.conversation_id
    exported = await store.people.export("test", "ann")
    assert [[m.text for m in c.messages] for c in exported] == [["I'm Ann"]]


async def test_shared_chat_history_and_per_person_export(store: Store) -> None:
    ann = await _say(store, "ann", "hi all", owner="")
    await store.conversations.add_bot_message(
        reply_to=ann, platform="test", user_id="ann", text="hi Ann"
    )
    bob = await _say(store, "bob", "hello", owner="")
    assert ann.conversation_id == bob.conversation_id
    history = await store.conversations.history(bob.conversation_id)
    assert [m.text for m in history] == ["hi all", "hi Ann", "hello"]
    ann_export = await store.people.export("test", "ann")
    assert [(m.role, m.text) for m in ann_export[0].messages] == [
        ("user", "hi all"),
        ("bot", "hi Ann"),
    ]
    document = ann_export[0].as_dict()
    assert set(document) == {"chat_id", "started_at", "messages"}
    assert set(document["messages"][0]) == {"role", "text", "at"}
    assert document["messages"][0]["at"].endswith("Z")


async def test_reset_starts_a_new_conversation_and_keeps_the_old(store: Store) -> None:
    old = await _say(store, "ann", "first")
    assert await store.conversations.reset("test", "c1", "ann")
    new = await _say(store, "ann", "second")
    assert new.conversation_id != old.conversation_id
    assert [m.text for m in await store.conversations.active_history("test", "c1", "ann")] == [
        "second"
    ]
    assert len(await store.people.export("test", "ann")) == 2


async def test_forget_deletes_everything_about_one_person(store: Store) -> None:
    first = await _say(store, "ann", "secret")
    await store.conversations.add_bot_message(
        reply_to=first, platform="test", user_id="ann", text="ok"
    )
    await _say(store, "bob", "stays")
    await store.draws.add(
        public_id="d1",
        platform="test",
        chat_id="c1",
        user_id="ann",
        prompt="a cat",
        options={},
        seed=1,
    )
    await store.draws.finish("d1", status="done", image_path="/tmp/nonexistent-d1.png")
    result = await store.people.forget("test", "ann")
    assert result.messages == 2 and result.draws == 1
    assert result.image_paths == ["/tmp/nonexistent-d1.png"]
    assert await store.people.export("test", "ann") == []
    assert (await store.people.stats("test", "ann")).messages == 0
    assert [m.text for c in await store.people.export("test", "bob") for m in c.messages] == [
        "stays"
    ]


async def test_stats_count_messages_replies_and_conversations(store: Store) -> None:
    first = await _say(store, "ann", "one")
    await store.conversations.add_bot_message(
        reply_to=first, platform="test", user_id="ann", text="two"
    )
    await store.conversations.reset("test", "c1", "ann")
    await _say(store, "ann", "three")
    stats = await store.people.stats("test", "ann")
    assert (stats.messages, stats.replies, stats.conversations) == (2, 1, 2)
    assert stats.first_seen is not None


async def test_web_sessions_are_looked_up_by_hash(store: Store) -> None:
    await store.sessions.create("ab" * 32, "w123")
    assert await store.sessions.user_for("ab" * 32) == "w123"
    assert await store.sessions.user_for("cd" * 32) is None


async def test_concurrent_writers_do_not_lose_messages(store: Store) -> None:
    results = await asyncio.gather(*(_say(store, f"user{i}", f"message {i}") for i in range(40)))
    assert len({r.id for r in results}) == 40
    for i in range(40):
        exported = await store.people.export("test", f"user{i}")
        assert [m.text for c in exported for m in c.messages] == [f"message {i}"]


async def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(StorageUnavailable):
        await Store.open("postgresql+asyncpg://nobody@127.0.0.1:1/none")


async def test_database_going_away_raises_storage_unavailable(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    async with store.engine.begin() as connection:
        await connection.execute(text("DROP TABLE messages"))
    with pytest.raises(StorageUnavailable):
        await _say(store, "ann", "hello")
    await store.close()


async def test_two_processes_keep_one_conversation_in_order(postgres_url: str) -> None:
    """Two managers with their own connection pools (as two `aigc-bot run`
    processes would have) on one PostgreSQL serialise a conversation's turns."""
    from support.engine_doubles import ScriptedEngine, jitter

    from bot.config import Config
    from bot.manager import ConversationManager
    from bot.messages import Incoming

    config = Config.model_validate(
        {"storage": {"url": postgres_url}, "limits": {"messages_per_minute": 0}}
    )
    stores = [await Store.open(postgres_url) for _ in range(2)]
    engines = [ScriptedEngine(delay=jitter(0.005, 0.02)) for _ in range(2)]
    managers = [ConversationManager(config, s, e) for s, e in zip(stores, engines, strict=True)]

    async def send(index: int) -> None:
        incoming = Incoming("test", "room", "ann", "Ann", f"message {index}")
        [reply async for reply in managers[index % 2].handle(incoming)]

    try:
        await asyncio.gather(*(send(i) for i in range(10)))
        history = await stores[0].conversations.active_history("test", "room", "ann")
        prompts = sorted(engines[0].prompts + engines[1].prompts, key=len)
    finally:
        for opened in stores:
            await opened.close()
    assert len(history) == 20
    # Every prompt holds every earlier exchange: no two turns overlapped.
    for position, prompt in enumerate(prompts):
        assert len(prompt) == 2 * position + 1
        assert [m.text for m in history[: 2 * position]] == prompt[:-1]


async def test_sqlite_writers_queue_instead_of_timing_out(tmp_path: Path) -> None:
    """Many writers at once on SQLite: none waits out the busy timeout and fails."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", busy_timeout_ms=1)
    try:
        results = await asyncio.gather(
            *(_say(store, f"user{i % 8}", f"message {i}") for i in range(64)),
            return_exceptions=True,
        )
    finally:
        await store.close()
    assert [r for r in results if isinstance(r, BaseException)] == []
