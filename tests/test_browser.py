"""The web client end to end in headless Chromium (issue #7).

Debian's ``chromium`` driven by Playwright's async API through ``executable_path``
(Playwright's own browser download is not used). ``make test`` installs Chromium
(``deploy/local/prepare.py``); where it cannot, these tests skip with the recorded
reason, except under ``CI=true`` where a missing browser fails them.

Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson
import pytest
from redis.asyncio import Redis

from deploy.local.prepare import CHROMIUM, CHROMIUM_UNAVAILABLE
from shared.keys import Keys
from tests.support import ROOT, Seeder, Stack

try:
    from playwright.async_api import Browser, Locator, Page, async_playwright, expect
except ImportError:  # pragma: no cover - only without the dev extra
    PLAYWRIGHT_MISSING: str | None = (
        "the playwright package is not installed (pip install -e '.[dev]')"
    )
else:
    PLAYWRIGHT_MISSING = None

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Keep Chromium off the network: no update, sync or field-trial requests.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000  # a condition that should hold soon
RECONNECT_MS = 40_000  # the client's backoff may have grown while its gateway was down
XSS = "<img src=x onerror=\"window.__xss = 1; document.title = 'pwned'\">"


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if PLAYWRIGHT_MISSING:
        return PLAYWRIGHT_MISSING
    if CHROMIUM.exists():
        return None
    if CHROMIUM_UNAVAILABLE.exists():
        return CHROMIUM_UNAVAILABLE.read_text().strip()
    return f"{CHROMIUM} not found; `make test` installs Debian's chromium package"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Debian Chromium; skipped (failed under CI=true) when it cannot be had."""
    reason = browser_unavailable()
    if reason:
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(f"browser tests need Chromium: {reason}")
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


class ChatPage:
    """One user's tab: the page plus what it logged and sent on its sockets."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []  # uncaught exceptions in the page
        self.sent: list[dict[str, Any]] = []  # every frame the client sent, in order
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("websocket", lambda ws: ws.on("framesent", self._framesent))

    def _framesent(self, payload: str | bytes) -> None:
        self.sent.append(orjson.loads(payload))

    def message(self, text: str) -> Locator:
        """The confirmed message(s) whose text is exactly ``text``."""
        exact = re.compile(f"^{re.escape(text)}$")
        return self.page.locator("#messages li.message[data-id]").filter(
            has=self.page.locator(".text", has_text=exact)
        )

    async def send(self, text: str, *, enter: bool = False) -> None:
        """Type into the composer and send with the button (or Enter)."""
        await self.page.fill("#text", text)
        if enter:
            await self.page.press("#text", "Enter")
        else:
            await self.page.click("#send")

    async def state(self) -> dict[str, Any]:
        """``window.chatClient.state()``."""
        result: dict[str, Any] = await self.page.evaluate("window.chatClient.state()")
        return result

    async def wait(self, condition: str, arg: Any = None, timeout: float = WAIT_MS) -> None:
        """Wait until ``(s, arg) => condition`` holds for the client state ``s``."""
        await self.page.wait_for_function(
            f"(arg) => {{ const s = window.chatClient.state(); return {condition}; }}",
            arg=arg,
            timeout=timeout,
        )

    async def wait_online(self, timeout: float = WAIT_MS) -> None:
        await expect(self.page.locator("#status")).to_have_attribute(
            "data-status", "online", timeout=timeout
        )

    async def wait_settled(self) -> None:
        """Online and no send waiting for its confirmation."""
        await self.wait_online()
        await self.wait("s.pending.length === 0")

    async def texts(self) -> list[str]:
        """Texts of the confirmed messages, in the order they are shown."""
        shown: list[str] = await self.page.locator(
            "#messages li.message[data-id] .text"
        ).all_text_contents()
        return shown

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path))
        return path


async def open_chat(browser: Browser, base_url: str, token: str, chat_id: str) -> ChatPage:
    """A new browser context (one user) on the gateway's web client, auto-connected."""
    context = await browser.new_context(
        viewport={"width": 760, "height": 720}, locale="en-GB", timezone_id="UTC"
    )
    context.set_default_timeout(WAIT_MS)
    chat = ChatPage(await context.new_page())
    await chat.page.goto(f"{base_url}?{urlencode({'token': token, 'chat_id': chat_id})}")
    await chat.wait_online()
    await expect(chat.page.locator("#chat-title")).to_have_text(f"Chat #{chat_id}")
    return chat


