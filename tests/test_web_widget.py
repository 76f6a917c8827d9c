"""The chat widget in a real Chromium, against the real bot on the tiny model.

The bot (store, tiny GPT-2 engine, manager, web channel) runs in a background
thread with its own event loop; the tests drive Debian's Chromium with sync
Playwright: open the bubble with the keyboard, send a message and watch the
streamed reply, reload and find the history, check that HTML from the bot or
the history shows as text, embed the widget on another origin, and see
pictures and errors at phone width. Screenshots go to test-artifacts/.

When Chromium is missing or cannot start, every test here skips with the reason.
"""

from __future__ import annotations

import asyncio
import html
import os
import threading
import warnings
from collections.abc import AsyncIterator, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from support.web_support import PictureDrawer

from adapters.web import WebChannel, token_hash
from bot.app import BotApp
from bot.config import Config
from bot.engine_settings import build_text_engine
from bot.engines import TextChunk, TextEngine
from bot.messages import Reply, Source, Text

#: Debian's Chromium (`make browser` installs it); another build can be named here.
CHROMIUM = os.environ.get("AIGC_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
XSS = "<img src=x onerror=alert(1)>"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-first-run",
    "--no-pings",
]


def skip_loudly(reason: str) -> None:
    message = f"BROWSER TESTS SKIPPED: {reason}"
    with warnings.catch_warnings():  # shown in the summary even where warnings are errors
        warnings.simplefilter("always")
        warnings.warn(message, stacklevel=2)
    pytest.skip(message)


# -- the bot in a thread --------------------------------------------------------------


class PacedEngine:
    """The real tiny-model engine with its partial texts spaced out as a larger
    model's would be: the tiny model writes a whole reply in a few
    milliseconds, so its partials would reach the browser in one network read
    and the page could never be seen streaming."""

    def __init__(self, inner: TextEngine, pause_s: float = 0.05) -> None:
        self.inner = inner
        self.pause_s = pause_s

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    @property
    def ready(self) -> bool:
        return self.inner.ready

    @property
    def queue_depth(self) -> int:
        return self.inner.queue_depth

    async def stream(self, turns: Any, *, conversation: str = "") -> AsyncIterator[TextChunk]:
        async for part in self.inner.stream(turns, conversation=conversation):
            if not part.final:
                await asyncio.sleep(self.pause_s)
            yield part


class ThreadedBot:
    """BotApp + WebChannel on their own loop in a daemon thread."""

    def __init__(self, config: Config, pictures: Path) -> None:
        self.config = config
        self.pictures = pictures
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app: BotApp | None = None
        self.port = 0
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedBot:
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
            engine = PacedEngine(build_text_engine(self.config.text))
            async with BotApp(self.config, engine=engine) as app:
                assert app.manager is not None
                app.manager.drawer = PictureDrawer(app.store, self.pictures, size=160)
                channel = WebChannel.create(app.services)
                assert channel is not None
                await channel.start()
                self.loop, self.app, self.port = asyncio.get_running_loop(), app, channel.port or 0
                self._stop = asyncio.Event()
                self.ready.set()
                try:
                    await self._stop.wait()
                finally:
                    await channel.stop()
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def push(self, token: str, reply: Reply) -> None:
        """Push `reply` to the session's conversation, as an operator's answer would be."""
        assert self.app is not None and self.app.store is not None
        store, delivery = self.app.store, self.app.delivery

        async def push() -> None:
            user_id = await store.sessions.user_for(token_hash(token))
            assert user_id is not None and delivery is not None
            conversation, _ = await store.conversations.ensure_active("web", user_id, user_id)
            if isinstance(reply, Text) and reply.role == "operator":
                await store.conversations.add_operator_message(
                    conversation_id=conversation,
                    platform="web",
                    user_id=user_id,
                    operator=reply.author,
                    text=reply.text,
                )
            assert await delivery.push(conversation, reply)

        self.call(push())

    def add_exchange(
        self, token: str, user_text: str, bot_text: str, source: dict[str, Any] | None = None
    ) -> None:
        """Store a turn in the session's conversation, as if the bot had said `bot_text`."""
        assert self.app is not None and self.app.store is not None
        store = self.app.store

        async def add() -> None:
            user_id = await store.sessions.user_for(token_hash(token))
            assert user_id is not None
            stored = await store.conversations.add_user_message(
                platform="web",
                chat_id=user_id,
                owner=user_id,
                user_id=user_id,
                user_name="web visitor",
                text=user_text,
            )
            await store.conversations.add_bot_message(
                reply_to=stored.message,
                platform="web",
                user_id=user_id,
                text=bot_text,
                source=source,
            )

        self.call(add())


