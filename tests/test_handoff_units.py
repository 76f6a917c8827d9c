"""Handoff parts on their own: trigger phrases, office hours, operator tokens,
the state machine on SQLite and PostgreSQL (two operators in two "processes"
claiming at once), the unanswered streak, and notifications retried against a
local server that fails first."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from bot.bus import LocalBus
from bot.commands import CommandRegistry
from bot.config import Config
from bot.config.handoff import DEFAULT_TRIGGERS
from bot.delivery import Delivery
from bot.errors import StartupError
from bot.handoff import Conflict, HandoffService, InvalidRequest, NotFound
from bot.handoff.hours import HoursError, OfficeHours
from bot.handoff.notify import Notifier, RetryPolicy
from bot.handoff.operators import Operators, OperatorTokensError, parse_tokens
from bot.handoff.triggers import Triggers
from bot.logging_setup import REDACTED, redact
from bot.messages import Incoming, Notice
from bot.metrics import Metrics
from storage import Store

TOKENS = "anna:anna-token-0123456789abcdef,ben:ben-token-0123456789abcdef"

# -- triggers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I want to talk to a human",
        "TALK TO A HUMAN please",
        "can I talk  to\na human?",
        "Agent!",
        "get me an agent, now",
        "Is there a real person there?",
        "customer service, please",
    ],
)
def test_trigger_phrases_match_whole_words_in_any_case(text: str) -> None:
    assert Triggers(DEFAULT_TRIGGERS)(text)


@pytest.mark.parametrize(
    "text",
    [
        "agents of change",
        "a reagent for chemistry",
        "the operators manual",
        "humane treatment",
        "tell me about your products",
        "",
    ],
)
def test_words_that_only_contain_a_trigger_do_not_match(text: str) -> None:
    assert not Triggers(DEFAULT_TRIGGERS)(text)


def test_trigger_phrases_are_literal_and_may_be_empty() -> None:
    assert Triggers(["c++ help"])("need C++ help")
    assert not Triggers(["c++ help"])("need c help")
    assert not Triggers([])("talk to a human")
    assert not Triggers(["  "])("anything")


# -- hours -----------------------------------------------------------------------------

# 2027-03-01 is a Monday.
MONDAY_NOON = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2027, 3, day, hour, minute, tzinfo=UTC)


def test_office_hours_open_and_closed() -> None:
    hours = OfficeHours(["Mon-Fri 09:00-17:00", "Sat 10:00-14:00"])
    assert hours.is_open(MONDAY_NOON)
    assert hours.is_open(at(1, 9, 0)) and not hours.is_open(at(1, 17, 0))
    assert not hours.is_open(at(1, 8, 59))
    assert hours.is_open(at(6, 11)) and not hours.is_open(at(7, 11))  # Saturday, Sunday
    assert hours.describe_next(at(1, 7)) == "today at 09:00 (UTC)"
    assert hours.describe_next(at(1, 18)) == "tomorrow at 09:00 (UTC)"
    assert hours.describe_next(at(6, 15)) == "on Monday at 09:00 (UTC)"
    assert OfficeHours([]).is_open(MONDAY_NOON) and OfficeHours([]).next_open(MONDAY_NOON) is None


def test_office_hours_past_midnight_wrapping_days_and_time_zones() -> None:
    night = OfficeHours(["Fri-Sun 22:00-02:00"])
    assert night.is_open(at(5, 23)) and night.is_open(at(6, 1, 59))  # Fri 23:00, Sat 01:59
    assert night.is_open(at(8, 1))  # Monday 01:00 is still Sunday night
    assert not night.is_open(at(8, 3)) and not night.is_open(at(4, 23))  # Mon 03:00, Thu 23:00
    berlin = OfficeHours(["Mon-Fri 09:00-17:00"], "Europe/Berlin")  # UTC+1 in March
    assert berlin.is_open(at(1, 8, 30)) and not berlin.is_open(at(1, 16, 30))
    assert berlin.describe_next(at(1, 17)) == "tomorrow at 09:00 (Europe/Berlin)"
    assert OfficeHours(["Mon 00:00-24:00"]).is_open(at(1, 23, 59))


@pytest.mark.parametrize("entry", ["Mon-Fry 09:00-17:00", "Mon 09:00-09:00", "Mon 25:00-26:00"])
def test_bad_hours_are_refused_by_the_config_and_the_parser(entry: str) -> None:
    with pytest.raises(ValueError):
        Config.model_validate({"handoff": {"hours": [entry]}})
    with pytest.raises(HoursError):
        OfficeHours([entry])


# -- operator tokens ---------------------------------------------------------------------


def test_operator_tokens_authenticate_and_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TEST_OPERATORS", " anna:anna-token-0123456789abcdef , ben:ben-token-0123456789abcdef,"
    )
    operators = Operators.from_env("TEST_OPERATORS")
    assert operators.names == ["anna", "ben"]
    assert operators.authenticate("anna-token-0123456789abcdef") == "anna"
    assert operators.authenticate("ben-token-0123456789abcdef") == "ben"
    for bad in ("", "anna", "anna-token-0123456789abcde", "anna:anna-token-0123456789abcdef"):
        assert operators.authenticate(bad) is None
    # read like every secret: registered for redaction
    assert redact("token anna-token-0123456789abcdef") == f"token {REDACTED}"
    assert len(Operators.from_env("TEST_OPERATORS_UNSET")) == 0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("anna", "entry 1 is not name:token"),
        ("anna:", "entry 1 is not name:token"),
        ("anna:x y", "contains a space"),
        ("anna:same-token-0123456789,ben:same-token-0123456789", "repeats"),
        ("<b>:token-0123456789abcdef", "a name is"),
    ],
)
def test_bad_operator_tokens_are_named_without_the_token(value: str, problem: str) -> None:
    with pytest.raises(OperatorTokensError) as raised:
        parse_tokens(value, "OPS")
    assert problem in str(raised.value)
    assert "0123456789" not in str(raised.value)


def test_short_tokens_work_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert [name for name, _ in parse_tokens("anna:short", "OPS")] == ["anna"]
    assert "could be guessed" in caplog.text and "short" not in caplog.text.replace("shorter", "")


# -- the service around a store ---------------------------------------------------------


def web_incoming(user: str, text: str = "hello") -> Incoming:
    return Incoming(platform="web", chat_id=user, user_id=user, user_name="web visitor", text=text)


async def user_says(store: Store, user: str, text: str) -> int:
    intake = await store.conversations.add_user_message(
        platform="web", chat_id=user, owner=user, user_id=user, user_name="Visitor " + user,
        text=text,
    )  # fmt: skip
    await store.turns.finish(intake.message)
    return intake.message.conversation_id


def service_for(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    web: dict[str, Any] | None = None,
    **handoff: Any,
) -> tuple[HandoffService, Metrics]:
    monkeypatch.setenv("AIGC_BOT_OPERATOR_TOKENS", TOKENS)
    config = Config.model_validate({"handoff": handoff, "web": web or {"port": 0}})
    metrics = Metrics()
    service = HandoffService.create(
        config, store, Delivery(store, metrics), LocalBus(), CommandRegistry(), metrics
    )
    assert service is not None
    return service, metrics


def metric(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def test_states_move_bot_waiting_claimed_bot_with_an_audit_trail(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, metrics = service_for(store, monkeypatch)
    desk = service.desk
    await service.start()
    try:
        cid = await user_says(store, "w1", "my parcel is lost")
        replies = await service.request(web_incoming("w1"), cid, "command")
        assert replies == [Notice(service.what_happens_next())]
        assert "A person will answer here soon" in replies[0].text
        assert await service.request(web_incoming("w1"), cid, "phrase") == []  # told once
        again = await service.request(web_incoming("w1"), cid, "command")
        assert "queue" in again[0].text  # an explicit /human gets a status
        assert metric(metrics, "aigc_bot_handoffs_total", {"trigger": "command"}) == 1
        assert metric(metrics, "aigc_bot_handoff_waiting") == 1

        [waiting] = await desk.list("waiting")
        assert (waiting.id, waiting.state, waiting.last_text) == (
            cid,
            "waiting",
            "my parcel is lost",
        )
        assert waiting.user_name == "Visitor w1" and waiting.user_id == "w1"

        claimed = await desk.claim(cid, "anna")
        assert (claimed.state, claimed.operator) == ("claimed", "anna")
        assert (await desk.claim(cid, "anna")).operator == "anna"  # again: a no-op
        with pytest.raises(Conflict) as conflict:
            await desk.claim(cid, "ben")
        assert conflict.value.conversation.operator == "anna"
        with pytest.raises(Conflict):
            await desk.release(cid, "ben")
        assert metric(metrics, "aigc_bot_handoff_waiting") == 0
        assert metric(metrics, "aigc_bot_handoff_time_to_claim_seconds_count") == 1

        released = await desk.release(cid, "anna")
        assert (released.state, released.operator) == ("bot", None)
        assert (await desk.release(cid, "anna")).state == "bot"  # again: a no-op
        audit = (await desk.transcript(cid)).audit
        assert [(e.state, e.operator, e.reason) for e in audit] == [
            ("waiting", None, "command"),
            ("claimed", "anna", "claim"),
            ("bot", "anna", "release"),
        ]
        with pytest.raises(NotFound):
            await desk.claim(cid + 1000, "anna")
        with pytest.raises(InvalidRequest):
            await desk.list("everything")
    finally:
        await service.close()


async def test_the_user_gives_it_back_and_the_unanswered_streak_hands_over(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, metrics = service_for(store, monkeypatch, after_unanswered=2)
    cid = await user_says(store, "w2", "hm")
    assert not await service.note_outcome(cid, answered=False)
    assert not await service.note_outcome(cid, answered=True)  # an answer resets the count
    assert not await service.note_outcome(cid, answered=False)
    assert await service.note_outcome(cid, answered=False)
    await service.request(web_incoming("w2"), cid, "unanswered")
    assert not await service.note_outcome(cid, answered=False)  # the request reset the count
    await service.desk.claim(cid, "ben")
    [back] = await service.give_back(web_incoming("w2", "/cancel"), cid)
    assert "back with me" in back.text
    view = await service.desk.conversation(cid)
    assert (view.state, view.operator) == ("bot", None)
    assert metric(metrics, "aigc_bot_handoffs_total", {"trigger": "unanswered"}) == 1


async def test_outside_hours_the_user_is_told_when_people_are_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, _ = service_for(store, monkeypatch, hours=["Sat 10:00-11:00"], timezone="UTC")
    text = service.what_happens_next(MONDAY_NOON)
    assert text.startswith("Our team is away right now; people are back on Saturday at 10:00 (UTC)")
    assert service.what_happens_next(at(6, 10, 30)) == service.what_happens_next(at(6, 10, 59))
    assert "soon" in service.what_happens_next(at(6, 10, 30))


async def test_off_without_operator_tokens_and_loud_with_bad_ones(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config.model_validate({})
    args = (config, store, Delivery(store), LocalBus(), CommandRegistry())
    monkeypatch.delenv("AIGC_BOT_OPERATOR_TOKENS", raising=False)
    with caplog.at_level(logging.INFO):
        assert HandoffService.create(*args) is None
    assert "AIGC_BOT_OPERATOR_TOKENS" in caplog.text
    monkeypatch.setenv("AIGC_BOT_OPERATOR_TOKENS", "anna")
    with pytest.raises(StartupError, match="operator_tokens_env"):
        HandoffService.create(*args)
    off = Config.model_validate({"handoff": {"enabled": False}})
    assert HandoffService.create(off, store, Delivery(store), LocalBus(), CommandRegistry()) is None
    commands = CommandRegistry()
    monkeypatch.setenv("AIGC_BOT_OPERATOR_TOKENS", TOKENS)
    assert HandoffService.create(config, store, Delivery(store), LocalBus(), commands) is not None
    assert commands.get("human") is not None


async def test_two_operators_claiming_at_once_from_two_processes(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each store stands for a process: its own connection pool, its own bus."""
    first, second = await Store.open(postgres_url), await Store.open(postgres_url)
    try:
        one, _ = service_for(first, monkeypatch)
        two, _ = service_for(second, monkeypatch)
        for round_number in range(8):
            cid = await user_says(first, f"race{round_number}", "help!")
            await one.request(web_incoming(f"race{round_number}"), cid, "phrase")
            results = await asyncio.gather(
                one.desk.claim(cid, "anna"), two.desk.claim(cid, "ben"), return_exceptions=True
            )
            won = [r for r in results if not isinstance(r, BaseException)]
            lost = [r for r in results if isinstance(r, BaseException)]
            assert len(won) == 1 and len(lost) == 1, results
            assert isinstance(lost[0], Conflict)
            assert lost[0].conversation.operator == won[0].operator
            audit = (await one.desk.transcript(cid)).audit
            assert [e.state for e in audit] == ["waiting", "claimed"]  # one claim, not two
    finally:
        await first.close()
        await second.close()