async def stored(stack: Stack, base_url: str, token: str, chat_id: str) -> list[dict[str, Any]]:
    """Every message stored in the chat (up to 200), oldest first, straight from the server."""
    client = await stack.client(base_url, token)
    reply = await client.request("get_history", chat_id, {"after_id": "0", "limit": 200})
    assert reply["type"] == "success", reply
    await client.close()
    messages: list[dict[str, Any]] = reply["messages"]
    return messages


async def stored_texts(stack: Stack, base_url: str, token: str, chat_id: str) -> list[str]:
    return [m["text"] for m in await stored(stack, base_url, token, chat_id)]


def sends(chat: ChatPage) -> list[dict[str, Any]]:
    return [f for f in chat.sent if f.get("event_type") in ("send_message", "send_file")]


async def test_two_users_on_two_gateways(stack: Stack, seed: Seeder, browser: Browser) -> None:
    """Live both ways across gateways, own/other rendering, markup as text, history on reload."""
    await stack.worker()
    gw_a = await stack.gateway()
    gw_b = await stack.gateway()
    # Alice's avatar URL 404s (the client falls back to initials); Bob has none.
    alice, a_token = await seed.user("Alice Liddell", avatar="/static_media/media/alice.img")
    bob, b_token = await seed.user("Bob Stone")
    chat_id = await seed.chat(alice, bob)
    a = await open_chat(browser, gw_a, a_token, chat_id)
    b = await open_chat(browser, gw_b, b_token, chat_id)
    for page in (a, b):
        await expect(page.page.locator("#empty")).to_have_text("No messages yet. Say hello!")

    await a.send("Hi Bob, Alice here")
    for page, mine in ((a, True), (b, False)):
        got = page.message("Hi Bob, Alice here")
        await expect(got).to_have_count(1)
        await expect(got.locator(".username")).to_have_text("Alice Liddell")
        await expect(got.locator(".time")).to_have_text(re.compile(r"^\d\d:\d\d$"))
        if mine:
            await expect(got).to_have_class(re.compile(r"\bmine\b"))
            await expect(got.locator(".avatar")).to_have_count(0)
        else:
            await expect(got).not_to_have_class(re.compile(r"\bmine\b"))
            await expect(got.locator(".avatar")).to_have_text("AL")

    await b.send("Hi Alice!\nTwo lines, and a link: https://example.com/x.", enter=True)
    reply = a.message("Hi Alice!\nTwo lines, and a link: https://example.com/x.")
    await expect(reply).to_have_count(1)
    await expect(reply.locator(".username")).to_have_text("Bob Stone")
    await expect(reply.locator(".avatar")).to_have_text("BS")
    await expect(reply.locator(".text a")).to_have_attribute("href", "https://example.com/x")

    # Markup in a text is shown as text on both sides, never parsed.
    await b.send(XSS)
    for page in (a, b):
        shown = page.message(XSS)
        await expect(shown).to_have_count(1)
        assert await shown.locator(".text").text_content() == XSS
        await expect(page.page.locator("#messages img[src='x']")).to_have_count(0)
        assert await shown.locator(".text *").count() == 0
        assert await page.page.evaluate("window.__xss") is None
        assert await page.page.title() != "pwned"

    # A file by URL with a caption.
    await a.page.select_option("#file-type", "file")
    await a.page.fill("#file-url", "/static_media/docs/report.pdf")
    await a.page.fill("#text", "the report")
    await a.page.click("#send-file")
    for page, base in ((a, gw_a), (b, gw_b)):
        report = page.message("the report")
        await expect(report.locator("a.file")).to_have_attribute(
            "href", f"{base}static_media/docs/report.pdf"
        )
        await expect(report.locator(".file-name")).to_have_text("report.pdf")
    # A javascript: URL never becomes a link: the server may refuse it (then the send
    # is marked "not sent" and can be discarded) or store it (then it shows as text).
    await a.page.fill("#file-url", "javascript:alert(1)")
    await a.page.fill("#text", "not a link")
    await a.page.click("#send-file")
    await a.wait(
        "s.pending.some((p) => p.state === 'failed')"
        " || s.messages.some((m) => m.text === 'not a link')"
    )
    refused = bool((await a.state())["pending"])
    if refused:
        failed = a.page.locator("#messages li.pending[data-state='failed']")
        await expect(failed.locator(".state")).to_have_text("not sent")
        await expect(a.page.locator("#banners .banner")).to_have_count(1)
        await failed.locator("button.discard").click()
        await expect(failed).to_have_count(0)
        await a.page.locator("#banners .banner-close").click()
    else:
        for page in (a, b):
            bad = page.message("not a link")
            await expect(bad.locator(".bad-url")).to_have_text("javascript:alert(1)")
    for page in (a, b):
        await expect(page.page.locator("a[href^='javascript']")).to_have_count(0)
    await a.wait_settled()
    await b.wait_settled()

    expected = [
        "Hi Bob, Alice here",
        "Hi Alice!\nTwo lines, and a link: https://example.com/x.",
        XSS,
        "the report",
        *([] if refused else ["not a link"]),
    ]
    assert await stored_texts(stack, gw_b, b_token, chat_id) == expected

    # A reload starts from nothing and shows the history, own messages still on the right.
    await a.page.reload()
    await a.wait_online()
    await expect(a.page.locator("#messages li.message[data-id]")).to_have_count(len(expected))
    assert await a.texts() == expected
    mine = await a.page.locator("#messages li.message[data-id]").evaluate_all(
        "(lis) => lis.map((li) => li.classList.contains('mine'))"
    )
    assert mine == [True, False, False, True, True][: len(expected)]
    await expect(a.page.locator("#older-status")).to_have_text("Start of the conversation")
    await expect(a.message(XSS).locator(".text")).to_have_text(XSS)
    assert await a.page.evaluate("window.__xss") is None

    # Every request carried a request_id; every send a client_msg_id of its own.
    for page in (a, b):
        assert page.sent and all(isinstance(f.get("request_id"), str) for f in page.sent)
        ids = [f["message"]["client_msg_id"] for f in sends(page)]
        assert all(ids) and len(set(ids)) == len(ids)
        assert page.errors == []
    await a.screenshot("browser-alice.png")
    await b.screenshot("browser-bob.png")


