"""SQLite's writer thread commits writes that queued together once
(storage.writer), and nobody hears back before their write is committed."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text as sql
from sqlalchemy.engine import Connection

from storage import StorageUnavailable, Store
from storage.writer import Writer


@pytest.fixture
async def store(tmp_path: Path):
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", busy_timeout_ms=200)
    try:
        yield opened
    finally:
        await opened.close()


def _writer(store: Store) -> Writer:
    assert store.db.writer is not None
    return store.db.writer


async def _held(store: Store) -> tuple[threading.Event, asyncio.Future[Any]]:
    """Occupy the writer thread until the event is set, so what comes next queues."""
    release, running = threading.Event(), threading.Event()

    def hold(connection: Connection) -> None:
        running.set()
        release.wait(10)

    blocker = asyncio.ensure_future(_writer(store).run("rows", hold))
    await asyncio.to_thread(running.wait, 10)
    return release, blocker


async def _say(store: Store, user: str, text: str) -> Any:
    return await store.conversations.add_user_message(
        platform="test", chat_id="c1", owner=user, user_id=user, user_name=user, text=text
    )


async def _stored(store: Store) -> list[str]:
    return [
        m.text
        for user in ("ann", "bob", "cy")
        for c in await store.people.export("test", user)
        for m in c.messages
    ]


async def test_writes_that_queue_together_share_one_commit(store: Store) -> None:
    release, blocker = await _held(store)
    before = _writer(store).commits
    says = [asyncio.ensure_future(_say(store, user, f"hi from {user}")) for user in ("ann", "bob")]
    await asyncio.sleep(0.05)
    assert not any(say.done() for say in says)  # nothing is answered before its commit
    release.set()
    await blocker
    await asyncio.gather(*says)
    assert _writer(store).commits - before == 2  # the blocker's, then one for both
    assert await _stored(store) == ["hi from ann", "hi from bob"]
    # committed for everyone, not just for the writer's connection
    outside = sqlite3.connect(str(store.db.sync_engine.url.database))  # type: ignore[union-attr]
    try:
        assert outside.execute("SELECT count(*) FROM messages").fetchone() == (2,)
    finally:
        outside.close()


async def test_one_failing_write_does_not_take_the_others_with_it(store: Store) -> None:
    def broken(connection: Connection) -> None:
        connection.execute(sql("UPDATE users SET user_name = 'x'"))
        raise ValueError("a bug in one write")

    release, blocker = await _held(store)
    ann = asyncio.ensure_future(_say(store, "ann", "one"))
    bad = asyncio.ensure_future(_writer(store).run("rows", broken))
    bob = asyncio.ensure_future(_say(store, "bob", "two"))
    await asyncio.sleep(0.05)
    release.set()
    await blocker
    await asyncio.gather(ann, bob)
    with pytest.raises(ValueError, match="a bug in one write"):
        await bad
    assert await _stored(store) == ["one", "two"]


async def test_a_locked_database_fails_the_group_then_writes_resume(
    store: Store, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "bot.db", isolation_level=None, timeout=5)
    release, blocker = await _held(store)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        says = [asyncio.ensure_future(_say(store, user, "while locked")) for user in ("ann", "bob")]
        await asyncio.sleep(0.05)
        release.set()
        await blocker  # it wrote nothing, so it needed no lock
        results = await asyncio.gather(*says, return_exceptions=True)
        assert all(isinstance(result, StorageUnavailable) for result in results)
    finally:
        other.execute("ROLLBACK")
        other.close()
    await _say(store, "cy", "after")
    assert await _stored(store) == ["after"]


async def test_a_write_whose_caller_left_before_it_ran_is_not_run(store: Store) -> None:
    ran = threading.Event()
    release, blocker = await _held(store)
    gone = asyncio.ensure_future(_writer(store).run("rows", lambda connection: ran.set()))
    await asyncio.sleep(0)
    gone.cancel()
    stays = asyncio.ensure_future(_say(store, "ann", "kept"))
    await asyncio.sleep(0.05)
    release.set()
    await blocker
    await stays
    assert not ran.is_set()
    assert await _stored(store) == ["kept"]


async def test_checkpoints_run_beside_the_writer(tmp_path: Path) -> None:
    """The checkpoint thread copies committed pages back into the database
    file (the writer's own checkpoint would not have: the WAL is far from its
    limit), and nothing is lost on the way."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    writer = _writer(store)
    writer.checkpoint_every = 4
    try:
        for index in range(40):
            await _say(store, f"user{index}", f"message {index}")
        seen = -1
        while seen != writer.checkpoints:  # until the last one is over
            seen = writer.checkpoints
            await asyncio.sleep(0.2)
        assert writer.checkpoints > 0
        shutil.copy(tmp_path / "bot.db", tmp_path / "file-only.db")  # without the WAL
    finally:
        await store.close()
    file_only = sqlite3.connect(tmp_path / "file-only.db")
    try:
        (in_file,) = file_only.execute("SELECT count(*) FROM messages").fetchone()
    finally:
        file_only.close()
    assert in_file >= 30
    reopened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    try:
        stored = [
            m.text
            for index in range(40)
            for c in await reopened.people.export("test", f"user{index}")
            for m in c.messages
        ]
    finally:
        await reopened.close()
    assert stored == [f"message {index}" for index in range(40)]


async def test_a_closed_store_refuses_writes_instead_of_hanging(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    await _say(store, "ann", "before")
    await store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(_say(store, "ann", "after"), 5)