# -- notifications -------------------------------------------------------------------------


class Hook:
    """A notify_url that fails the first `failures` POSTs with 503."""

    def __init__(self, failures: int, status: int = 503) -> None:
        self.failures = failures
        self.status = status
        self.bodies: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        if len(self.bodies) <= self.failures:
            return web.json_response({"error": "busy"}, status=self.status)
        self.arrived.set()
        return web.json_response({"ok": True})

    async def __aenter__(self) -> Hook:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


FAST = RetryPolicy(attempts=4, first_delay_s=0.01, max_delay_s=0.05, timeout_s=5)


async def test_notify_url_is_retried_with_backoff_until_it_takes_the_notice() -> None:
    async with Hook(failures=2) as hook:
        notifier = Notifier(None, notify_url=hook.url, policy=FAST)
        await notifier.start()
        try:
            assert await notifier.post({"conversation_id": 7, "text": "hi"})
        finally:
            await notifier.close()
    assert len(hook.bodies) == 3 and all(body["conversation_id"] == 7 for body in hook.bodies)


async def test_notify_url_gives_up_after_its_attempts_and_on_a_final_answer() -> None:
    async with Hook(failures=100) as hook:
        notifier = Notifier(None, notify_url=hook.url, policy=FAST)
        await notifier.start()
        try:
            assert not await notifier.post({"n": 1})
        finally:
            await notifier.close()
    assert len(hook.bodies) == 4
    async with Hook(failures=100, status=404) as hook:
        notifier = Notifier(None, notify_url=hook.url, policy=FAST)
        await notifier.start()
        try:
            assert not await notifier.post({"n": 1})
        finally:
            await notifier.close()
    assert len(hook.bodies) == 1  # a 404 will not get better


