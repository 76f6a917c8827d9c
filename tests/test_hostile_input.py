"""Any text is safe (#16.2): the hostile corpus (tests/support/hostile.py)
through every channel, end to end.

The web API (JSON and Server-Sent Events; in the `Idempotency-Key` header; as
bodies that are not UTF-8) on SQLite and PostgreSQL, the Telegram fake
(messages, captions, user names), the Discord fake (content, display names)
and the console. For every entry: no 5xx and no crash; the text is stored and
returned (history, export) as sent, except the documented change
(`stored_form`: lone surrogates and NUL become U+FFFD, the ends are trimmed);
nothing pings anyone on Discord; replies are plain text (JSON on the web, no
`parse_mode` on Telegram). The echo engine answers `echo: <text>`, so the
hostile text goes out again through every outbound path as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select
from support.engine_doubles import ScriptedEngine
from support.fakes.discord_server import FakeDiscord
from support.fakes.telegram_server import FakeBotApi
from support.hostile import (
    EMPTY_AFTER_TRIM,
    HOSTILE,
    HOSTILE_IDEMPOTENCY_KEYS,
    INVALID_UTF8_BODIES,
    RAW_JSON_STRINGS,
    json_body,
    stored_form,
)
from support.web_support import parse_sse

from adapters.console import ConsoleChannel
from adapters.discord import DiscordChannel
from adapters.web import WebChannel
from bot.app import BotApp
from bot.config import Config
from bot.text_safety import REPLACEMENT, safe_text
from bot.texts import EMPTY, TEXT_ONLY
from storage import Store
from storage.models import User

TELEGRAM_TOKEN = "123456789:AAHostile-input-test-token-000000000"
DISCORD_TOKEN = "hostile-discord-token-0123"
SSE = {"Accept": "text/event-stream"}
NON_EMPTY = [name for name in HOSTILE if name not in EMPTY_AFTER_TRIM]


def echo(text: str) -> str:
    return f"echo: {text}"


def echo_engine() -> ScriptedEngine:
    """Answers `echo: <the message>`: the hostile text goes out again."""
    return ScriptedEngine(lambda turns: echo(turns[-1]))


def roomy(make_config: Callable[..., Config], **sections: dict[str, Any]) -> Config:
    """Room for the corpus: 10,000-character words fit, no rate limits."""
    base: dict[str, dict[str, Any]] = {
        "bot": {"max_input_chars": 20_000},
        "web": {"max_body_bytes": 1 << 20, "sessions_per_minute": 0},
        "limits": {"messages_per_minute": 0},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return make_config(**base)


async def exported(store: Store, platform: str, user_id: str) -> list[tuple[str, str]]:
    conversations = await store.people.export(platform, user_id)
    return [(m.role, m.text) for c in conversations for m in c.messages]


async def user_names(store: Store, platform: str) -> dict[str, str]:
    def work(session: Any) -> dict[str, str]:
        rows = session.execute(
            select(User.user_id, User.user_name).where(User.platform == platform)
        )
        return {user_id: name for user_id, name in rows}

    return await store.db.read(work)


# -- the corpus itself -----------------------------------------------------------------


def test_the_corpus_covers_what_the_issue_names() -> None:
    joined = "".join(HOSTILE.values())
    for needle in ("\ud800", "\x00", "\ufeff", "\u202e", "\u200d", "@everyone", "@here", "<@&"):
        assert needle in joined, needle
    assert any(len(text) >= 10_000 and " " not in text for text in HOSTILE.values())
    assert max(text.count("\u0336") for text in HOSTILE.values()) >= 80  # zalgo
    assert "only_whitespace" in EMPTY_AFTER_TRIM
    assert stored_form("\ud800x\x00") == f"{REPLACEMENT}x{REPLACEMENT}"


# -- web ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def web_bot(config: Config, engine: Any = None) -> AsyncIterator[tuple[BotApp, str]]:
    async with BotApp(config, engine=engine or echo_engine()) as app:
        channel = WebChannel.create(app.services)
        assert channel is not None
        await channel.start()
        try:
            yield app, f"http://127.0.0.1:{channel.port}"
        finally:
            await channel.stop()


async def new_session(http: aiohttp.ClientSession) -> dict[str, str]:
    async with http.post("/api/sessions") as response:
        assert response.status == 201
        token = (await response.json())["session"]
    return {"Authorization": f"Bearer {token}"}


async def post_raw(
    http: aiohttp.ClientSession, auth: dict[str, str], body: bytes, **headers: str
) -> tuple[int, str, str]:
    all_headers = {"Content-Type": "application/json", **auth, **headers}
    async with http.post("/api/messages", data=body, headers=all_headers) as response:
        return response.status, response.content_type, await response.text()


async def history_of(http: aiohttp.ClientSession, auth: dict[str, str]) -> list[tuple[str, str]]:
    async with http.get("/api/messages", headers=auth) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        return [(m["role"], m["text"]) for m in (await response.json())["messages"]]


def expected_history(names: list[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for name in names:
        if name not in EMPTY_AFTER_TRIM:
            text = stored_form(HOSTILE[name])
            pairs += [("user", text), ("bot", echo(text))]
    return pairs


async def test_web_api_stores_and_returns_every_hostile_text(
    make_config: Callable[..., Config], db_url: str
) -> None:
    config = roomy(make_config, storage={"url": db_url})
    async with web_bot(config) as (app, url), aiohttp.ClientSession(base_url=url) as http:
        plain, streamed = await new_session(http), await new_session(http)
        for name, text in HOSTILE.items():
            body = json_body({"text": text})
            status, kind, answer = await post_raw(http, plain, body)
            if name in EMPTY_AFTER_TRIM:
                assert status == 400 and "empty" in json.loads(answer)["error"], (name, answer)
                continue
            assert status == 200, (name, answer)
            assert kind == "application/json", name
            final = {"type": "text", "text": echo(stored_form(text)), "source": {"kind": "model"}}
            assert json.loads(answer) == {"replies": [final]}, name

            status, kind, answer = await post_raw(http, streamed, body, **SSE)
            assert status == 200 and kind == "text/event-stream", (name, answer)
            events = parse_sse(answer)
            assert events[-2:] == [("text", final), ("done", {"replies": [final]})], name
            assert {event for event, _ in events} <= {"typing", "partial", "text", "done"}, name

        assert await history_of(http, plain) == expected_history(list(HOSTILE))
        assert await history_of(http, streamed) == expected_history(list(HOSTILE))
        assert app.store is not None
        web_users = await user_names(app.store, "web")
        assert len(web_users) == 2
        for user_id in web_users:  # `aigc-bot export` reads the same rows
            stored = await exported(app.store, "web", user_id)
            assert stored == expected_history(list(HOSTILE)), user_id


async def test_json_escapes_as_clients_send_them(make_config: Callable[..., Config]) -> None:
    """`"\\ud800"` and friends written as JSON escapes, the way a browser's
    JSON.stringify or a careless client sends them."""
    async with (
        web_bot(roomy(make_config)) as (_, url),
        aiohttp.ClientSession(base_url=url) as http,
    ):
        auth = await new_session(http)
        sent = []
        for name, literal in RAW_JSON_STRINGS.items():
            meant = json.loads(literal)
            body = b'{"text": ' + literal.encode("ascii") + b"}"
            for headers in ({}, SSE):
                status, _, answer = await post_raw(http, auth, body, **headers)
                assert status == 200, (name, answer)
            sent += [stored_form(meant)] * 2
        history = await history_of(http, auth)
    assert [text for role, text in history if role == "user"] == sent
    assert "😀" in sent and f"x{REPLACEMENT}y" in sent and f"a{REPLACEMENT}b" in sent
    assert "\ufeffhi" in sent  # a BOM is kept as sent


async def test_bodies_that_are_not_utf8_are_400_json(make_config: Callable[..., Config]) -> None:
    async with (
        web_bot(roomy(make_config)) as (_, url),
        aiohttp.ClientSession(base_url=url) as http,
    ):
        auth = await new_session(http)
        for name, body in INVALID_UTF8_BODIES.items():
            for headers in ({}, SSE):
                status, kind, answer = await post_raw(http, auth, body, **headers)
                assert status == 400, (name, status, answer)
                assert kind == "application/json" and json.loads(answer)["error"], name
        # a body in the charset it declares is read in that charset
        status, _, answer = await post_raw(
            http,
            auth,
            b'{"text": "caf\xe9"}',
            **{"Content-Type": "application/json; charset=latin-1"},
        )
        assert status == 200, answer
        assert await history_of(http, auth) == [("user", "café"), ("bot", echo("café"))]


async def test_a_body_in_an_unknown_charset_is_400_json(make_config: Callable[..., Config]) -> None:
    async with (
        web_bot(roomy(make_config)) as (_, url),
        aiohttp.ClientSession(base_url=url) as http,
    ):
        auth = await new_session(http)
        for charset in ("does-not-exist", "rot13"):
            content_type = f"application/json; charset={charset}"
            status, kind, answer = await post_raw(
                http, auth, b'{"text": "hi"}', **{"Content-Type": content_type}
            )
            assert status == 400, (charset, status, answer)
            assert kind == "application/json", charset


async def test_hostile_idempotency_keys(make_config: Callable[..., Config]) -> None:
    """Printable ASCII keys work however they look (a retry gets the first
    answer, nothing is stored twice); anything else is a 400, never a 5xx."""
    async with (
        web_bot(roomy(make_config)) as (_, url),
        aiohttp.ClientSession(base_url=url) as http,
    ):
        auth = await new_session(http)
        for index, key in enumerate(HOSTILE_IDEMPOTENCY_KEYS):
            body = json_body({"text": f"message {index}"})
            first = await post_raw(http, auth, body, **{"Idempotency-Key": key})
            again = await post_raw(http, auth, body, **{"Idempotency-Key": key})
            assert first[0] == again[0] == 200, (key, first, again)
            assert json.loads(first[2]) == json.loads(again[2]), key
        expected = [
            pair
            for index in range(len(HOSTILE_IDEMPOTENCY_KEYS))
            for pair in (("user", f"message {index}"), ("bot", echo(f"message {index}")))
        ]
        assert await history_of(http, auth) == expected

        # values a client library would refuse to send: written on the socket
        token = auth["Authorization"].removeprefix("Bearer ")
        refused: list[bytes] = [
            b"x" * 201,
            "é".encode(),
            b"\xff\xfe",
            b"\xed\xa0\x80",
            "👩‍👩‍👧".encode(),
            b"tab\tinside",
            b" ",
        ]
        for value in refused:
            status, body = await raw_post(url, token, value, b'{"text": "hi"}')
            assert 400 <= status < 500, (value, status, body)
            if status == 400 and body.startswith(b"{"):
                assert json.loads(body)["error"]
        for value in (b"nul\x00inside", b"\x01\x02"):
            status, body = await raw_post(url, token, value, b'{"text": "hi"}')
            assert 400 <= status < 500, (value, status, body)
        assert await history_of(http, auth) == expected  # nothing refused was stored


async def raw_post(url: str, token: str, key: bytes, body: bytes) -> tuple[int, bytes]:
    """POST /api/messages with these exact header bytes; (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /api/messages HTTP/1.1\r\n"
            + f"Host: {host}:{port}\r\n".encode()
            + f"Authorization: Bearer {token}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + b"Idempotency-Key: "
            + key
            + b"\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


async def test_the_tiny_model_takes_every_hostile_text(
    make_config: Callable[..., Config],
) -> None:
    """The real engine (tokenizer, prompt budget, generation) on the corpus:
    always a text reply, never a crash."""
    config = roomy(make_config, text={"greedy": True, "max_new_tokens": 4})
    async with BotApp(config) as app:
        assert app.manager is not None
        from bot.messages import Incoming, Notice, Text

        for name in NON_EMPTY:
            incoming = Incoming("console", "tiny", "tiny", "tiny", HOSTILE[name])
            replies = [reply async for reply in app.manager.handle(incoming)]
            finals = [r for r in replies if isinstance(r, Text) and r.final]
            assert len(finals) == 1, (name, replies)
            assert not any(isinstance(r, Notice) for r in replies), (name, replies)
            assert finals[0].text.strip(), name
            assert safe_text(finals[0].text) == finals[0].text, name


# -- Telegram ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def channel_bot(config: Config, only: str) -> AsyncIterator[Any]:
    """The channel `only` on a BotApp with the echo engine, started as
    `aigc-bot run` starts it; yields the channel."""
    async with BotApp(config, engine=echo_engine()) as app:
        [channel] = app.build_channels(only=only)
        await channel.start()
        try:
            yield channel
        finally:
            await channel.stop()


def telegram_user(user_id: int, name: str) -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": name, "last_name": "\ud800Last"}


async def test_telegram_messages_captions_and_user_names(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TELEGRAM_TOKEN)
    api = FakeBotApi(TELEGRAM_TOKEN)
    await api.start()
    config = roomy(
        make_config,
        telegram={"enabled": True, "base_url": api.base_url},
        web={"enabled": False},
    )
    names = list(HOSTILE)
    users = {name: 50_000 + index for index, name in enumerate(names)}
    photo = [{"file_id": "p", "file_unique_id": "p", "width": 8, "height": 8}]
    try:
        async with channel_bot(config, "telegram"):
            await api.wait_until(lambda: api.called("getUpdates"), within=30)
            for name, user in users.items():
                chat = api.private_chat(user)
                sender = telegram_user(user, HOSTILE[name][:64])
                # entities as Telegram marks them: none here (the fake cannot
                # count UTF-16 offsets through a lone surrogate)
                api.push(
                    api.message(chat, user, text=HOSTILE[name], entities=[], **{"from": sender})
                )
                captioned = api.private_chat(user + 100_000)
                sender = telegram_user(user + 100_000, HOSTILE[name][:64])
                api.push(
                    api.message(
                        captioned, user, photo=photo, caption=HOSTILE[name], **{"from": sender}
                    )
                )
            await api.wait_until(
                lambda: (
                    all(api.texts(user) for user in users.values())
                    and all(api.texts(user + 100_000) for user in users.values())
                ),
                within=60,
            )
        store = await Store.open(config.storage.url)
        try:
            stored_names = await user_names(store, "telegram")
            for name, user in users.items():
                text = stored_form(HOSTILE[name])
                sent = api.sent("sendMessage", user)
                for call in api.sent("sendMessage"):
                    assert "parse_mode" not in call.params, call.params
                    assert len(call.text or "") <= 4096
                if name in EMPTY_AFTER_TRIM:
                    assert await exported(store, "telegram", str(user)) == [], name
                    assert [call.text for call in sent] == [EMPTY], name
                    continue
                assert await exported(store, "telegram", str(user)) == [
                    ("user", text),
                    ("bot", echo(text)),
                ], name
                assert "".join(call.text or "" for call in sent) == echo(text), name
                full_name = f"{HOSTILE[name][:64]} \ud800Last"
                assert stored_names[str(user)] == safe_text(full_name), name
                # a caption is answered with "text only", and nothing is stored
                assert api.texts(user + 100_000) == [TEXT_ONLY], name
                assert await exported(store, "telegram", str(user + 100_000)) == []
        finally:
            await store.close()
    finally:
        await api.close()


# -- Discord -------------------------------------------------------------------------


@pytest.fixture
def discord_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_BOT_TOKEN", DISCORD_TOKEN)
    monkeypatch.setattr(DiscordChannel, "guild_ready_timeout_s", 0.1)


def allows_no_pings(payload: dict[str, Any]) -> bool:
    """Nobody but (at most) the author of the message answered can be pinged."""
    allowed = payload.get("allowed_mentions")
    return (
        allowed is not None
        and allowed.get("parse") == []
        and not allowed.get("users")
        and not allowed.get("roles")
    )


async def test_discord_content_and_display_names(
    make_config: Callable[..., Config], discord_env: None
) -> None:
    fake = await FakeDiscord(token=DISCORD_TOKEN).start()
    config = roomy(
        make_config,
        discord={"enabled": True, "api_base_url": fake.api_base, "gateway_url": fake.gateway_url},
        web={"enabled": False},
    )
    authors: dict[str, dict[str, Any]] = {}
    asked: dict[str, str] = {}
    try:
        async with channel_bot(config, "discord"):
            for name, text in HOSTILE.items():
                author_id = fake.snowflake()
                author = {
                    "id": str(author_id),
                    "username": f"user{author_id}",
                    "global_name": text[:32],
                    "discriminator": "0",
                    "avatar": None,
                    "bot": False,
                    "public_flags": 0,
                }
                authors[name] = author
                message = await fake.user_message(
                    f"<@{fake.bot['id']}> {text}",
                    author=author,
                    mention_bot=True,
                    mention_everyone="@everyone" in text,
                )
                asked[name] = message["id"]

            def answered() -> bool:
                replied = {
                    str(post.json.get("message_reference", {}).get("message_id"))
                    for post in fake.posts(fake.channel_id)
                }
                return set(asked.values()) <= replied

            await fake.wait_for(answered, within_s=60)
        posts = fake.posts(fake.channel_id)
        assert posts and all(allows_no_pings(post.json) for post in posts), [
            post.json.get("allowed_mentions") for post in posts
        ]
        assert all(len(post.json.get("content") or "") <= 2000 for post in posts)
        for edit in fake.calls("PATCH", r"/channels/\d+/messages/\d+"):
            assert allows_no_pings(edit.json), edit.json
        store = await Store.open(config.storage.url)
        try:
            stored_names = await user_names(store, "discord")
            for name, author in authors.items():
                text = stored_form(HOSTILE[name])
                stored = await exported(store, "discord", author["id"])
                if name in EMPTY_AFTER_TRIM:
                    assert stored == [], name
                    continue
                assert stored == [("user", text), ("bot", echo(text))], name
                assert stored_names[author["id"]] == safe_text(HOSTILE[name][:32]), name
        finally:
            await store.close()
    finally:
        await fake.close()
    assert not fake.unknown


async def test_discord_keeps_the_indentation_of_pasted_code(
    make_config: Callable[..., Config], discord_env: None
) -> None:
    fake = await FakeDiscord(token=DISCORD_TOKEN).start()
    config = roomy(
        make_config,
        discord={"enabled": True, "api_base_url": fake.api_base, "gateway_url": fake.gateway_url},
        web={"enabled": False},
    )
    code = "why does this fail?\n```py\ndef f():\n    return  1\n```"
    try:
        async with channel_bot(config, "discord"):
            await fake.user_message(f"<@{fake.bot['id']}> {code}", mention_bot=True)
            await fake.wait_for(lambda: fake.posts(fake.channel_id), within_s=30)
        store = await Store.open(config.storage.url)
        try:
            stored = await exported(store, "discord", fake.human["id"])
        finally:
            await store.close()
    finally:
        await fake.close()
    assert stored[0] == ("user", code)


# -- console -------------------------------------------------------------------------


async def test_console_takes_every_single_line_hostile_text(
    make_config: Callable[..., Config],
) -> None:
    """Lines as a console with `surrogateescape` stdin hands them over (lone
    surrogates included)."""
    names = [
        n
        for n in NON_EMPTY
        if not any(c in HOSTILE[n] for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
    ]
    stdout = io.StringIO()
    async with BotApp(roomy(make_config), engine=echo_engine()) as app:
        console = ConsoleChannel(
            app.services.handle,
            data_dir=app.config.bot.data_dir,
            stdin=io.StringIO("".join(HOSTILE[name] + "\n" for name in names)),
            stdout=stdout,
            user_id="hostile",
            services=app.services,
        )
        await console.start()
        await console.wait_closed()
        await console.stop()
        assert app.store is not None
        stored = await exported(app.store, "console", "hostile")
    expected = [stored_form(HOSTILE[name]) for name in names]
    assert [text for role, text in stored if role == "user"] == expected
    printed = [line for line in stdout.getvalue().split("\n") if line.startswith("bot> ")]
    assert printed == [f"bot> {echo(text)}" for text in expected]


async def test_console_survives_bytes_that_are_not_utf8(
    make_config: Callable[..., Config],
) -> None:
    """stdin as `aigc-bot chat` gets it under a UTF-8 locale (strict
    decoding), fed bytes that are not UTF-8."""
    raw = b"hello\n\xff\xfe broken\nstill here " + "\ud800".encode("utf-8", "surrogatepass")
    stdin = io.TextIOWrapper(io.BytesIO(raw + b"\n"), encoding="utf-8", errors="strict")
    stdout = io.StringIO()
    async with BotApp(roomy(make_config), engine=echo_engine()) as app:
        console = ConsoleChannel(
            app.services.handle,
            data_dir=app.config.bot.data_dir,
            stdin=stdin,
            stdout=stdout,
            user_id="bytes",
            services=app.services,
        )
        await console.start()
        await console.wait_closed()
        await console.stop()
    replies = [line for line in stdout.getvalue().split("\n") if line.startswith("bot> ")]
    assert replies == [
        "bot> echo: hello",
        f"bot> echo: {REPLACEMENT}{REPLACEMENT} broken",
        f"bot> echo: still here {REPLACEMENT}{REPLACEMENT}{REPLACEMENT}",
    ]