async def stream_length(redis: Redis, prefix: str, partitions: int) -> int:
    keys = Keys(prefix)
    return sum([await redis.xlen(keys.stream(p)) for p in range(partitions)])


async def stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    proc.send_signal(sig)
    await asyncio.to_thread(proc.wait, 15)


async def test_reconnect_catches_up_exactly_once(
    stack: Stack, seed: Seeder, browser: Browser, redis: Redis, log_dir: Path
) -> None:
    """Alice's gateway dies with her send in flight; Bob talks on; she comes back to all of it once.

    The send reaches Redis but its reply is lost with the gateway, and the message is
    stored while she is away: the client must neither lose it nor store it twice.
    """
    settings = stack.settings
    worker_proc, worker_url = stack.spawn("worker", log_dir)
    gw_a_proc, gw_a = stack.spawn("gateway", log_dir)
    gw_b = await stack.gateway()
    for url in (worker_url, gw_a):
        await stack.wait_ready(url)
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat_id = await seed.chat(alice, bob)
    a = await open_chat(browser, gw_a, a_token, chat_id)
    b = await open_chat(browser, gw_b, b_token, chat_id)
    await b.send("before the drop")
    await expect(a.message("before the drop")).to_have_count(1)

    # No worker (killed: its leases lapse for the next one): Alice's send waits in the
    # stream, unanswered.
    await stop(worker_proc, signal.SIGKILL)
    queued = await stream_length(redis, settings.redis_prefix, settings.partitions)
    await a.send("sent as the gateway died")
    await a.wait("s.pending.length === 1 && s.pending[0].state === 'sending'")
    for _ in range(200):
        if await stream_length(redis, settings.redis_prefix, settings.partitions) > queued:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the gateway never forwarded Alice's send")

    # Her gateway dies without a goodbye; the client notices and starts backing off.
    await stop(gw_a_proc, signal.SIGKILL)
    await expect(a.page.locator("#status")).to_have_attribute("data-status", "reconnecting")
    await a.wait("s.pending.length === 1 && s.pending[0].state === 'queued'")

    # A worker comes back and stores her message (Bob sees it live); Bob talks on.
    _, worker_url = stack.spawn("worker", log_dir)
    await stack.wait_ready(worker_url)
    await expect(b.message("sent as the gateway died")).to_have_count(1)
    missed = ["missed 1", "missed 2", "missed 3 <b>bold?</b>"]
    for text in missed:
        await b.send(text)
        await expect(b.message(text)).to_have_count(1)
    await b.wait_settled()
    assert (await a.state())["status"] == "reconnecting"
    await a.screenshot("browser-reconnecting.png")
    for text in missed:
        await expect(a.message(text)).to_have_count(0)

    # A gateway comes back on the same address; the page reconnects on its own.
    port = urlsplit(gw_a).port
    assert port is not None
    stack.spawn("gateway", log_dir, gateway_port=port)
    await stack.wait_ready(gw_a)
    await a.wait_online(timeout=RECONNECT_MS)
    await a.wait_settled()
    expected = ["before the drop", "sent as the gateway died", *missed]
    for text in expected:
        await expect(a.message(text)).to_have_count(1)
    assert await a.texts() == expected
    assert [m["text"] for m in (await a.state())["messages"]] == expected
    assert await stored_texts(stack, gw_b, b_token, chat_id) == expected, stack.logs()

    # It caught up with after_id; any resend reused the first client_msg_id.
    history = [f["message"] for f in a.sent if f.get("event_type") == "get_history"]
    assert history[0] is None  # the first load: the latest page
    assert any(m and m.get("after_id") for m in history[1:]), history
    assert {f["message"]["client_msg_id"] for f in sends(a)} == {
        (await a.state())["messages"][1]["client_msg_id"]
    }, sends(a)

    # Live again both ways.
    await b.send("welcome back")
    await expect(a.message("welcome back")).to_have_count(1)
    await a.send("thanks")
    await expect(b.message("thanks")).to_have_count(1)
    await expect(b.message("sent as the gateway died")).to_have_count(1)
    assert a.errors == [] and b.errors == []
    await a.screenshot("browser-reconnected.png")


