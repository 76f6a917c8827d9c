"""The Telegram channel end to end: the real run path (`bot.app.serve` in
process, and once `aigc-bot run` as a subprocess; the manager, the tiny model,
SQLite) against a fake Bot API server on 127.0.0.1
(tests/fakes/telegram_server.py), reached through `[telegram] base_url`.

Every test also checks the logs: the bot token is in no record at INFO or
above, and in none at all once redacted the way `aigc-bot run` redacts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.engine_doubles import ScriptedEngine
from support.eventually import eventually
from support.fakes.telegram_server import FakeBotApi
from support.services import scripted_services

import adapters.telegram.outbound as outbound
from adapters.outbound import DeliveryOrder
from adapters.splitting import split_message
from adapters.telegram import TelegramChannel
from adapters.telegram.outbound import PacedRateLimiter
from bot.app import BotApp, serve
from bot.channels import Services, StartupError
from bot.config import Config
from bot.logging_setup import REDACTED, RedactingFilter
from bot.messages import Image, Incoming, Notice, NoticeKind, Reply, Text, Typing
from bot.texts import INTERNAL_ERROR, TEXT_ONLY
from storage import Store

TOKEN = "123456789:AAFake-token_for-tests-only-0123456789"
GROUP = -1001234567890


class _Records(logging.Handler):
    """Every record as formatted text (with traceback), with its level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, self.format(record)))

    def above(self, level: int) -> str:
        return "\n".join(text for levelno, text in self.lines if levelno >= level)

    @property
    def text(self) -> str:
        return self.above(logging.DEBUG)


@pytest.fixture(autouse=True)
def logs() -> Iterator[_Records]:
    """All logging at DEBUG. Afterwards the token must appear in no record at
    INFO or above, and at DEBUG (PTB logs its API URLs there) nowhere once
    `aigc-bot run`'s redacting filter has seen it."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("aiosqlite", "asyncio", "alembic")}
    raw, redacted = _Records(), _Records()
    redacted.addFilter(RedactingFilter())
    root.handlers[:] = [raw, redacted]  # in this order: the filter rewrites the record
    root.setLevel(logging.DEBUG)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield raw
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    assert TOKEN not in raw.above(logging.INFO), "the bot token was logged at INFO or above"
    assert TOKEN not in redacted.text, "the bot token reached the logs unredacted"


@pytest.fixture
async def api() -> AsyncIterator[FakeBotApi]:
    fake = FakeBotApi(TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def tg_config(
    make_config: Callable[..., Config], api: FakeBotApi, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Config]:
    """A config whose Telegram channel talks to the fake server (web off)."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)

    def factory(**telegram: Any) -> Config:
        return make_config(
            telegram={"enabled": True, "base_url": api.base_url, **telegram},
            web={"enabled": False},
            text={"greedy": True},
        )

    return factory