def test_backoff_doubles_up_to_its_maximum_and_honours_retry_after() -> None:
    policy = RetryPolicy(first_delay_s=1.0, max_delay_s=8.0)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)):
        assert ceiling / 2 <= policy.delay(attempt) <= ceiling
    assert policy.delay(1, retry_after=5.0) == 5.0
    assert policy.delay(1, retry_after=500.0) == 8.0


async def test_a_conversation_that_starts_waiting_is_posted_once_with_its_details(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Hook(failures=1) as hook:
        web = {"public_url": "https://shop.example/help/"}
        service, _ = service_for(store, monkeypatch, web, notify_url=hook.url)
        service.notifier.policy = FAST
        await service.start()
        try:
            cid = await user_says(store, "w9", "where is my order #123?")
            await service.request(web_incoming("w9"), cid, "phrase")
            await asyncio.wait_for(hook.arrived.wait(), 10)
        finally:
            await service.close()
    body = hook.bodies[-1]
    assert body["conversation_id"] == cid and body["platform"] == "web"
    assert body["user_name"] == "Visitor w9" and body["last_text"] == "where is my order #123?"
    assert body["trigger"] == "phrase" and body["event"] == "handoff.waiting"
    assert body["console_url"] == f"https://shop.example/help/operator#conversation={cid}"
    assert "where is my order" in body["text"]
