"""The newest turns kept in memory (storage.history) never serve what the
database would not: against SQLite and PostgreSQL, with a second `Store` on
the same database standing in for another process (a CLI `forget`, another
`aigc-bot run`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from support.engine_doubles import ScriptedEngine

from bot.config import Config
from bot.manager import ConversationManager
from bot.messages import Incoming
from storage import Store, StoredMessage
from storage.history import RecentTurns


@pytest.fixture
async def other(db_url: str, store: Store):
    """Another process's store on the same database."""
    opened = await Store.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


async def _say(
    store: Store, user: str, text: str, *, owner: str | None = None, key: str | None = None
) -> StoredMessage:
    intake = await store.conversations.add_user_message(
        platform="test",
        chat_id="c1",
        owner=user if owner is None else owner,
        user_id=user,
        user_name=user.title(),
        text=text,
        dedup_key=key,
    )
    return intake.message


async def _answer(store: Store, message: StoredMessage, text: str) -> None:
    await store.conversations.add_bot_message(
        reply_to=message, platform="test", user_id="ann", text=text
    )


async def _recent(store: Store, message: StoredMessage, limit: int = 50) -> list[str]:
    """The prompt's history for `message`: what came before it."""
    history = await store.conversations.recent_history(
        message.conversation_id, before_id=message.id, limit=limit
    )
    return [m.text for m in history]


async def _same_as_database(store: Store, conversation_id: int, anchors: list[int]) -> None:
    for before_id in [None, *anchors]:
        for limit in (1, 2, 3, 5, 50):
            recent = await store.conversations.recent_history(
                conversation_id, before_id=before_id, limit=limit
            )
            read = await store.conversations.history(
                conversation_id, before_id=before_id, limit=limit
            )
            assert recent == read, (before_id, limit)


async def test_what_is_kept_is_what_the_database_reads(store: Store) -> None:
    first = await _say(store, "ann", "one")
    cid = first.conversation_id
    await _same_as_database(store, cid, [first.id])
    second = await _say(store, "ann", "two")
    # Replies stored out of order still sort right after what they answer.
    await _answer(store, second, "re two")
    await _answer(store, first, "re one")
    await store.conversations.add_operator_message(
        conversation_id=cid, platform="test", user_id="ann", operator="olga", text="a person"
    )
    third = await _say(store, "ann", "three", key="m3")
    again = await _say(store, "ann", "three", key="m3")  # a redelivery: stored once
    assert again.id == third.id
    await _same_as_database(store, cid, [first.id, second.id, third.id])
    assert await _recent(store, third) == ["one", "re one", "two", "re two", "a person"]
    assert store.recent.hits > 0  # and it was the memory that answered


async def test_a_write_from_another_process_is_seen(store: Store, other: Store) -> None:
    first = await _say(store, "ann", "hello")
    await _answer(store, first, "hi")
    later = await _say(store, "ann", "still there?")
    assert await _recent(store, later) == ["hello", "hi"]
    await other.conversations.add_operator_message(
        conversation_id=first.conversation_id,
        platform="test",
        user_id="ann",
        operator="olga",
        text="a person here",
    )
    await _answer(store, later, "yes")
    last = await _say(store, "ann", "who was that?")
    assert await _recent(store, last) == ["hello", "hi", "still there?", "yes", "a person here"]


async def test_postgresql_checks_before_it_trusts_what_it_holds(postgres_url: str) -> None:
    """Processes on PostgreSQL write to one conversation between one's writes."""
    one, two = await Store.open(postgres_url), await Store.open(postgres_url)
    try:
        first = await _say(one, "ann", "hello")
        assert await _recent(one, first) == []
        await _answer(two, first, "hi from two")
        history = await one.conversations.recent_history(first.conversation_id, limit=10)
        assert [m.text for m in history] == ["hello", "hi from two"]
    finally:
        await one.close()
        await two.close()