async def _worker_process_and_two_users(
    stack: Stack, seed: Seeder, log_dir: Path, **gateway_settings: Any
) -> tuple[subprocess.Popen[bytes], str, tuple[str, str], str]:
    """A worker as a process (so it can be killed), an in-process gateway, and Alice and
    Bob in one chat: (worker, gateway URL, (Alice's token, Bob's token), chat id)."""
    worker_proc, worker_url = stack.spawn("worker", log_dir)
    gw = await stack.gateway(**gateway_settings)
    await stack.wait_ready(worker_url)
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat_id = await seed.chat(alice, bob)
    return worker_proc, gw, (a_token, b_token), chat_id


async def test_send_retried_through_a_worker_outage(
    stack: Stack, seed: Seeder, browser: Browser, log_dir: Path
) -> None:
    """A send the gateway times out on is resent by itself, same client_msg_id, stored once."""
    worker_proc, gw, (a_token, b_token), chat_id = await _worker_process_and_two_users(
        stack, seed, log_dir
    )
    a = await open_chat(browser, gw, a_token, chat_id)
    await a.send("first")
    await a.wait_settled()

    await stop(worker_proc, signal.SIGKILL)
    await a.send("through the outage")
    # The gateway answers server_error (timed out): the client keeps the send and retries.
    await a.wait("s.pending.length === 1 && s.pending[0].state === 'retrying'")
    _, worker_url = stack.spawn("worker", log_dir)
    await stack.wait_ready(worker_url)
    await a.wait_settled()
    await expect(a.message("through the outage")).to_have_count(1)
    await expect(a.message("through the outage")).to_have_class(re.compile(r"\bmine\b"))
    assert await stored_texts(stack, gw, b_token, chat_id) == ["first", "through the outage"]
    resends = [f for f in sends(a) if f["message"]["text"] == "through the outage"]
    assert len(resends) >= 2 and len({f["message"]["client_msg_id"] for f in resends}) == 1
    assert len({f["request_id"] for f in resends}) == len(resends)
    await expect(a.page.locator("#banners .banner")).to_have_count(0)
    assert a.errors == []


