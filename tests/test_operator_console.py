"""The operator console (/operator) in a real Chromium, against the real bot.

The bot (store, tiny model, manager, handoff, web channel) runs in a
background thread with its own event loop; sync Playwright drives two
browser contexts: a visitor using the chat widget on the demo page, and an
operator in the console. The visitor asks for a person; the operator signs in
with the keyboard, sees the conversation appear and its waiting time tick,
claims it, answers, and the visitor's widget shows the answer; the visitor's
next message (HTML included) appears in the console live, as text; the
operator releases it and the bot answers again. Screenshots go to
test-artifacts/.

When Chromium is missing or cannot start, every test here skips with the reason.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_handoff_e2e import ANNA, OPERATOR_TOKENS, RunningBot, handoff_bot
from test_web_widget import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    DESKTOP,
    XSS,
    Watch,
    send,
    skip_loudly,
    widget_parts,
)

from bot.config import Config


class ThreadedHandoffBot:
    """`handoff_bot` on its own loop in a daemon thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.running: RunningBot | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.url

    def __enter__(self) -> ThreadedHandoffBot:
        self._thread.start()
        if not self.ready.wait(180):
            raise TimeoutError("the bot did not start in 180 s")
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    async def _main(self) -> None:
        try:
            async with handoff_bot(self.config) as running:
                self.loop, self.running = asyncio.get_running_loop(), running
                self._stop = asyncio.Event()
                self.ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        skip_loudly(
            f"{CHROMIUM} is missing; install it with `apt-get install -y chromium` (make browser)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        skip_loudly(f"playwright is not installed ({exc}); run `make install`")
    playwright = sync_playwright().start()
    try:
        try:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
        except Exception as exc:
            skip_loudly(f"Chromium cannot be launched: {str(exc).splitlines()[0]}")
        yield browser
        browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def bot(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedHandoffBot]:
    root = tmp_path_factory.mktemp("console")
    config = Config.model_validate(
        {
            "bot": {"data_dir": str(root / "data")},
            "storage": {"url": f"sqlite+aiosqlite:///{root / 'bot.db'}"},
            "text": {"model": str(tiny_model_dir), "max_new_tokens": 16, "greedy": True},
            "draw": {"enabled": False},
            "web": {"port": 0},
            "telegram": {"enabled": False},
            "discord": {"enabled": False},
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIGC_BOT_OPERATOR_TOKENS", OPERATOR_TOKENS)
        with ThreadedHandoffBot(config) as running:
            yield running


@pytest.fixture
def new_page(chromium: Any) -> Iterator[Any]:
    contexts: list[Any] = []

    def make(viewport: dict[str, int] = DESKTOP) -> tuple[Any, Watch]:
        context = chromium.new_context(viewport=viewport)
        contexts.append(context)
        context.set_default_timeout(15_000)
        page = context.new_page()
        return page, Watch(page)

    yield make
    for context in contexts:
        context.close()


def test_an_operator_claims_answers_and_releases_a_visitor_live(
    new_page: Any, bot: ThreadedHandoffBot
) -> None:
    from playwright.sync_api import expect

    # the visitor asks for a person in the widget
    visitor, visitor_watch = new_page()
    visitor.goto(bot.url + "/")
    w = widget_parts(visitor)
    w["bubble"].click()
    send(visitor, "hello there")
    expect(w["bot"]).to_have_count(1)
    with visitor.expect_response(lambda r: r.url.endswith("/api/messages")):
        send(visitor, "Can I talk to a human? My order #4411 never arrived.")
    notice = visitor.locator(".msg.notice")
    expect(notice).to_have_text(
        ["A person will answer here soon; I've passed on our conversation."]
    )

    # the operator signs in with the keyboard; a wrong token first
    console, console_watch = new_page()
    console.goto(bot.url + "/operator")
    token_field = console.get_by_label("Operator token")
    expect(token_field).to_be_focused()
    console.keyboard.type("not-a-token")
    console.keyboard.press("Enter")
    expect(console.get_by_role("alert")).to_have_text("That token was not accepted.")
    token_field.fill(ANNA)
    token_field.press("Enter")
    expect(console.locator("#who-name")).to_have_text("anna")
    expect(console.locator("#connection")).to_have_text("Live")
    waiting = console.locator("#waiting-list .item")
    expect(waiting).to_have_count(1)
    expect(waiting.first.locator(".last")).to_have_text(
        "Can I talk to a human? My order #4411 never arrived."
    )
    expect(waiting.first.locator(".since")).to_have_text(re.compile(r"^waiting \d+ s$"))
    first_tick = waiting.first.locator(".since").text_content()
    expect(waiting.first.locator(".since")).not_to_have_text(first_tick or "")  # it ticks
    ARTIFACTS.mkdir(exist_ok=True)
    console.screenshot(path=str(ARTIFACTS / "operator-waiting.png"))

    # open it (keyboard), read the transcript, claim it
    waiting.first.focus()
    console.keyboard.press("Enter")
    expect(console.locator("#conversation-title")).to_be_focused()
    transcript = console.get_by_role("log", name="Messages")
    expect(transcript.locator(".msg.user .text")).to_have_text(
        ["hello there", "Can I talk to a human? My order #4411 never arrived."]
    )
    expect(transcript.locator(".msg.bot")).to_have_count(1)
    console.get_by_role("button", name="Claim").click()
    reply = console.get_by_label("Reply")
    expect(reply).to_be_focused()
    expect(console.locator("#claimed-list .item")).to_have_count(1)
    expect(console.locator("#waiting-list .item")).to_have_count(0)
    expect(console.locator("#conversation-meta")).to_contain_text("claimed by you")

    # the answer reaches the visitor's widget
    console.keyboard.type("Hi, I'm Anna from the shop. Let me look up order #4411.")
    console.keyboard.press("Enter")
    expect(reply).to_have_value("")
    expect(transcript.locator(".msg.operator .text")).to_have_text(
        ["Hi, I'm Anna from the shop. Let me look up order #4411."]
    )
    operator_bubble = visitor.locator(".msg.operator")
    expect(operator_bubble.locator(".text")).to_have_text(
        "Hi, I'm Anna from the shop. Let me look up order #4411."
    )
    expect(operator_bubble.locator(".who")).to_have_text("anna")

    # the visitor writes back (with HTML): live in the console, as text, no bot answer
    send(visitor, f"Thanks! It was this one: {XSS}")
    expect(transcript.locator(".msg.user .text").last).to_have_text(
        f"Thanks! It was this one: {XSS}"
    )
    expect(console.locator("#claimed-list .item .last")).to_have_text(
        f"Thanks! It was this one: {XSS}"
    )
    assert console.locator(".msg img").count() == 0
    expect(w["bot"]).to_have_count(1)
    console.screenshot(path=str(ARTIFACTS / "operator-console.png"))
    visitor.screenshot(path=str(ARTIFACTS / "operator-reply-in-widget.png"))

    # released: the visitor is told, and the bot answers again
    console.get_by_role("button", name="Release to the bot").click()
    expect(console.locator("#conversation-meta")).to_contain_text("with the bot")
    expect(console.locator("#claimed-list .item")).to_have_count(0)
    expect(visitor.locator(".msg.notice").last).to_contain_text("back to me")
    send(visitor, "what do you sell?")
    expect(w["bot"]).to_have_count(2)
    console.wait_for_timeout(300)  # an injected onerror handler would have run by now
    visitor_watch.assert_clean()
    console_watch.assert_clean()


def test_the_console_at_phone_width_and_after_a_reload(
    new_page: Any, bot: ThreadedHandoffBot
) -> None:
    """Signed in for the tab (sessionStorage): a reload keeps the operator in;
    a deep link opens its conversation; sign out forgets the token."""
    from playwright.sync_api import expect

    visitor, _ = new_page()
    visitor.goto(bot.url + "/")
    widget_parts(visitor)["bubble"].click()
    send(visitor, "/human")
    expect(visitor.locator(".msg.notice")).to_have_count(1)

    console, watch = new_page({"width": 390, "height": 844})
    console.goto(bot.url + "/operator")
    console.get_by_label("Operator token").fill(ANNA)
    console.get_by_role("button", name="Sign in").click()
    item = console.locator("#waiting-list .item").first
    expect(item).to_be_visible()
    item.click()
    expect(console.locator("#conversation-title")).to_be_focused()
    conversation_url = console.url
    assert "#conversation=" in conversation_url
    console.reload()
    expect(console.locator("#who-name")).to_have_text("anna")
    expect(console.locator("#conversation-meta")).to_contain_text("waiting for a person")
    console.screenshot(path=str(ARTIFACTS / "operator-phone.png"), full_page=True)
    console.get_by_role("button", name="Sign out").click()
    expect(console.get_by_label("Operator token")).to_be_visible()
    console.reload()
    expect(console.get_by_label("Operator token")).to_be_visible()
    watch.assert_clean()