@asynccontextmanager
async def serving(config: Config, api: FakeBotApi) -> AsyncIterator[None]:
    """`bot.app.serve` (what `aigc-bot run` runs) until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    ready = asyncio.create_task(
        api.wait_until(lambda: api.called("getUpdates") or bool(api.webhook_url))
    )
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
        raise AssertionError("serve() returned before the Telegram channel started")
    await ready
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def stored_texts(config: Config, user_id: int) -> list[tuple[str, str]]:
    """(role, text) of everything stored for a Telegram user, oldest first."""
    store = await Store.open(config.storage.url)
    try:
        conversations = await store.people.export("telegram", str(user_id))
    finally:
        await store.close()
    return [(m.role, m.text) for c in conversations for m in c.messages]


# -- private chats ----------------------------------------------------------------------


async def test_thirty_private_chats_at_once_each_get_their_own_answer(
    api: FakeBotApi, tg_config: Callable[..., Config]
) -> None:
    config = tg_config()
    users = list(range(1001, 1031))
    async with serving(config, api):
        for user in users:
            api.private_message(user, f"hello, I am user number {user - 1000}")
        await api.wait_until(lambda: all(api.texts(user) for user in users), within=30)
        await api.settle(0.3)
    # The menu is the command registry: everything a member may run.
    assert [c["command"] for c in api.commands] == [
        "start",
        "help",
        "reset",
        "forget",
        "draw",
        "stats",
        "cancel",
    ]
    for user in users:
        sent = api.sent("sendMessage", user)
        assert len(sent) == 1, f"user {user} got {len(sent)} messages"
        assert sent[0].reply_to is None  # no reply threading in a private chat
        assert api.sent("sendChatAction", user), "no typing indicator"
        stored = await stored_texts(config, user)
        assert stored == [("user", f"hello, I am user number {user - 1000}"), ("bot", sent[0].text)]


async def test_commands_reset_stats_forget(
    api: FakeBotApi, tg_config: Callable[..., Config]
) -> None:
    config = tg_config()
    user = 2001
    steps: list[tuple[str, str | None]] = [
        ("hi there", None),
        ("/stats", "1 messages, 1 replies, 1 conversations"),
        ("/reset", "Started a new conversation"),
        ("how are you?", None),
        ("/stats", "2 messages, 2 replies, 2 conversations"),
        ("/forget", "(4 messages, 0 pictures)"),
        ("/stats", "0 messages, 0 replies, 0 conversations"),
    ]
    async with serving(config, api):
        for count, (text, expected) in enumerate(steps, start=1):
            api.private_message(user, text)
            await api.wait_until(lambda count=count: len(api.texts(user)) >= count)
            if expected is not None:
                assert expected in api.texts(user)[-1]
    assert await stored_texts(config, user) == []


async def test_replies_of_one_chat_keep_the_order_of_its_messages(
    api: FakeBotApi, tg_config: Callable[..., Config]
) -> None:
    """A command is answered at once by the manager, but its reply still waits
    for the answers to the messages before it."""
    user = 2101
    async with serving(tg_config(), api):
        for text in ("first question", "second question", "/help", "third question"):
            api.private_message(user, text)
        await api.wait_until(lambda: len(api.texts(user)) >= 4, within=20)
    texts = api.texts(user)
    assert len(texts) == 4
    assert "/reset" in texts[2] and all("/reset" not in texts[i] for i in (0, 1, 3))


async def test_stickers_voice_edits_and_long_input(
    api: FakeBotApi, tg_config: Callable[..., Config]
) -> None:
    user = 4001
    async with serving(tg_config(), api):
        chat = api.private_chat(user)
        api.sticker(chat, user)
        api.voice(chat, user)
        help_message = api.private_message(user, "/help")
        api.edit(help_message, "/start")  # ignored: edited_messages = "ignore"
        api.private_message(user, "x" * 2500)
        api.sticker(api.group_chat(GROUP), 7)  # a group sticker nobody addressed to the bot
        await api.wait_until(lambda: len(api.texts(user)) >= 4)
        await api.settle(1.2)
    texts = api.texts(user)
    assert texts[:2] == [TEXT_ONLY, TEXT_ONLY]
    assert "/draw" in texts[2]
    assert "too long" in texts[3] and "2,000" in texts[3]
    assert len(texts) == 4
    assert api.allowed_updates == ["message"]
    assert api.texts(GROUP) == []


# -- groups ---------------------------------------------------------------------------


async def test_group_answers_only_when_addressed_and_threads_the_reply(
    api: FakeBotApi, tg_config: Callable[..., Config]
) -> None:
    config = tg_config()
    me = "@" + api.username
    async with serving(config, api):
        api.group_message(GROUP, 5, "just chatting among ourselves")
        api.group_message(GROUP, 5, "/help@some_other_bot")
        mention = api.group_message(GROUP, 5, f"{me}, hello there")
        await api.wait_until(lambda: len(api.texts(GROUP)) >= 1)
        await api.settle(0.5)
        first = api.sent("sendMessage", GROUP)
        assert len(first) == 1 and first[0].reply_to == mention["message_id"]

        reply = api.group_message(GROUP, 6, "what do you mean?", reply_to=first[0])
        command = api.group_message(GROUP, 7, f"/help{me}")
        plain_command = api.group_message(GROUP, 8, "/stats")
        await api.wait_until(lambda: len(api.texts(GROUP)) >= 4)
        await api.settle(0.5)
    sent = api.sent("sendMessage", GROUP)
    assert len(sent) == 4
    replied = {call.reply_to for call in sent[1:]}
    assert replied == {reply["message_id"], command["message_id"], plain_command["message_id"]}
    assert any("/reset" in (call.text or "") for call in sent)
    # The mention is stripped before the text reaches the manager; unaddressed text is not stored.
    assert (await stored_texts(config, 5))[0] == ("user", "hello there")
    assert len(await stored_texts(config, 5)) == 2
    assert [role for role, _ in await stored_texts(config, 6)] == ["user", "bot"]


async def test_group_keywords_address_the_bot_and_a_chat_can_share_one_history(
    api: FakeBotApi, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[telegram] keywords` make "bot, ..." a message for the bot (the
    keyword is not part of what it hears, "botany" is not "bot"), and
    `[bot] chat_history_scope` makes this group share one history while
    others keep one per person."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    engine = ScriptedEngine(lambda turns: f"heard {len(turns)}: {turns[-1]}")
    config = make_config(
        telegram={"enabled": True, "base_url": api.base_url, "keywords": ["bot,", "hey bot"]},
        web={"enabled": False},
        bot={"chat_history_scope": {f"telegram:{GROUP}": "chat"}},
    )
    async with BotApp(config, engine=engine) as app:
        [channel] = app.build_channels()
        await channel.start()
        try:
            api.group_message(GROUP, 5, "botany is fun")
            api.group_message(GROUP, 5, "Bot, what time is it?")
            await api.wait_until(lambda: len(api.texts(GROUP)) >= 1)
            api.group_message(GROUP, 6, "hey bot and for me?")
            await api.wait_until(lambda: len(api.texts(GROUP)) >= 2)
            api.group_message(-100777, 5, "bot, another group")
            api.group_message(-100777, 6, "bot, me too")
            await api.wait_until(lambda: len(api.texts(-100777)) >= 2)
            await api.settle(0.3)
        finally:
            await channel.stop()
    assert api.texts(GROUP) == ["heard 1: what time is it?", "heard 3: and for me?"]
    assert sorted(api.texts(-100777)) == ["heard 1: another group", "heard 1: me too"]


# -- rendering ------------------------------------------------------------------------


def long_reply() -> str:
    paragraphs = [
        " ".join(f"word{p}_{w}" for w in range(180)) + "\n" + "a second line of paragraph " + str(p)
        for p in range(6)
    ]
    code = "```python\n" + "\n".join(f"print({n})" for n in range(40)) + "\n```"
    return "\n\n".join([*paragraphs[:3], code, *paragraphs[3:]])


async def test_long_reply_arrives_whole_in_parts_with_typing_meanwhile(
    api: FakeBotApi, tg_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbound.TelegramTarget, "typing_every_s", 0.2)
    reply = long_reply()
    assert len(reply) > 2 * 4096
    user = 5001
    engine = ScriptedEngine(lambda turns: reply, delay=lambda: 1.0)
    async with BotApp(tg_config(), engine=engine) as app:
        [channel] = app.build_channels()
        await channel.start()
        try:
            api.private_message(user, "tell me everything")
            await api.wait_until(lambda: "".join(api.texts(user)) == reply, within=20)
        finally:
            await channel.stop()
    parts = api.texts(user)
    assert len(parts) >= 3
    assert all(len(part) <= 4096 for part in parts)
    assert parts == split_message(reply, 4096)
    first_text = api.sent("sendMessage", user)[0].at
    typing = [call for call in api.sent("sendChatAction", user) if call.at < first_text]
    assert len(typing) >= 3 and typing[0].params["action"] == "typing"
    assert not api.called("editMessageText")  # partial texts are not shown


async def test_pictures_progress_notices_and_a_failing_update(
    api: FakeBotApi, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendering, driven by a scripted handler in place of the manager."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64

    async def handle(incoming: Incoming) -> AsyncIterator[Reply]:
        if incoming.text == "boom":
            raise RuntimeError("a bug in a handler")
        yield Notice("You're number 2 in the queue.", NoticeKind.QUEUED, ref="d1")
        yield Notice("Drawing: 10%", NoticeKind.PROGRESS, ref="d1")
        yield Notice("Drawing: 20%", NoticeKind.PROGRESS, ref="d1")  # too soon: skipped
        yield Notice("Drawing: 30%", NoticeKind.PROGRESS)  # cannot be edited in place: skipped
        yield Typing()
        yield Image(png, caption="a red fox", seed=1234, draw_id="d1")

    config = make_config(telegram={"enabled": True, "base_url": api.base_url})
    services = scripted_services(config, handle)
    channel = TelegramChannel.create(services)
    assert channel is not None
    await channel.start()
    try:
        api.group_message(GROUP, 9, "/draw@" + api.username + " boom")
        api.private_message(9, "boom")
        api.private_message(9, "/draw a red fox")
        await api.wait_until(lambda: bool(api.sent("sendPhoto", 9)) and bool(api.texts(9)))
    finally:
        await channel.stop()
    [photo] = api.sent("sendPhoto", 9)
    assert "seed 1234" in photo.params["caption"] and "a red fox" in photo.params["caption"]
    assert api.texts(9) == [INTERNAL_ERROR, "You're number 2 in the queue."]
    [edit] = api.sent("editMessageText", 9)
    assert edit.text == "Drawing: 10%" and edit.params["message_id"] == str(
        api.sent("sendMessage", 9)[1].message_id
    )
    [deleted] = api.sent("deleteMessage", 9)  # the picture replaces its progress notice
    assert deleted.params["message_id"] == edit.params["message_id"]
    [group_photo] = api.sent("sendPhoto", GROUP)
    assert group_photo.reply_to is not None


# -- limits and failures ----------------------------------------------------------------


async def test_429_is_retried_after_retry_after_and_502_with_backoff(
    api: FakeBotApi, tg_config: Callable[..., Config]
) -> None:
    async with serving(tg_config(), api):
        api.fail_next("sendMessage", status=429, retry_after=1)
        api.private_message(6001, "/help")
        await api.wait_until(lambda: bool(api.texts(6001)))
        api.fail_next("sendMessage", status=502, times=2)
        api.private_message(6002, "/start")
        await api.wait_until(lambda: bool(api.texts(6002)))
    failed = [call for call in api.calls if call.method == "sendMessage" and call.status != 200]
    assert [call.status for call in failed] == [429, 502, 502]
    assert api.sent("sendMessage", 6001)[0].at - failed[0].at >= 1.0
    assert len(api.texts(6001)) == 1 and len(api.texts(6002)) == 1


async def test_per_chat_pace() -> None:
    """About one request a second per chat, in call order; other chats unaffected."""
    limiter = PacedRateLimiter(per_chat_interval_s=0.2)
    started: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()

    async def call(chat_id: int) -> bool:
        started.append((chat_id, loop.time()))
        return True

    async def send(chat_id: int) -> Any:
        return await limiter.process_request(
            call, (chat_id,), {}, "sendMessage", {"chat_id": chat_id}, None
        )

    begin = loop.time()
    await asyncio.gather(send(1), send(1), send(1), send(2))
    times = {chat: [t - begin for c, t in started if c == chat] for chat in (1, 2)}
    assert times[2][0] < 0.1
    assert times[1][0] < 0.1 and 0.18 < times[1][1] < 0.3 and 0.38 < times[1][2] < 0.5


def test_reply_order_is_fifo_per_key() -> None:
    async def scenario() -> tuple[list[str], int]:
        order = DeliveryOrder()
        done: list[str] = []

        async def answer(name: str, delay: float, turn: Any) -> None:
            await asyncio.sleep(delay)
            await turn.wait()
            done.append(name)
            turn.done()

        turns = [order.take("a"), order.take("b"), order.take("a")]
        await asyncio.gather(
            answer("a1", 0.05, turns[0]), answer("b1", 0.02, turns[1]), answer("a2", 0.0, turns[2])
        )
        return done, len(order)

    done, left = asyncio.run(scenario())
    assert done == ["b1", "a1", "a2"] and left == 0


# -- modes, start-up and secrets --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_webhook_mode_with_secret_and_edited_messages_answered(
    api: FakeBotApi, tg_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", "s3cret-webhook-token")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/telegram/hook"
    config = tg_config(
        mode="webhook",
        webhook_url=url,
        webhook_listen="127.0.0.1",
        webhook_port=port,
        edited_messages="answer",
    )
    async with serving(config, api):
        assert api.webhook_url == url and api.webhook_secret == "s3cret-webhook-token"
        assert api.allowed_updates == ["message", "edited_message"]
        message = api.private_message(7001, "/help")
        await api.wait_until(lambda: len(api.texts(7001)) >= 1)
        api.edit(message, "/start")
        await api.wait_until(lambda: len(api.texts(7001)) >= 2)
        async with aiohttp.ClientSession() as session:
            forged = {
                "update_id": 999,
                "message": api.message(api.private_chat(7002), 7002, text="/help"),
            }
            async with session.post(url, json=forged) as response:
                assert response.status == 403
    assert api.texts(7001)[1] == config.bot.welcome
    assert api.texts(7002) == []
    assert not api.called("getUpdates")


def _services(config: Config) -> Services:
    async def handle(incoming: Incoming) -> AsyncIterator[Reply]:
        yield Text("unused")

    return scripted_services(config, handle)


def test_channel_is_off_without_token_or_when_disabled(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, logs: _Records
) -> None:
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    assert TelegramChannel.create(_services(make_config(telegram={"enabled": True}))) is None
    assert "the env var TELEGRAM_BOT_TOKEN ([telegram] token_env) is not set" in logs.text
    assert TelegramChannel.create(_services(make_config(telegram={"enabled": False}))) is None
    assert "[telegram] enabled = false" in logs.text
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    with pytest.raises(StartupError, match="webhook_url"):
        TelegramChannel.create(
            _services(make_config(telegram={"enabled": True, "mode": "webhook"}))
        )


async def test_token_is_redacted_and_httpx_kept_quiet(
    api: FakeBotApi, tg_config: Callable[..., Config], logs: _Records
) -> None:
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    async with serving(tg_config(), api):
        api.private_message(8001, "/help")
        await api.wait_until(lambda: bool(api.texts(8001)))
    assert logging.getLogger("httpx").level == logging.WARNING
    assert "telegram channel: @" + api.username in logs.text
    # Whatever slips through (a traceback with a URL) is redacted by `aigc-bot run`'s filter.
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "GET %s", (api.base_url + TOKEN,), None
    )
    RedactingFilter().filter(record)
    assert record.getMessage() == f"GET {api.base_url}{REDACTED}"


async def test_a_rejected_token_turns_telegram_off_with_one_loud_line(
    api: FakeBotApi,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    logs: _Records,
) -> None:
    """The Bot API refuses the token: the channel is off (and says why on
    /healthz), the web channel keeps serving, and the token is never shown."""
    import aiohttp
    from support.net import free_port

    wrong = TOKEN.replace("AAFake", "AAWrong")
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", wrong)
    port = free_port()
    config = make_config(
        telegram={"enabled": True, "base_url": api.base_url}, web={"enabled": True, "port": port}
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    try:
        await eventually(lambda: "channel is off" in logs.above(logging.ERROR))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/api/sessions") as response:
                assert response.status == 201
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    [line] = [text for level, text in logs.lines if level >= logging.ERROR]
    assert "rejected the token in $TELEGRAM_BOT_TOKEN" in line and "\n" not in line
    assert wrong not in logs.above(logging.INFO)


async def test_an_unreachable_bot_api_is_retried_until_it_answers(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Bot API at start: the channel keeps trying with backoff and serves
    once the API is there."""
    from support.net import free_port

    monkeypatch.setattr(TelegramChannel, "first_backoff_s", 0.1)
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    port = free_port()
    late = FakeBotApi(TOKEN)
    config = make_config(
        telegram={"enabled": True, "base_url": f"http://127.0.0.1:{port}/bot"},
        web={"enabled": False},
        text={"greedy": True},
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    try:
        await late.start(port=port)
        late.private_message(3001, "/help")
        await late.wait_until(lambda: bool(late.texts(3001)), within=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await late.close()


async def test_aigc_bot_run_answers_and_logs_no_token(
    api: FakeBotApi, bot_env: dict[str, str], tmp_path: Path
) -> None:
    """The command itself, with its own logging set-up, at DEBUG."""
    env = {
        **bot_env,
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "AIGC_BOT__TELEGRAM__ENABLED": "true",
        "AIGC_BOT__TELEGRAM__BASE_URL": api.base_url,
        "AIGC_BOT__WEB__ENABLED": "false",
    }
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "aigc-bot"),
            "--log-level",
            "DEBUG",
            "run",
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
        try:
            await api.wait_until(lambda: api.called("getUpdates"), within=90)
            api.private_message(9001, "/help")
            await api.wait_until(lambda: bool(api.texts(9001)))
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            returncode = await asyncio.wait_for(process.wait(), 60)
    output = log_path.read_text()
    assert returncode == 0, output[-2000:]
    assert "/reset" in api.texts(9001)[0]
    assert TOKEN not in output and REDACTED in output  # PTB logs its API URL at DEBUG
    assert "HTTP Request:" not in output  # httpx stays at WARNING