class ShopSite:
    """Another site, on its own port, whose pages embed the widget with one tag.

    Reached as http://127.0.0.1:PORT it is an allowed origin; as
    http://localhost:PORT it is a different origin that is not."""

    def __init__(self) -> None:
        self.widget_url = ""
        site = self

        class Page(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                title = parse_qs(urlsplit(self.path).query).get("title", ["Help"])[0]
                body = (
                    "<!doctype html><html><head><meta charset='utf-8'><title>A shop</title></head>"
                    "<body><h1>A shop</h1><p>Our products.</p>"
                    f'<script src="{html.escape(site.widget_url)}" '
                    f'data-title="{html.escape(title)}" defer></script></body></html>'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.port = self.server.server_address[1]
        self.allowed_origin = f"http://127.0.0.1:{self.port}"
        self.other_origin = f"http://localhost:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def shop() -> Iterator[ShopSite]:
    site = ShopSite()
    yield site
    site.close()


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
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
            )
        except Exception as exc:
            skip_loudly(f"Chromium cannot be launched: {str(exc).splitlines()[0]}")
        yield browser
        browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def bot(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, shop: ShopSite
) -> Iterator[ThreadedBot]:
    root = tmp_path_factory.mktemp("widget")
    config = Config.model_validate(
        {
            "bot": {"data_dir": str(root / "data")},
            "storage": {"url": f"sqlite+aiosqlite:///{root / 'bot.db'}"},
            "text": {
                "model": str(tiny_model_dir),
                "max_new_tokens": 16,
                "greedy": True,
                "stream_interval_ms": 0,
            },
            "draw": {"enabled": False},
            "limits": {"messages_per_minute": 2},
            "web": {"port": 0, "allowed_origins": [shop.allowed_origin]},
            "telegram": {"enabled": False},
            "discord": {"enabled": False},
        }
    )
    with ThreadedBot(config, root / "pictures") as running:
        shop.widget_url = running.url + "/widget.js"
        yield running


class Watch:
    """What a page did that it should not have: dialogs (alert) and script errors."""

    def __init__(self, page: Any) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def assert_clean(self) -> None:
        assert self.dialogs == [], f"the page opened dialogs: {self.dialogs}"
        assert self.errors == [], f"script errors: {self.errors}"


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


# Records, inside the page, whether the typing indicator and a streaming bubble were seen.
RECORD_STREAMING = """() => {
  const root = document.getElementById('aigc-bot-widget').shadowRoot;
  window.__seen = {typing: false, streaming: []};
  new MutationObserver(() => {
    if (!root.querySelector('.typing').hidden) window.__seen.typing = true;
    const live = root.querySelector('.msg.bot.streaming .text');
    if (live && live.textContent) window.__seen.streaming.push(live.textContent);
  }).observe(root, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def widget_parts(page: Any) -> dict[str, Any]:
    return {
        "bubble": page.locator(".bubble"),
        "panel": page.get_by_role("dialog"),
        "input": page.get_by_role("textbox", name="Message"),
        "bot": page.locator(".msg.bot:not(.greeting):not(.streaming) .text"),
        "user": page.locator(".msg.user .text"),
        "typing": page.locator(".typing"),
        "errors": page.locator(".msg.error"),
    }


def send(page: Any, text: str) -> None:
    field = page.get_by_role("textbox", name="Message")
    field.fill(text)
    field.press("Enter")


# -- tests ------------------------------------------------------------------------------------


def test_chat_streams_the_reply_keeps_history_and_renders_text_not_html(
    new_page: Any, bot: ThreadedBot
) -> None:
    from playwright.sync_api import expect

    page, watch = new_page()
    page.goto(bot.url + "/")
    w = widget_parts(page)
    expect(w["bubble"]).to_have_attribute("aria-label", "Open chat: Help")
    expect(w["panel"]).to_be_hidden()

    # keyboard only: Tab reaches the bubble, Enter opens it and focuses the message field
    page.keyboard.press("Tab")
    expect(w["bubble"]).to_be_focused()
    page.keyboard.press("Enter")
    expect(w["panel"]).to_be_visible()
    expect(w["panel"]).to_have_accessible_name("Help")
    expect(w["bubble"]).to_have_attribute("aria-expanded", "true")
    expect(w["input"]).to_be_focused()
    expect(page.get_by_role("button", name="Send message")).to_be_visible()
    expect(page.get_by_role("button", name="Close chat", exact=True)).to_be_visible()
    expect(page.get_by_role("log")).to_be_attached()

    page.evaluate(RECORD_STREAMING)
    with page.expect_response(
        lambda r: r.url.endswith("/api/messages") and r.request.method == "POST"
    ) as sent:
        page.keyboard.type("hello there")
        page.keyboard.press("Enter")
    expect(w["user"]).to_have_text(["hello there"])
    expect(w["input"]).to_have_value("")
    expect(w["bot"]).to_have_count(1)
    expect(w["typing"]).to_be_hidden()
    body = sent.value.body().decode()
    assert sent.value.headers["content-type"].startswith("text/event-stream")
    assert body.count("event: partial") >= 2, body
    final = w["bot"].first.text_content()
    assert final and final in body
    seen = page.evaluate("window.__seen")
    assert seen["typing"], "the typing indicator never showed"
    assert seen["streaming"], "no partial text was shown while streaming"
    assert all(final.startswith(text) for text in seen["streaming"]), seen["streaming"]

    # HTML typed by the visitor shows as text
    send(page, XSS)
    expect(w["user"]).to_have_text(["hello there", XSS])
    expect(w["bot"]).to_have_count(2)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "widget.png"))

    # a bot reply in the stored history that contains HTML
    token = page.evaluate(f"localStorage.getItem('aigc-bot-widget:{bot.url}:session')")
    assert token
    bot.add_exchange(token, "what does a tag look like?", f"Like this: {XSS} and <b>bold</b>")

    page.reload()
    w = widget_parts(page)
    expect(w["panel"]).to_be_visible()  # it was open before the reload
    expect(w["user"]).to_have_text(["hello there", XSS, "what does a tag look like?"])
    expect(w["bot"]).to_have_count(3)
    expect(w["bot"].nth(0)).to_have_text(final)
    expect(w["bot"].nth(2)).to_have_text(f"Like this: {XSS} and <b>bold</b>")
    assert page.locator(".msg img, .msg b").count() == 0
    page.wait_for_timeout(300)  # an injected onerror handler would have run by now
    watch.assert_clean()

    # Escape closes the panel and gives focus back to the bubble
    w["input"].focus()
    page.keyboard.press("Escape")
    expect(w["panel"]).to_be_hidden()
    expect(w["bubble"]).to_be_focused()
    expect(w["bubble"]).to_have_attribute("aria-expanded", "false")


def test_a_bot_reply_with_html_streams_in_as_text(new_page: Any, bot: ThreadedBot) -> None:
    from playwright.sync_api import expect

    page, watch = new_page()
    evil = f"Here you go: {XSS}"
    stream = "".join(
        f"event: {name}\ndata: {data}\n\n"
        for name, data in [
            ("typing", "{}"),
            ("partial", '{"text": "Here you go: <img"}'),
            ("text", f'{{"type": "text", "text": "{evil}"}}'),
            ("done", f'{{"replies": [{{"type": "text", "text": "{evil}"}}]}}'),
        ]
    )
    page.route(
        "**/api/messages",
        lambda route: (
            route.fulfill(status=200, content_type="text/event-stream", body=stream)
            if route.request.method == "POST"
            else route.continue_()
        ),
    )
    page.goto(bot.url + "/")
    page.locator(".bubble").click()
    send(page, "show me some html")
    expect(widget_parts(page)["bot"]).to_have_text([evil])
    assert page.locator(".msg img").count() == 0
    page.wait_for_timeout(300)
    watch.assert_clean()


def test_phone_width_pictures_and_readable_errors(new_page: Any, bot: ThreadedBot) -> None:
    from playwright.sync_api import expect

    page, watch = new_page(PHONE)
    page.goto(bot.url + "/")
    w = widget_parts(page)
    box = w["bubble"].bounding_box()
    assert (
        box
        and box["x"] + box["width"] <= PHONE["width"]
        and box["y"] + box["height"] <= PHONE["height"]
    )
    w["bubble"].click()
    expect(w["panel"]).to_be_visible()
    panel = w["panel"].bounding_box()
    assert panel == {"x": 0, "y": 0, "width": PHONE["width"], "height": PHONE["height"]}, panel

    # /draw: the picture shows inline, with its caption and seed
    send(page, "/draw a lighthouse at dusk")
    picture = page.get_by_role("img", name="a lighthouse at dusk")
    expect(picture).to_be_visible()
    assert picture.evaluate("image => image.naturalWidth") == 160  # loaded, not just placed
    expect(page.locator("figcaption")).to_have_text("a lighthouse at dusk (seed 1234)")
    expect(page.locator(".msg.progress")).to_have_count(0)  # the queue notice goes once it is done

    send(page, "hello")
    expect(w["bot"]).to_have_count(1)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "widget-phone.png"))

    # 429: limits.messages_per_minute = 2, so the third message waits, and says so
    send(page, "hello again")
    expect(w["bot"]).to_have_count(2)
    send(page, "one more")
    expect(w["errors"]).to_have_count(1)
    expect(w["errors"].first).to_contain_text("Please wait")
    expect(page.locator(".msg.user.failed")).to_contain_text("Not sent")
    expect(w["input"]).to_have_value("one more")  # kept, to send again later

    # 503 from the engine, as the server reports it
    page.route(
        "**/api/messages",
        lambda route: route.fulfill(
            status=503,
            content_type="application/json",
            headers={"Retry-After": "30"},
            body='{"error": "I can\'t answer right now (my language model is unavailable)."}',
        ),
    )
    send(page, "are you there?")
    expect(w["errors"]).to_have_count(2)
    expect(w["errors"].last).to_have_text(
        "I can't answer right now (my language model is unavailable). Please try again in 30 s."
    )

    # on a phone the header's close button is the way out
    page.get_by_role("button", name="Close chat", exact=True).click()
    expect(w["panel"]).to_be_hidden()
    expect(w["bubble"]).to_be_visible()
    watch.assert_clean()


def test_embedding_on_another_site_uses_cors(
    new_page: Any, bot: ThreadedBot, shop: ShopSite
) -> None:
    """One script tag on a page of an allowed origin works; other origins are refused."""
    from playwright.sync_api import expect

    page, watch = new_page()
    page.goto(shop.allowed_origin + "/?title=Shop+help")
    w = widget_parts(page)
    page.get_by_role("button", name="Open chat: Shop help").click()
    send(page, "/help")
    expect(w["bot"]).to_have_count(1)
    expect(w["bot"].first).to_contain_text("/draw")
    send(page, "hi")  # a new session's first plain message: the preflighted JSON + SSE request
    expect(w["bot"]).to_have_count(2)
    expect(w["errors"]).to_have_count(0)
    watch.assert_clean()

    page, watch = new_page()
    page.goto(shop.other_origin + "/")
    w = widget_parts(page)
    page.get_by_role("button", name="Open chat: Help").click()
    send(page, "/help")
    expect(w["errors"]).to_have_count(1)
    expect(w["errors"].first).to_contain_text("can't reach the chat service")
    expect(w["bot"]).to_have_count(0)


def test_replies_pushed_later_appear_and_help_centre_answers_say_so(
    new_page: Any, bot: ThreadedBot
) -> None:
    """A person from the team answers on GET /api/events while the visitor
    waits: the widget shows it, named as the team's; an answer taken from the
    FAQ carries a "From our help centre" label, live and after a reload."""
    from playwright.sync_api import expect

    page, watch = new_page()
    page.goto(bot.url + "/")
    w = widget_parts(page)
    w["bubble"].click()
    with page.expect_response(lambda r: r.url.endswith("/api/events")):
        send(page, "I need a person please")
    expect(w["bot"]).to_have_count(1)
    token = page.evaluate(f"localStorage.getItem('aigc-bot-widget:{bot.url}:session')")
    assert token

    bot.push(token, Text("Hi, I'm Sam from the shop. <b>How can I help?</b>", role="operator",
                         author="Sam", source=Source("operator")))  # fmt: skip
    operator = page.locator(".msg.operator")
    expect(operator.locator(".text")).to_have_text(
        "Hi, I'm Sam from the shop. <b>How can I help?</b>"
    )
    expect(operator.locator(".who")).to_have_text("Sam")
    expect(operator.locator(".sr-only")).to_have_text("Sam: ")

    bot.push(token, Text("You can return any unused item within 30 days.",
                         source=Source("faq", id="returns")))  # fmt: skip
    faq = page.locator(".msg.bot.pushed")
    expect(faq.locator(".text")).to_have_text("You can return any unused item within 30 days.")
    expect(faq.locator(".source")).to_have_text("From our help centre")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "widget-pushed.png"))

    bot.add_exchange(
        token, "how do refunds work?", "Refunds take 5 days.", {"kind": "faq", "id": "refunds"}
    )
    page.reload()
    w = widget_parts(page)
    labelled = page.locator(".msg.bot", has=page.locator(".source"))
    expect(labelled).to_have_count(1)
    expect(labelled).to_contain_text("Refunds take 5 days.")
    expect(page.locator(".msg.operator .text")).to_have_text(
        ["Hi, I'm Sam from the shop. <b>How can I help?</b>"]
    )
    assert page.locator(".msg b").count() == 0
    watch.assert_clean()
