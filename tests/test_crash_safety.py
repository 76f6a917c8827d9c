"""A crash loses nothing that was accepted: five `kill -9`s of a real
`aigc-bot run` under load from web and Telegram users at once.

Web users send each message with an `Idempotency-Key` and retry it (same key)
until they get a 200, as a client that wants exactly-once does. Telegram users
write through the fake Bot API, which redelivers every update the bot has not
confirmed. After the last restart every acknowledged message must be in the
database exactly once, and every stored message must have exactly one
answer: the ones a killed process left unanswered are answered after the
restart, through the delivery path.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.eventually import eventually
from support.fakes.telegram_server import FakeBotApi
from support.net import free_port
from support.process import BotProcess

from storage import Store

TOKEN = "123456789:AAFake-crash-token-0123456789abc"
WEB_USERS = 4
TELEGRAM_USERS = 3
CYCLES = 5
#: Messages each Telegram user sends at most.
TELEGRAM_MESSAGES = 25


class WebUser:
    """Sends numbered messages, each retried with its key until acknowledged."""

    def __init__(self, name: str, bot: BotProcess) -> None:
        self.name = name
        self.bot = bot
        self.session: str | None = None
        self.user_id = ""
        self.acknowledged: list[str] = []
        self.sent = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            while not stop.is_set():
                self.sent += 1
                text = f"{self.name} message {self.sent}"
                await self._deliver(http, text, key=f"{self.name}-{self.sent}")
                self.acknowledged.append(text)

    async def _deliver(self, http: aiohttp.ClientSession, text: str, key: str) -> None:
        while True:
            try:
                if self.session is None:
                    async with http.post(self.bot.url + "/api/sessions") as response:
                        if response.status != 201:
                            raise ConnectionError(response.status)
                        body = await response.json()
                        self.session, self.user_id = body["session"], body["user_id"]
                headers = {"Authorization": f"Bearer {self.session}", "Idempotency-Key": key}
                async with http.post(
                    self.bot.url + "/api/messages", json={"text": text}, headers=headers
                ) as response:
                    if response.status == 200:
                        return
                    raise ConnectionError(response.status)
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                await asyncio.sleep(0.1)  # a client's retry pause, not test synchronisation


async def telegram_user(user: int, api: FakeBotApi, sent: list[str], stop: asyncio.Event) -> None:
    count = 0
    while not stop.is_set() and count < TELEGRAM_MESSAGES:  # the same load on a slow machine
        count += 1
        text = f"tg{user} message {count}"
        api.private_message(user, text)
        sent.append(text)
        await asyncio.sleep(random.uniform(0.4, 1.0))  # how often this user writes


async def stored_messages(url: str) -> list[tuple[str, str, str, str]]:
    """(platform, user, role, text) of every stored message."""
    from sqlalchemy import text

    store = await Store.open(url)
    try:
        async with store.engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT platform, user_id, role, text FROM messages ORDER BY id")
            )
            return [tuple(row) for row in rows]  # type: ignore[misc]
    finally:
        await store.close()


@pytest.mark.timeout(600)
async def test_five_kill_9_cycles_lose_and_duplicate_nothing(
    bot_env: dict[str, str], tmp_path: Path
) -> None:
    random.seed(16)
    api = FakeBotApi(TOKEN)
    await api.start()
    port = free_port()
    url = f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}"
    env = {
        **bot_env,
        "AIGC_BOT__STORAGE__URL": url,
        "AIGC_BOT__WEB__PORT": str(port),
        "AIGC_BOT__WEB__SESSIONS_PER_MINUTE": "0",
        "AIGC_BOT__LIMITS__MESSAGES_PER_MINUTE": "0",
        "AIGC_BOT__TELEGRAM__ENABLED": "true",
        "AIGC_BOT__TELEGRAM__BASE_URL": api.base_url,
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "AIGC_BOT__TEXT__MAX_NEW_TOKENS": "8",
    }
    bot = BotProcess(env, tmp_path, tmp_path / "run.log", port)
    web_users = [WebUser(f"web{i}", bot) for i in range(WEB_USERS)]
    telegram_sent: list[str] = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    try:
        await bot.start()
        tasks = [asyncio.create_task(user.run(stop)) for user in web_users]
        tasks += [
            asyncio.create_task(telegram_user(7000 + i, api, telegram_sent, stop))
            for i in range(TELEGRAM_USERS)
        ]
        for _cycle in range(CYCLES):
            # under load for a while: until a few more messages were acknowledged
            target = sum(len(u.acknowledged) for u in web_users) + random.randint(3, 6)
            await eventually(lambda t=target: sum(len(u.acknowledged) for u in web_users) >= t,
                             within=120)  # fmt: skip
            await bot.kill()
            await bot.start()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        # The last updates are confirmed, and every stored message answered.
        last_update = len(api._updates) and api._updates[-1]["update_id"]
        await eventually(lambda: api.confirmed >= last_update, within=60)

        async def all_answered() -> bool:
            rows = await stored_messages(url)
            asked = sum(1 for row in rows if row[2] == "user")
            return asked > 0 and sum(1 for row in rows if row[2] == "bot") >= asked

        await eventually(all_answered, within=180, every=0.5)
        assert await bot.terminate() == 0, bot.tail()
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await bot.terminate(10)
        await api.close()

    rows = await stored_messages(url)
    user_texts = Counter(text for _platform, _user, role, text in rows if role == "user")
    acknowledged = [text for user in web_users for text in user.acknowledged]
    lost = [text for text in acknowledged + telegram_sent if user_texts[text] == 0]
    duplicated = {text: n for text, n in user_texts.items() if n > 1}
    replies = Counter(role for _p, _u, role, _t in rows)
    report = (
        f"{CYCLES} kill -9 cycles: {len(acknowledged)} web messages acknowledged, "
        f"{len(telegram_sent)} Telegram messages sent; lost {len(lost)}, "
        f"duplicated {len(duplicated)}; {replies['user']} stored, {replies['bot']} answers"
    )
    print(report)
    assert bot.starts == CYCLES + 1
    assert len(acknowledged) >= CYCLES * 3 and telegram_sent
    assert lost == [], report
    assert duplicated == {}, report
    assert replies["bot"] == replies["user"], report  # every message answered exactly once
    log = bot.log.read_text()
    print("answered after a restart:", log.count("left unanswered"), "sweeps")
    print("start-up times (s):", bot.start_times)