async def test_forget_in_another_process_is_never_served(store: Store, other: Store) -> None:
    ann = await _say(store, "ann", "ann's secret", owner="")
    await _answer(store, ann, "noted")
    bob = await _say(store, "bob", "hi", owner="")
    assert await _recent(store, bob) == ["ann's secret", "noted"]
    await other.people.forget("test", "ann")
    bob_again = await _say(store, "bob", "anyone?", owner="")
    assert await _recent(store, bob_again) == ["hi"]


async def test_a_conversation_deleted_and_started_again_starts_empty(
    store: Store, other: Store
) -> None:
    old = await _say(store, "ann", "before")
    await _answer(store, old, "ok")
    assert await _recent(store, await _say(store, "ann", "more")) == ["before", "ok"]
    await other.people.forget("test", "ann")  # the conversation goes, and its id may come back
    new = await _say(store, "ann", "after")
    if store.dialect == "sqlite":
        assert new.conversation_id == old.conversation_id  # SQLite reused the id
    assert await _recent(store, new) == []


async def _user_names(store: Store) -> list[tuple[str, str]]:
    async with store.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT user_id, user_name FROM users ORDER BY user_id")
        )
        return [(row[0], row[1]) for row in rows]


async def test_the_users_row_is_written_whenever_it_may_be_missing_or_old(
    store: Store, other: Store
) -> None:
    await _say(store, "ann", "one", owner="")
    await _say(store, "ann", "two", owner="")  # known now: not written again
    await store.conversations.add_user_message(
        platform="test", chat_id="c1", owner="", user_id="ann", user_name="Annie", text="three"
    )
    assert await _user_names(store) == [("ann", "Annie")]
    await _say(store, "bob", "hi", owner="")
    await other.people.forget("test", "ann")  # another process deletes ann's row
    assert await _user_names(store) == [("bob", "Bob")]
    await _say(store, "ann", "back again", owner="")
    assert await _user_names(store) == [("ann", "Ann"), ("bob", "Bob")]
    assert (await store.people.stats("test", "ann")).first_seen is not None


async def test_memory_is_bounded_and_can_be_off(db_url: str) -> None:
    store = await Store.open(db_url, history_cache=2)
    try:
        messages = [await _say(store, f"user{i}", f"hello {i}") for i in range(3)]
        for message in messages:
            await _recent(store, message)
        assert len(store.recent) == 2
        assert await _recent(store, messages[0]) == []
        store.recent.resize(0)
        assert len(store.recent) == 0
        await _answer(store, messages[0], "hi")
        later = await _say(store, "user0", "again")
        assert await _recent(store, later) == ["hello 0", "hi"]
        assert len(store.recent) == 0
    finally:
        await store.close()


# -- through the manager ---------------------------------------------------------------


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(limits={"messages_per_minute": 0})


def _message(text: str, user: str = "ann", **extra: Any) -> Incoming:
    return Incoming("test", "chat1", user, user.title(), text, **extra)


async def _send(manager: ConversationManager, incoming: Incoming) -> None:
    [reply async for reply in manager.handle(incoming)]


async def test_the_prompt_after_reset_forget_and_a_retry(config: Config) -> None:
    store = await Store.open(config.storage.url)
    engine = ScriptedEngine()
    manager = ConversationManager(config, store, engine)
    try:
        await _send(manager, _message("one", message_id="1"))
        await _send(manager, _message("one", message_id="1"))  # delivered twice
        await _send(manager, _message("two"))
        assert engine.prompts[-1] == ["one", "echo: one", "two"]
        await _send(manager, _message("/reset"))
        await _send(manager, _message("three"))
        assert engine.prompts[-1] == ["three"]
        await _send(manager, _message("/forget"))
        await _send(manager, _message("four"))
        assert engine.prompts[-1] == ["four"]
        assert store.recent.hits > 0
    finally:
        await store.close()