async def test_history_asked_again_until_a_worker_answers(
    stack: Stack, seed: Seeder, browser: Browser, log_dir: Path
) -> None:
    """A page opened while no worker runs: its history read is answered server_error
    (timed out) and asked again, after growing jittered pauses, until a worker is back."""
    worker_proc, gw, (a_token, b_token), chat_id = await _worker_process_and_two_users(
        stack, seed, log_dir, request_timeout=1.0
    )
    a = await open_chat(browser, gw, a_token, chat_id)
    await a.send("before the outage")
    await a.wait_settled()

    await stop(worker_proc, signal.SIGKILL)
    b = await open_chat(browser, gw, b_token, chat_id)
    await asyncio.sleep(4.0)
    asked = [f for f in b.sent if f.get("event_type") == "get_history"]
    assert len(asked) >= 2, asked  # refused, asked again
    assert await b.texts() == []
    _, worker_url = stack.spawn("worker", log_dir)
    await stack.wait_ready(worker_url)
    await expect(b.message("before the outage")).to_have_count(1, timeout=20_000)
    assert len({f["request_id"] for f in b.sent}) == len(b.sent)


async def test_scroll_up_pages_back(stack: Stack, seed: Seeder, browser: Browser) -> None:
    """Only the latest page loads first; scrolling up fetches older pages with before_id."""
    await stack.worker()
    gw = await stack.gateway()
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat_id = await seed.chat(alice, bob)
    writer = await stack.client(gw, b_token)
    total = 120
    for i in range(total):
        reply = await writer.send_text(chat_id, f"m{i:03d}")
        assert reply["type"] == "success", reply
    expected = [f"m{i:03d}" for i in range(total)]

    a = await open_chat(browser, gw, a_token, chat_id)
    await a.wait("s.messages.length === 50")
    assert await a.texts() == expected[-50:]
    scroller = a.page.locator("#scroller")
    # It opened at the bottom, on the newest message.
    await expect(a.message("m119")).to_be_in_viewport()

    await scroller.hover()
    for loaded in (100, total):
        first = (await a.texts())[0]
        await a.page.mouse.wheel(0, -100_000)
        await a.wait(f"s.messages.length === {loaded}")
        # What was at the top stays in view: the older page went in above it.
        await expect(a.message(first)).to_be_in_viewport()
        assert await scroller.evaluate("(e) => e.scrollTop") > 0
    await expect(a.page.locator("#older-status")).to_have_text("Start of the conversation")
    assert await a.texts() == expected

    older = [
        f["message"]
        for f in a.sent
        if f.get("event_type") == "get_history" and f["message"] and "before_id" in f["message"]
    ]
    assert [m["before_id"] for m in older[:2]] == [
        (await stored(stack, gw, b_token, chat_id))[i]["id"] for i in (70, 20)
    ]
    assert a.errors == []