async def test_the_prompt_holds_what_another_process_wrote(config: Config) -> None:
    store, elsewhere = await Store.open(config.storage.url), await Store.open(config.storage.url)
    engine = ScriptedEngine()
    manager = ConversationManager(config, store, engine)
    try:
        await _send(manager, _message("hello"))
        await _send(manager, _message("hello again"))
        (conversation,) = await elsewhere.people.export("test", "ann")
        place = await elsewhere.conversations.active_history("test", "chat1", "ann")
        await elsewhere.conversations.add_operator_message(
            conversation_id=place[0].conversation_id,
            platform="test",
            user_id="ann",
            operator="olga",
            text="olga here",
        )
        await _send(manager, _message("thanks"))
        assert engine.prompts[-1][-2:] == ["olga here", "thanks"]
        assert len(conversation.messages) == 4
    finally:
        await store.close()
        await elsewhere.close()


# -- RecentTurns itself ----------------------------------------------------------------


def _m(id_: int, text: str = "") -> StoredMessage:
    return StoredMessage(id_, 7, "user", text or str(id_), datetime.now(UTC))


def test_a_window_the_entry_does_not_wholly_hold_is_a_miss() -> None:
    recent = RecentTurns(4)
    # the newest 3 of a longer conversation: ids 10, 11 and a reply 12 to 10
    recent.fill(7, 5, [((10, 10), _m(10)), ((10, 12), _m(12)), ((11, 11), _m(11))], asked=3)
    assert [m.id for m in recent.read(7, None, 3) or []] == [10, 12, 11]
    assert [m.id for m in recent.read(7, 11, 2) or []] == [10, 12]
    assert recent.read(7, 11, 3) is None  # older messages exist that it does not hold
    recent.fill(7, 5, [((10, 10), _m(10))], asked=3)  # fewer than asked: all there is
    assert [m.id for m in recent.read(7, 11, 3) or []] == [10]


def test_a_write_that_found_another_version_drops_the_entry() -> None:
    recent = RecentTurns(4)
    recent.started(("test", "c", "ann"), 7, 0)
    recent.wrote(7, 0, 1, _m(1))
    assert [m.id for m in recent.read(7, None, 5) or []] == [1]
    recent.wrote(7, 3, 4, _m(4))  # versions 2 and 3 were someone else's
    assert recent.read(7, None, 5) is None
    recent.fill(7, 4, [((1, 1), _m(1)), ((4, 4), _m(4))], asked=10)
    recent.wrote(7, 3, 4, _m(4))  # the fill read after this write: nothing to add
    assert [m.id for m in recent.read(7, None, 5) or []] == [1, 4]


def test_older_than_the_window_is_left_out_and_the_window_stays_bounded() -> None:
    recent = RecentTurns(4)
    recent.fill(7, 1, [((5, 5), _m(5)), ((6, 6), _m(6))], asked=2)
    recent.wants(7, 2)  # reads ask for 2: keep those and FILL_SLACK more
    recent.wrote(7, 1, 2, _m(9), reply_to_id=3)  # answers a message before the window
    assert [m.id for m in recent.read(7, None, 2) or []] == [5, 6]
    for version, id_ in enumerate(range(10, 40), start=2):
        recent.wrote(7, version, version + 1, _m(id_))
    entry_ids = [m.id for m in recent.read(7, None, 18) or []]
    assert entry_ids == list(range(22, 40))
    assert recent.read(7, None, 19) is None  # trimmed to what was asked, plus slack


def test_an_unknown_outcome_drops_the_conversation_written_under_a_key() -> None:
    recent = RecentTurns(4)
    recent.started(("test", "c", "ann"), 7, 0)
    recent.drop_key(("test", "c", "ann"))
    assert recent.read(7, None, 1) is None


def test_a_crowded_chat_forgets_who_it_knows_rather_than_grow() -> None:
    from storage.history import MAX_KNOWN_USERS

    recent = RecentTurns(4)
    key = ("test", "group", "")
    recent.started(key, 7, 0)
    for index in range(MAX_KNOWN_USERS + 10):
        recent.wrote(7, index, index + 1, _m(index + 1), user=(f"u{index}", "U"))
    assert recent.known_user(key, (f"u{MAX_KNOWN_USERS + 9}", "U")) is not None
    assert recent.known_user(key, ("u0", "U")) is None  # written again next time
