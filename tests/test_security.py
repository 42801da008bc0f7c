"""Hostile input and abusive clients (issue #4), against real gateways, Redis and MongoDB.

Pure tests of ``gateway/limits.py`` and the URL policy come first; then live tests: a
table of every bad input on one socket, frame size, rate limit, per-address limit with
trusted proxies, Origin, heartbeats, slow consumers, cross-chat isolation, and tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import gc
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.app import GUARD, HUB
from gateway.connection import TRANSPORT_HIGH_WATER
from gateway.limits import (
    ConnectionCounter,
    Guard,
    OriginPolicy,
    RateLimiter,
    Verdict,
    address_group,
    client_address,
    normalise_origin,
    parse_networks,
)
from shared import protocol
from shared.codec import Revocation, token_digest
from shared.config import ConfigError, Settings
from shared.logs import JsonFormatter
from tests.support import Seeder, Stack, alice_and_bob, app_of, sample
from worker import admin

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WAIT = 10.0  # upper bound for anything a test waits for (never a speed assertion)


# -- helpers ----------------------------------------------------------------------------


class RawSocket:
    """A WebSocket client on a bare TCP socket.

    Unlike aiohttp's client it sends any bytes in any frame (invalid UTF-8 in a text
    frame, fragments, oversize frames), any handshake headers, and it can stop reading
    altogether (``pause``), which is what a stalled phone or a dead peer looks like.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.answer_pings = True

    @classmethod
    async def connect(
        cls,
        base_url: str,
        *,
        path: str = "/ws",
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
    ) -> RawSocket:
        """Open a socket and do the handshake; ``status`` is the HTTP status (101: open)."""
        url = urlsplit(base_url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect(), so the advertised TCP window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        raw = cls(reader, writer)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        raw.status = int(head.split(b" ", 2)[1])
        return raw

    async def send(self, payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True) -> None:
        """One masked client frame."""
        mask = os.urandom(4)
        size = len(payload)
        first = (0x80 if fin else 0) | opcode
        if size < 126:
            header = struct.pack("!BB", first, 0x80 | size)
        elif size < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def frame(self, timeout: float = WAIT) -> tuple[int, bytes]:
        """The next data or close frame (pings are answered when ``answer_pings``)."""
        while True:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            opcode, size = head[0] & 0x0F, head[1] & 0x7F
            if size == 126:
                size = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await asyncio.wait_for(self.reader.readexactly(size), timeout)
            if opcode == OP_PING:
                if self.answer_pings:
                    await self.send(payload, OP_PONG)
                continue
            if opcode == OP_PONG:
                continue
            return opcode, payload

    async def reply(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next text frame as JSON."""
        opcode, payload = await self.frame(timeout)
        assert opcode == OP_TEXT, (opcode, payload[:200])
        frame: dict[str, Any] = orjson.loads(payload)
        return frame

    async def close_frame(self, timeout: float = WAIT) -> tuple[int, str]:
        """Read until the server's close frame; (code, reason)."""
        while True:
            opcode, payload = await self.frame(timeout)
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                # Answer as a well-behaved client does, so the server's close completes.
                with contextlib.suppress(ConnectionError):
                    await self.send(payload[:2], OP_CLOSE)
                return code, payload[2:].decode(errors="replace")

    def pause(self) -> None:
        """Stop reading from the kernel: the receive window fills, the server's writes back up."""
        transport = self.writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()

    def resume(self) -> None:
        """Read again."""
        transport = self.writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.resume_reading()

    def close(self) -> None:
        """Drop the TCP connection."""
        self.writer.transport.abort()


async def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll until ``predicate()`` holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


def rss_bytes() -> int:
    """Resident set size of this process (the in-process gateway, worker and clients)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def handshake_status(stack: Stack, base_url: str, headers: dict[str, str]) -> int:
    """The HTTP status of a WebSocket handshake (101 when accepted); closes what opened."""
    try:
        ws = await stack.session.ws_connect(base_url + "ws", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


RawConnect = Callable[..., Awaitable[RawSocket]]


@pytest.fixture
async def raw_connect(stack: Stack) -> AsyncIterator[RawConnect]:
    """``RawSocket.connect`` whose sockets are dropped before the stack shuts down (a socket
    that never answers a close frame would otherwise hold up the gateway's shutdown)."""
    opened: list[RawSocket] = []

    async def connect(base_url: str, **kwargs: Any) -> RawSocket:
        raw = await RawSocket.connect(base_url, **kwargs)
        opened.append(raw)
        return raw

    yield connect
    for raw in opened:
        raw.close()


# -- pure: rate limiter -----------------------------------------------------------------


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=10, burst=5, close_after=100, now=0.0)
    assert [limiter.check(0.0) for _ in range(5)] == [Verdict.ALLOW] * 5
    assert limiter.check(0.0) is Verdict.REFUSE
    # 0.1 s at 10/s is one token, and only one.
    assert limiter.check(0.1) is Verdict.ALLOW
    assert limiter.check(0.1) is Verdict.REFUSE
    # A long pause refills up to the burst, never beyond.
    assert [limiter.check(100.0) for _ in range(6)] == [Verdict.ALLOW] * 5 + [Verdict.REFUSE]


def test_rate_limiter_closes_sustained_abuse_but_not_a_client_that_backs_off() -> None:
    abuser = RateLimiter(rate=10, burst=5, close_after=20, now=0.0)
    verdicts = [abuser.check(i * 0.01) for i in range(100)]  # 100/s against 10/s
    assert Verdict.CLOSE in verdicts
    first_close = verdicts.index(Verdict.CLOSE)
    assert verdicts[:first_close].count(Verdict.REFUSE) == 19
    polite = RateLimiter(rate=10, burst=5, close_after=20, now=0.0)
    now = 0.0
    for _ in range(50):  # bursts of 15, then a quiet 1.5 s: refused 10 each time, never closed
        assert Verdict.CLOSE not in [polite.check(now) for _ in range(15)]
        now += 1.5
    assert polite.refused == 10


def test_rate_limiter_off_when_rate_is_zero() -> None:
    limiter = RateLimiter(rate=0, burst=1, close_after=1, now=0.0)
    assert all(limiter.check(0.0) is Verdict.ALLOW for _ in range(10_000))


# -- pure: per-address counter, client address, origin ------------------------------------


def test_connection_counter_limits_and_forgets() -> None:
    counter = ConnectionCounter(limit=2)
    assert counter.acquire("a") and counter.acquire("a")
    assert not counter.acquire("a"), "third connection of one address"
    assert counter.acquire("b")
    counter.release("a")
    assert counter.acquire("a")
    for key in ("a", "a", "b"):
        counter.release(key)
    assert len(counter) == 0, "no entry left behind for closed connections"
    unlimited = ConnectionCounter(limit=0)
    assert all(unlimited.acquire("x") for _ in range(10_000))


TRUSTED = parse_networks(["10.0.0.0/8", "127.0.0.1"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # Not a trusted proxy: its X-Forwarded-For is a lie as far as we know.
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        # A trusted proxy: the hop it appended is the client.
        ("10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        # Whatever the client prepended is left of the real hop and never believed.
        ("10.1.2.3", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        ("10.1.2.3", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),
        # Two trusted proxies in a row are skipped.
        ("10.1.2.3", ["198.51.100.1, 10.9.9.9"], "198.51.100.1"),
        # Only trusted hops: the leftmost one is as far as we can see.
        ("10.1.2.3", ["10.5.5.5"], "10.5.5.5"),
        # A hop that is not an address ends the walk at the last trusted one.
        ("10.1.2.3", ["198.51.100.1, garbage"], "10.1.2.3"),
        # No header from a trusted proxy: the proxy itself.
        ("10.1.2.3", [], "10.1.2.3"),
        # Ports and brackets some proxies add; IPv4-mapped IPv6.
        ("10.1.2.3", ["198.51.100.1:4711"], "198.51.100.1"),
        ("10.1.2.3", ["[2001:db8::1]:4711"], "2001:db8::1"),
        ("::ffff:10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        # A peer that is not an IP (unix socket): kept as it is.
        (None, ["198.51.100.1"], "-"),
    ],
)
def test_client_address_believes_only_trusted_proxies(
    peer: str | None, forwarded: list[str], expected: str
) -> None:
    assert client_address(peer, forwarded, TRUSTED) == expected


def test_client_address_without_trusted_proxies_is_the_peer() -> None:
    assert client_address("10.1.2.3", ["198.51.100.1"], ()) == "10.1.2.3"


def test_address_group_counts_ipv6_per_64() -> None:
    assert address_group("2001:db8:1:2:aaaa::1") == address_group("2001:db8:1:2:bbbb::2")
    assert address_group("2001:db8:1:2::1") != address_group("2001:db8:1:3::1")
    assert address_group("198.51.100.1") == "198.51.100.1"


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("https://Chat.Example.com", "https://chat.example.com"),
        ("https://chat.example.com:443", "https://chat.example.com"),
        ("http://chat.example.com:80", "http://chat.example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("null", None),
        ("https://chat.example.com/path", None),
        ("https://user@chat.example.com", None),
        ("chat.example.com", None),
    ],
)
def test_normalise_origin(raw: str, normalised: str | None) -> None:
    assert normalise_origin(raw) == normalised


def test_origin_policy() -> None:
    default = OriginPolicy([])
    assert default.allows(None, "chat.example.com"), "non-browser clients send no Origin"
    assert default.allows("http://127.0.0.1:8080", "127.0.0.1:8080"), "the gateway's own page"
    assert default.allows("https://chat.example.com", "chat.example.com:443")
    assert not default.allows("https://evil.example", "chat.example.com")
    assert not default.allows("http://127.0.0.1:9999", "127.0.0.1:8080"), "another port"
    assert not default.allows("https://chat.example.com", "chat.example.com:80")
    assert not default.allows("null", "chat.example.com")
    assert not default.allows("https://chat.example.com", None)
    listed = OriginPolicy(["https://app.example.com/", "null"])
    assert listed.allows("https://APP.example.com", "chat.example.com")
    assert listed.allows("null", "chat.example.com")
    assert not listed.allows("https://app.example.com.evil.org", "chat.example.com")
    assert OriginPolicy(["*"]).allows("https://anything.example", "chat.example.com")
    with pytest.raises(ValueError, match="not an origin"):
        OriginPolicy(["https://app.example.com/path"])


def test_guard_names_the_bad_variable(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        Guard.from_settings(replace(settings, trusted_proxies=("10.0.0.0/33",)))
    with pytest.raises(ConfigError, match="ALLOWED_ORIGINS"):
        Guard.from_settings(replace(settings, allowed_origins=("evil",)))
    guard = Guard.from_settings(replace(settings, trusted_proxies=("10.0.0.0/8",)))
    assert guard.client_address("10.0.0.1", ["198.51.100.7"]) == "198.51.100.7"


def test_list_settings_parse_from_csv_and_round_trip() -> None:
    parsed = Settings.from_env(
        {"TRUSTED_PROXIES": " 10.0.0.0/8 , 127.0.0.1 ,", "ALLOWED_ORIGINS": "https://a.example"},
        node_id="n",
    )
    assert parsed.trusted_proxies == ("10.0.0.0/8", "127.0.0.1")
    assert parsed.allowed_origins == ("https://a.example",)
    # str() is the environment form: what a parent process writes for its children.
    again = Settings.from_env({"TRUSTED_PROXIES": str(parsed.trusted_proxies)}, node_id="n")
    assert again.trusted_proxies == parsed.trusted_proxies
    assert str(Settings(node_id="n").file_url_prefixes) == "/"
    assert str(replace(parsed, trusted_proxies=("1.2.3.4", "::1")).trusted_proxies) == "1.2.3.4,::1"
    with pytest.raises(ConfigError, match="RATE_LIMIT_BURST"):
        Settings.from_env({"RATE_LIMIT_BURST": "0"})
    with pytest.raises(ConfigError, match="MAX_CONNECTIONS_PER_IP"):
        Settings.from_env({"MAX_CONNECTIONS_PER_IP": "-1"})


# -- pure: file_url / avatar policy -----------------------------------------------------

PREFIXES = protocol.normalise_url_prefixes(["/", "https://cdn.example.com"])


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("/static_media/media/doc.xml", True),
        ("/media/a b.png", True),
        ("https://cdn.example.com/a.png", True),
        ("HTTPS://CDN.EXAMPLE.COM/a.png", True),
        ("javascript:alert(1)", False),
        ("JavaScript:alert(1)", False),
        (" javascript:alert(1)", False),
        ("java\tscript:alert(1)", False),
        ("data:text/html;base64,PHNjcmlwdD4=", False),
        ("vbscript:msgbox(1)", False),
        ("//evil.example/a.png", False),
        ("/\\evil.example/a.png", False),
        ("https://cdn.example.com.evil.org/a.png", False),
        ("https://cdn.example.com@evil.org/a.png", False),
        ("http://cdn.example.com/a.png", False),
        ("https://evil.example/a.png", False),
        ("ftp://cdn.example.com/a.png", False),
        ("media/a.png", False),
        ("/a\x00b", False),
        ("/" + "a" * protocol.MAX_URL_LENGTH, False),
    ],
)
def test_media_url_policy(url: str, allowed: bool) -> None:
    assert (protocol.check_media_url(url, PREFIXES) is None) is allowed


def test_media_url_prefixes_are_checked() -> None:
    assert protocol.normalise_url_prefixes(["https://CDN.example.com"]) == (
        "https://cdn.example.com/",
    )
    for bad in ("//cdn.example.com/", "javascript:", "ftp://x/", "https://", "https://a@b/", ""):
        with pytest.raises(ValueError):
            protocol.normalise_url_prefixes([bad])
    only_static = protocol.normalise_url_prefixes(["/static_media/"])
    assert protocol.check_media_url("/static_media/a.png", only_static) is None
    assert protocol.check_media_url("/other/a.png", only_static) is not None
    assert protocol.check_media_url("https://cdn.example.com/a", only_static) is not None


def test_admin_refuses_a_dangerous_avatar() -> None:
    from worker.admin import AdminError, check_avatar

    with pytest.raises(AdminError, match="avatar"):
        check_avatar("javascript:alert(document.cookie)", Settings(node_id="n"))
    check_avatar("/static_media/media/ivan.img", Settings(node_id="n"))


# -- live: every bad input on one socket --------------------------------------------------

MAX_TEXT = 100
OMIT = object()


@dataclass
class World:
    """One gateway and worker, a chat and a member's token."""

    url: str
    app: web.Application
    chat: str
    user: str
    token: str


@pytest.fixture
async def world(stack: Stack, seed: Seeder) -> World:
    user, token = await seed.user("Mallory")
    chat = await seed.chat(user)
    await stack.worker()
    url = await stack.gateway(max_text_length=MAX_TEXT)
    return World(url, app_of(stack, url), chat, user, token)


def bad_input_table(w: World) -> list[tuple[str, int, bytes, str, str]]:
    """(case, opcode, frame, reply type, part of the detail) for every bad input."""

    def frame(event: str = "send_message", message: Any = OMIT, **fields: Any) -> bytes:
        body: dict[str, Any] = {"chat_id": w.chat, "token": w.token, "event_type": event}
        if message is not OMIT:
            body["message"] = message
        elif event == "send_message":
            body["message"] = {"type": "text", "text": "hi"}
        elif event == "send_file":
            body["message"] = {"type": "file", "file_url": "/a.xml"}
        for name, value in fields.items():
            if value is OMIT:
                body.pop(name, None)
            else:
                body[name] = value
        return orjson.dumps(body)

    def text_msg(**fields: Any) -> bytes:
        return frame(message={"type": "text", "text": "hi", **fields})

    def file_msg(**fields: Any) -> bytes:
        message = {"type": "image", "file_url": "/a.png", **fields}
        return frame("send_file", {k: v for k, v in message.items() if v is not OMIT})

    def history(message: Any) -> bytes:
        return frame("get_history", message)

    nested = b'{"a":' * 400 + b"1" + b"}" * 400
    bad, token_error, not_found = "bad_request", "token_validation_error", "event_not_found"
    rows: list[tuple[str, int, bytes, str, str]] = [
        # Not JSON, not UTF-8, not an object.
        ("invalid JSON", OP_TEXT, b"{not json", bad, "Invalid JSON"),
        ("empty frame", OP_TEXT, b"", bad, "Invalid JSON"),
        ("truncated", OP_TEXT, frame()[:-3], bad, "Invalid JSON"),
        ("invalid UTF-8", OP_TEXT, b'{"chat_id": "\xff\xfe"}', bad, "not valid UTF-8"),
        ("UTF-8 surrogate", OP_TEXT, b'{"chat_id": "\xed\xa0\x80"}', bad, "not valid UTF-8"),
        ("overlong UTF-8", OP_TEXT, b'{"chat_id": "\xc0\xaf"}', bad, "not valid UTF-8"),
        ("lone escaped surrogate", OP_TEXT, frame()[:-1] + b',"x":"\\ud800"}', bad, "surrogate"),
        ("array", OP_TEXT, b"[1, 2]", bad, "JSON object"),
        ("string", OP_TEXT, b'"text"', bad, "JSON object"),
        ("number", OP_TEXT, b"42", bad, "JSON object"),
        ("null", OP_TEXT, b"null", bad, "JSON object"),
        ("NaN", OP_TEXT, b'{"limit": NaN}', bad, "Invalid JSON"),
        ("huge number literal", OP_TEXT, b'{"chat_id": 1e400}', bad, "number out of range"),
        ("huge integer literal", OP_TEXT, b'{"chat_id": ' + b"9" * 400 + b"}", bad, "out of range"),
        ("deeply nested arrays", OP_TEXT, b"[" * 5000 + b"]" * 5000, bad, "nested too deeply"),
        ("deeply nested message", OP_TEXT, frame()[:-1] + b',"message":' + nested + b"}", bad, "message.text"),
        ("raw NUL in a string", OP_TEXT, b'{"chat_id": "1\x00"}', bad, "control character"),
        ("raw NUL outside", OP_TEXT, b"\x00", bad, "Invalid JSON"),
        ("binary frame", OP_BINARY, frame(), bad, "Binary frames"),
        # request_id
        ("request_id int", OP_TEXT, frame(request_id=5), bad, "request_id"),
        ("request_id empty", OP_TEXT, frame(request_id=""), bad, "request_id"),
        ("request_id 65 chars", OP_TEXT, frame(request_id="r" * 65), bad, "request_id"),
        ("request_id NUL", OP_TEXT, frame(request_id="a\x00"), bad, "request_id"),
        ("request_id list", OP_TEXT, frame(request_id=["r"]), bad, "request_id"),
        # event_type
        ("event_type missing", OP_TEXT, frame(event_type=OMIT), bad, "event_type"),
        ("event_type int", OP_TEXT, frame(event_type=5), bad, "event_type"),
        ("event_type null", OP_TEXT, frame(event_type=None), bad, "event_type"),
        ("event_type list", OP_TEXT, frame(event_type=["get_history"]), bad, "event_type"),
        ("event_type unknown", OP_TEXT, frame(event_type="drop_db"), not_found, "drop_db"),
        ("event_type huge", OP_TEXT, frame(event_type="e" * 20_000), not_found, "e" * 64 + "…"),
        # chat_id
        ("chat_id missing", OP_TEXT, frame(chat_id=OMIT), bad, "chat_id"),
        ("chat_id bool", OP_TEXT, frame(chat_id=True), bad, "chat_id"),
        ("chat_id float", OP_TEXT, frame(chat_id=1.5), bad, "chat_id"),
        ("chat_id negative", OP_TEXT, frame(chat_id=-1), bad, "chat_id"),
        ("chat_id over 64 bits", OP_TEXT, frame(chat_id=OMIT)[:-1] + b',"chat_id":18446744073709551616}', bad, "chat_id"),
        ("chat_id list", OP_TEXT, frame(chat_id=[1]), bad, "chat_id"),
        ("chat_id object", OP_TEXT, frame(chat_id={}), bad, "chat_id"),
        ("chat_id empty", OP_TEXT, frame(chat_id=""), bad, "chat_id"),
        ("chat_id 65 chars", OP_TEXT, frame(chat_id="c" * 65), bad, "chat_id"),
        ("chat_id NUL", OP_TEXT, frame(chat_id="1\x00"), bad, "chat_id"),
        ("chat_id newline", OP_TEXT, frame(chat_id="1\n2"), bad, "chat_id"),
        # token
        ("token int", OP_TEXT, frame(token=7), bad, "token must be a string"),
        ("token list", OP_TEXT, frame(token=["t"]), bad, "token must be a string"),
        ("token object", OP_TEXT, frame(token={}), bad, "token must be a string"),
        ("token missing", OP_TEXT, frame(token=OMIT), token_error, "Token"),
        ("token empty", OP_TEXT, frame(token=""), token_error, "Token"),
        ("token over 256", OP_TEXT, frame(token="t" * 257), token_error, "Token"),
        ("token NUL", OP_TEXT, frame(token=w.token + "\x00"), token_error, "Token"),
        # send_message: message, type, text, client_msg_id
        ("message null", OP_TEXT, frame(message=None), bad, "message must be an object"),
        ("message string", OP_TEXT, frame(message="hi"), bad, "message must be an object"),
        ("message list", OP_TEXT, frame(message=["hi"]), bad, "message must be an object"),
        ("message.type int", OP_TEXT, text_msg(type=5), bad, "message.type"),
        ("message.type unknown", OP_TEXT, text_msg(type="video"), bad, "Unknown message type"),
        ("message.type file", OP_TEXT, text_msg(type="image"), bad, "send_file"),
        ("text int", OP_TEXT, text_msg(text=5), bad, "message.text"),
        ("text null", OP_TEXT, text_msg(text=None), bad, "message.text"),
        ("text empty", OP_TEXT, text_msg(text=""), bad, "empty"),
        ("text blank", OP_TEXT, text_msg(text=" \n\t"), bad, "empty"),
        ("text over max", OP_TEXT, text_msg(text="x" * (MAX_TEXT + 1)), bad, "longer than"),
        ("text NUL", OP_TEXT, text_msg(text="a\x00b"), bad, "NUL"),
        ("client_msg_id int", OP_TEXT, text_msg(client_msg_id=5), bad, "client_msg_id"),
        ("client_msg_id 65", OP_TEXT, text_msg(client_msg_id="k" * 65), bad, "client_msg_id"),
        # get_history paging
        ("history message string", OP_TEXT, history("x"), bad, "null or an object"),
        ("limit string", OP_TEXT, history({"limit": "5"}), bad, "limit"),
        ("limit bool", OP_TEXT, history({"limit": True}), bad, "limit"),
        ("limit float", OP_TEXT, history({"limit": 1.5}), bad, "limit"),
        ("limit 0", OP_TEXT, history({"limit": 0}), bad, "limit"),
        ("limit 201", OP_TEXT, history({"limit": 201}), bad, "limit"),
        ("limit huge", OP_TEXT, history({"limit": 2**64 - 1}), bad, "limit"),
        ("before_id negative", OP_TEXT, history({"before_id": -1}), bad, "before_id"),
        ("before_id word", OP_TEXT, history({"before_id": "abc"}), bad, "before_id"),
        ("before_id 2^63", OP_TEXT, history({"before_id": 2**63}), bad, "before_id"),
        ("before_id 30 digits", OP_TEXT, history({"before_id": "9" * 30}), bad, "before_id"),
        ("before_id float", OP_TEXT, history({"before_id": 1e30}), bad, "before_id"),
        ("after_id object", OP_TEXT, history({"after_id": {}}), bad, "after_id"),
        # send_file
        ("file type missing", OP_TEXT, file_msg(type=OMIT), bad, "message.type"),
        ("file type gif", OP_TEXT, file_msg(type="gif"), bad, "Unknown message type"),
        ("file_url missing", OP_TEXT, file_msg(file_url=OMIT), bad, "file_url"),
        ("file_url int", OP_TEXT, file_msg(file_url=5), bad, "file_url"),
        ("file_url empty", OP_TEXT, file_msg(file_url=""), bad, "file_url"),
        ("file_url javascript", OP_TEXT, file_msg(file_url="javascript:alert(1)"), bad, "file_url"),
        ("file_url JavaScript", OP_TEXT, file_msg(file_url="JavaScript:x"), bad, "file_url"),
        ("file_url data", OP_TEXT, file_msg(file_url="data:text/html,<b>"), bad, "file_url"),
        ("file_url vbscript", OP_TEXT, file_msg(file_url="vbscript:x"), bad, "file_url"),
        ("file_url //host", OP_TEXT, file_msg(file_url="//evil.example/a"), bad, "protocol-relative"),
        ("file_url backslash", OP_TEXT, file_msg(file_url="/\\evil.example"), bad, "backslash"),
        ("file_url other host", OP_TEXT, file_msg(file_url="https://evil.example/a"), bad, "file_url"),
        ("file_url NUL", OP_TEXT, file_msg(file_url="/a\x00"), bad, "control characters"),
        ("file_url too long", OP_TEXT, file_msg(file_url="/" + "a" * 2048), bad, "at most 2048"),
        ("file text int", OP_TEXT, file_msg(text=5), bad, "message.text"),
    ]  # fmt: skip
    return rows


async def test_every_bad_input_gets_bad_request_and_the_socket_stays_open(
    world: World, raw_connect: RawConnect
) -> None:
    raw = await raw_connect(world.url)
    assert raw.status == 101
    table = bad_input_table(world)
    for case, opcode, payload, reply_type, detail_part in table:
        await raw.send(payload, opcode)
        reply = await raw.reply()
        assert reply["type"] == reply_type, (case, reply)
        assert detail_part in reply["detail"], (case, reply)
        assert reply["messages"] is None, case
        # A short sentence for a person, never an echo of the frame or a stack trace.
        assert len(reply["detail"]) <= 200 and "Traceback" not in reply["detail"], case
        assert world.token not in reply["detail"], case
    # Unknown fields are ignored, however deep, on the envelope and in the message.
    # (Built as bytes: orjson refuses to encode beyond 254 levels; it decodes up to 1024.)
    deep = b'{"a":' * 500 + b"1" + b"}" * 500
    message = b'{"type": "text", "text": "still here", "x": ' + deep + b"}"
    body = orjson.dumps(
        {"chat_id": world.chat, "token": world.token, "event_type": "send_message",
         "request_id": "ok", "unknown": [None] * 100}
    )  # fmt: skip
    await raw.send(body[:-1] + b',"message":' + message + b',"deep":' + deep + b"}")
    reply = await raw.reply()
    assert reply["type"] == "success" and reply["request_id"] == "ok", reply
    assert set(reply["messages"][0]) == {
        "id", "chat_id", "user_id", "username", "avatar", "created_at", "type", "text",
        "file_url", "is_my",
    }  # fmt: skip
    # Every frame got exactly one reply: nothing else is waiting on the socket.
    with pytest.raises(TimeoutError):
        await raw.frame(timeout=0.3)
    hub = world.app[HUB]
    assert len(hub.connections) == 1, "the socket is still open"
    assert sample(world.app, "chat_gateway_frames_in_total", event="invalid") >= len(table) - 3
    raw.close()


async def test_allowed_absolute_file_url_is_stored(stack: Stack, seed: Seeder) -> None:
    user, token = await seed.user()
    chat = await seed.chat(user)
    await stack.worker()
    url = await stack.gateway(file_url_prefixes=("/", "https://cdn.example.com"))
    client = await stack.client(url, token)
    ok = await client.request(
        "send_file", chat, {"type": "image", "file_url": "https://cdn.example.com/a.png"}
    )
    assert ok["type"] == "success" and ok["messages"][0]["file_url"].endswith("/a.png")
    lookalike = await client.request(
        "send_file", chat, {"type": "image", "file_url": "https://cdn.example.com.evil.org/a"}
    )
    assert lookalike["type"] == "bad_request"


# -- live: frame size -----------------------------------------------------------------------


async def test_frame_over_the_limit_closes_1009_and_others_carry_on(
    stack: Stack, world: World, raw_connect: RawConnect
) -> None:
    limit = stack.settings.max_frame_bytes
    declared = await raw_connect(world.url)
    whole = await raw_connect(world.url)
    fragmented = await raw_connect(world.url)
    bystander = await stack.client(world.url, world.token)
    # The header alone decides: a frame that announces more than the limit is refused
    # before its payload is read or buffered.
    mask = os.urandom(4)
    declared.writer.write(struct.pack("!BBQ", 0x81, 0xFF, limit + 1) + mask)
    code, reason = await declared.close_frame()
    assert code == 1009, (code, reason)
    # A client that sends the whole oversize frame gets the same close, though its
    # unread payload may make the kernel reset the connection before it reads it.
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await whole.send(b'{"x": "' + b"a" * limit + b'"}')
        assert (await whole.close_frame())[0] == 1009
    # Fragments count together: each is small, the message is not.
    piece = b"a" * (limit // 4)
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await fragmented.send(b'{"x": "' + piece, OP_TEXT, fin=False)
        for _ in range(4):
            await fragmented.send(piece, OP_CONT, fin=False)
        assert (await fragmented.close_frame())[0] == 1009
    assert (await bystander.join(world.chat))["type"] == "success"
    await until(lambda: len(world.app[HUB].connections) == 1, "oversize sockets removed")
    assert sample(world.app, "chat_gateway_connections_closed_total", code="1009") == 3


# -- live: rate limit ------------------------------------------------------------------------


async def test_rate_limit_refuses_then_closes_a_flood(
    stack: Stack, seed: Seeder, raw_connect: RawConnect
) -> None:
    user, token = await seed.user()
    chat = await seed.chat(user)
    await stack.worker()
    url = await stack.gateway(
        rate_limit_per_second=1, rate_limit_burst=5, rate_limit_close_after=20
    )
    app = app_of(stack, url)
    flooder = await raw_connect(url)
    neighbour = await stack.client(url, token)  # same address, its own bucket
    probe = orjson.dumps({"chat_id": chat, "token": "", "event_type": "get_history"})

    async def ask(request_id: str) -> dict[str, Any]:
        body = {"chat_id": chat, "token": "", "event_type": "get_history", "request_id": request_id}
        await flooder.send(orjson.dumps(body))
        return await flooder.reply()

    replies = [await ask(f"r{i}") for i in range(8)]
    kinds = [r["type"] for r in replies]
    assert kinds[:5] == ["token_validation_error"] * 5, kinds  # the burst
    assert "rate_limited" in kinds[5:], kinds
    limited = next(r for r in replies if r["type"] == "rate_limited")
    # The refusal answers the request it refused: its event_type and request_id.
    assert limited["event_type"] == "get_history" and limited["request_id"].startswith("r")
    assert "per second" in limited["detail"] and limited["messages"] is None
    # Another socket from the same address is not limited by this one's flood.
    assert (await neighbour.join(chat))["type"] == "success"
    # A sustained flood (frames sent without reading the refusals) is closed with 1008.
    for _ in range(60):
        with contextlib.suppress(ConnectionError):
            await flooder.send(probe)
    code, reason = await flooder.close_frame()
    assert code == 1008 and "rate limit" in reason
    await until(lambda: len(app[HUB].connections) == 1, "flooder removed")
    assert sample(app, "chat_gateway_rate_limited_total") >= 20
    assert sample(app, "chat_gateway_connections_closed_total", code="1008") == 1
    # The neighbour still gets its pushes and replies.
    assert (await neighbour.send_text(chat, "after the flood"))["type"] == "success"


async def test_rate_limited_client_that_backs_off_is_served_again(
    stack: Stack, seed: Seeder
) -> None:
    user, token = await seed.user()
    chat = await seed.chat(user)
    await stack.worker()
    url = await stack.gateway(
        rate_limit_per_second=2, rate_limit_burst=3, rate_limit_close_after=50
    )
    client = await stack.client(url, token)
    kinds = [(await client.request("get_history", chat))["type"] for _ in range(10)]
    assert kinds[:3] == ["success"] * 3 and "rate_limited" in kinds, kinds
    await asyncio.sleep(1.0)  # the bucket refills at 2/s; waiting longer only helps
    assert (await client.request("get_history", chat))["type"] == "success"
    assert not client.closed.done()


# -- live: connections per address, trusted proxies ---------------------------------------


async def test_connections_per_address_with_and_without_trusted_proxies(
    stack: Stack, settings: Settings
) -> None:
    direct = await stack.gateway(max_connections_per_ip=2)
    app = app_of(stack, direct)
    first = await stack.session.ws_connect(direct + "ws")
    second = await stack.session.ws_connect(direct + "ws", headers={"X-Forwarded-For": "6.6.6.6"})
    # X-Forwarded-For from an untrusted peer changes nothing: still 127.0.0.1's third.
    assert await handshake_status(stack, direct, {"X-Forwarded-For": "7.7.7.7"}) == 429
    assert sample(app, "chat_gateway_connections_rejected_total", reason="per_ip") == 1
    await first.close()
    await until(lambda: app[GUARD].per_ip.count("127.0.0.1") == 1, "slot released on close")
    assert await handshake_status(stack, direct, {}) == 101
    await second.close()

    proxied = await stack.gateway(max_connections_per_ip=2, trusted_proxies=("127.0.0.0/8",))
    papp = app_of(stack, proxied)
    a1 = await stack.session.ws_connect(proxied + "ws", headers={"X-Forwarded-For": "203.0.113.1"})
    # The client forged a hop on the left; the proxy appended the real one on the right.
    a2 = await stack.session.ws_connect(
        proxied + "ws", headers={"X-Forwarded-For": "198.51.100.99, 203.0.113.1"}
    )
    assert await handshake_status(stack, proxied, {"X-Forwarded-For": "203.0.113.1"}) == 429
    assert await handshake_status(stack, proxied, {"X-Forwarded-For": "203.0.113.2"}) == 101
    assert papp[GUARD].per_ip.count("203.0.113.1") == 2
    assert papp[GUARD].per_ip.count("198.51.100.99") == 0, "a forged hop is never counted"
    await a1.close()
    await a2.close()
    await until(lambda: len(papp[GUARD].per_ip) == 0, "every slot released")


# -- live: Origin ----------------------------------------------------------------------------


async def test_origin_allow_list(stack: Stack, raw_connect: RawConnect) -> None:
    url = await stack.gateway()
    app = app_of(stack, url)
    own = urlsplit(url).netloc
    assert await handshake_status(stack, url, {}) == 101, "no Origin: a non-browser client"
    assert await handshake_status(stack, url, {"Origin": f"http://{own}"}) == 101, "own page"
    assert await handshake_status(stack, url, {"Origin": "https://evil.example"}) == 403
    assert await handshake_status(stack, url, {"Origin": "null"}) == 403
    assert sample(app, "chat_gateway_connections_rejected_total", reason="origin") == 2
    # The seed clients' path "/" is checked the same way.
    raw = await raw_connect(url, path="/", headers={"Origin": "https://evil.example"})
    assert raw.status == 403
    raw.close()
    # The web client page itself is still served.
    async with stack.session.get(url) as resp:
        assert resp.status == 200 and "html" in resp.content_type
    listed = await stack.gateway(allowed_origins=("https://app.example.com",))
    assert await handshake_status(stack, listed, {"Origin": "https://app.example.com"}) == 101
    assert await handshake_status(stack, listed, {"Origin": "https://evil.example"}) == 403


# -- live: heartbeats ------------------------------------------------------------------------


async def test_heartbeat_drops_a_peer_that_stopped_answering(
    stack: Stack, raw_connect: RawConnect
) -> None:
    url = await stack.gateway(heartbeat_seconds=1.0)
    app = app_of(stack, url)
    alive = await stack.client(url)  # aiohttp answers pings by itself
    dead = await raw_connect(url)
    dead.pause()  # kernel still ACKs, but no pong ever comes: a vanished phone
    await until(lambda: len(app[HUB].connections) == 2, "both connected")
    await until(lambda: len(app[HUB].connections) == 1, "dead peer dropped", timeout=15)
    assert not alive.closed.done(), "a live idle client is kept"
    assert sample(app, "chat_gateway_connections_closed_total", code="1006") == 1
    dead.close()


# -- live: slow consumer ---------------------------------------------------------------------


async def test_slow_consumer_is_cut_off_while_others_get_everything(
    stack: Stack, seed: Seeder, raw_connect: RawConnect
) -> None:
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat = await seed.chat(alice, bob)
    await stack.worker()
    queue_bytes, text_len = 64 * 1024, 30_000
    url = await stack.gateway(
        send_queue_max_bytes=queue_bytes,
        send_queue_max_messages=50,
        max_text_length=text_len,
        rate_limit_per_second=0,
    )
    app = app_of(stack, url)
    hub = app[HUB]
    sender = await stack.client(url, a_token)
    reader = await stack.client(url, b_token)
    await reader.join(chat)
    slow = await raw_connect(url, rcvbuf=4096)
    body = {"chat_id": chat, "token": b_token, "event_type": "get_history"}
    await slow.send(orjson.dumps(body))
    assert (await slow.reply())["type"] == "success"
    slow_conn = max(hub.connections.values(), key=lambda c: c.conn_id)
    slow.pause()
    gc.collect()
    rss_before = rss_bytes()
    # Most a socket may hold on this node: its queue, plus in the transport one high-water
    # mark of direct writes and one of aiohttp's writer (its drain limit), each overshot
    # by at most one frame.
    frame_max = text_len + 1024
    per_socket_bound = queue_bytes + 2 * TRANSPORT_HIGH_WATER + 2 * frame_max
    peak = 0
    sent: list[str] = []
    for i in range(400):
        reply = await sender.send_text(chat, f"{i:05d}" + "x" * (text_len - 5))
        assert reply["type"] == "success", reply
        sent.append(reply["messages"][0]["id"])
        for conn in hub.connections.values():
            held = conn.queued[1] + (
                conn.transport.get_write_buffer_size() if conn.transport else 0
            )
            peak = max(peak, held)
        if slow_conn.conn_id not in hub.connections:
            break
    await until(lambda: slow_conn.conn_id not in hub.connections, "slow consumer cut off")
    # Every message reached the reader that keeps up, in order, once.
    got = [(await reader.push())["messages"][0]["id"] for _ in sent]
    assert got == sent
    assert sample(app, "chat_gateway_slow_consumer_disconnects_total") == 1
    assert sample(app, "chat_gateway_connections_closed_total", code="1008") == 1
    assert slow_conn.transport is not None and slow_conn.transport.get_write_buffer_size() == 0
    assert peak <= per_socket_bound, (peak, per_socket_bound)
    gc.collect()
    growth = rss_bytes() - rss_before
    print(
        f"\nslow consumer: cut after {len(sent)} messages of {text_len} B "
        f"({len(sent) * text_len / 1e6:.1f} MB sent); peak bytes held for one socket "
        f"{peak} (bound {per_socket_bound}); process RSS growth {growth / 1e6:.1f} MB"
    )
    # The slow client, reading again, finds the stream ends (close frame or EOF).
    slow.resume()
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            opcode, _ = await slow.frame()
            if opcode == OP_CLOSE:
                break
    slow.close()


# -- live: cross-chat isolation ---------------------------------------------------------------


async def test_members_of_one_chat_never_see_another_chats_traffic(
    stack: Stack, seed: Seeder
) -> None:
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    carol, c_token = await seed.user("Carol")
    chat_a = await seed.chat(alice, bob)
    chat_b = await seed.chat(carol)
    await stack.worker()
    url = await stack.gateway()
    a = await stack.client(url, a_token)
    b = await stack.client(url, b_token)
    c = await stack.client(url, c_token)
    await b.join(chat_a)
    await c.join(chat_b)
    # Carol guesses chat A's id with her valid token: the same answer as for no chat.
    missing = await c.request("get_history", "no-such-chat")
    for event, message in (
        ("get_history", None),
        ("get_history", {"after_id": "0"}),
        ("send_message", {"type": "text", "text": "let me in"}),
        ("send_file", {"type": "file", "file_url": "/x"}),
    ):
        reply = await c.request(event, chat_a, message)
        assert reply["type"] == "chat_not_exists" and reply["messages"] is None
        assert reply["detail"] == missing["detail"]
    # Her guesses race with chat A's traffic: none of it may reach her socket.
    for i in range(20):
        guess = {"chat_id": chat_a, "token": c_token, "event_type": "get_history", "request_id": f"g{i}"}  # fmt: skip
        await c.ws.send_str(orjson.dumps(guess).decode())
    sends = [await a.send_text(chat_a, f"secret {i}") for i in range(20)]
    guessed = [await c.reply() for _ in range(20)]
    assert all(r["type"] == "chat_not_exists" for r in guessed), guessed
    assert all(s["type"] == "success" for s in sends)
    assert [m["messages"][0]["text"] for m in [await b.push() for _ in sends]] == [
        f"secret {i}" for i in range(20)
    ]
    # Chat B's traffic reaches neither Alice nor Bob.
    assert (await c.send_text(chat_b, "b only"))["type"] == "success"
    await c.no_push(0.3)
    await b.no_push(0.1)
    await a.no_push(0.1)
    assert not any("secret" in str(f) for f in c.frames)
    # Nothing Carol sent was stored in chat A.
    history = await a.request("get_history", chat_a, {"limit": 200})
    assert [m["text"] for m in history["messages"]] == [f"secret {i}" for i in range(20)]
    # A look-alike id is another (missing) chat, not a way in.
    assert (await c.request("get_history", chat_a + " "))["type"] == "chat_not_exists"


async def test_removed_member_stops_within_the_ttl_and_gets_no_more_pushes(
    stack: Stack, seed: Seeder, settings: Settings
) -> None:
    pair = await alice_and_bob(stack, seed)
    chat, a, b = pair.chat, pair.a, pair.b
    await a.send_text(chat, "hello bob")
    assert (await b.push())["messages"][0]["text"] == "hello bob"
    await seed.store.chats.update_one({"_id": chat}, {"$pull": {"member_ids": pair.bob}})
    deadline = time.monotonic() + settings.auth_cache_ttl + WAIT
    while (await b.request("get_history", chat))["type"] != "chat_not_exists":
        assert time.monotonic() < deadline, "removal not honoured"
        await asyncio.sleep(0.1)
    # That refusal also ended the socket's authorisation for the chat's pushes.
    await a.send_text(chat, "bob is gone")
    await b.no_push(0.5)


async def _admin(settings: Settings, *args: str) -> dict[str, Any]:
    """``python -m worker.admin ARGS`` against this test's MongoDB and Redis."""
    return await admin.run(admin.build_parser().parse_args(list(args)), settings)


async def _grants_revoked(stack: Stack, url: str) -> dict[str, float]:
    async with stack.session.get(url + "metrics") as resp:
        text = await resp.text()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "chat_gateway_grants_revoked_total"
    }


async def test_announced_removal_and_revocation_end_pushes_and_requests_at_once(
    stack: Stack, seed: Seeder, settings: Settings
) -> None:
    """``worker.admin remove-member`` and ``revoke-token`` announce the change: every
    gateway stops those sockets' pushes at once, and the worker refuses their next
    request at once, where its 30 s cache alone would have kept serving them."""
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    carol, c_token = await seed.user("Carol")
    c_other = "c" * 32  # Carol's second token, on her second socket
    await seed.store.tokens.insert_one({"_id": token_digest(c_other), "user_id": carol})
    chat = await seed.chat(alice, bob, carol)
    elsewhere = await seed.chat(alice, bob)
    await stack.worker(auth_cache_ttl=30.0)
    # The gateway's grants are as long-lived, so it would read their pages itself.
    url = await stack.gateway(auth_cache_ttl=30.0)
    a = await stack.client(url, a_token)
    b = await stack.client(url, b_token)
    c1 = await stack.client(url, c_token)
    c2 = await stack.client(url, c_other)
    for client in (b, c1, c2):
        await client.join(chat)
    await b.join(elsewhere)
    await a.send_text(chat, "one")
    for client in (b, c1, c2):
        assert (await client.push())["messages"][0]["text"] == "one"
    for client in (b, c1, c2):  # read by the gateway: each was authorised just now
        assert (await client.request("get_history", chat))["type"] == "success"
    assert sample(app_of(stack, url), "chat_gateway_history_reads_total", by="gateway") == 3

    removed = await _admin(settings, "remove-member", "--chat-id", chat, "--user-id", bob)
    assert removed == {"chat_id": chat, "user_id": bob, "changed": True, "announced": True}
    await a.send_text(chat, "two")
    for client in (c1, c2):
        assert (await client.push())["messages"][0]["text"] == "two"
    await b.no_push(0.5)
    await a.send_text(elsewhere, "still here")  # his other chat is untouched
    assert (await b.push())["messages"][0]["text"] == "still here"
    assert (await b.request("get_history", chat))["type"] == "chat_not_exists"

    revoked = await _admin(settings, "revoke-token", "--token", c_token)
    assert revoked == {"revoked": True, "announced": True}
    await a.send_text(chat, "three")
    assert (await c2.push())["messages"][0]["text"] == "three"
    await c1.no_push(0.5)
    assert (await c1.request("get_history", chat))["type"] == "token_validation_error"
    assert await _grants_revoked(stack, url) == {
        "member_removed": 1.0,
        "token_revoked": 1.0,
        "token_expired": 0.0,
    }


async def test_a_grant_decided_before_a_revocation_does_not_bring_pushes_back(
    stack: Stack, seed: Seeder, settings: Settings
) -> None:
    """A worker can answer from a view older than the revocation (its cache, a request
    read just before). The reply goes out, but the gateway does not let it restart the
    pushes until AUTH_CACHE_TTL_SECONDS + REQUEST_TIMEOUT_SECONDS have passed."""
    alice, a_token = await seed.user("Alice")
    dave, d_token = await seed.user("Dave")
    chat = await seed.chat(alice, dave)
    await stack.worker()
    url = await stack.gateway(request_timeout=1.0)  # remembered for 0.5 + 1.0 s
    a = await stack.client(url, a_token)
    d = await stack.client(url, d_token)
    await d.join(chat)
    # Announced while MongoDB still lists Dave: every view the worker has is "older".
    assert await admin.announce(settings, Revocation(chat_id=chat, user_ids=(dave,)))
    await a.send_text(chat, "gone?")
    await d.no_push(0.5)
    assert (await d.request("get_history", chat))["type"] == "success"
    await a.send_text(chat, "still gone")
    await d.no_push(0.5)
    await asyncio.sleep(1.0)  # past the window: a new grant counts again
    assert (await d.request("get_history", chat))["type"] == "success"
    await a.send_text(chat, "back")
    assert (await d.push())["messages"][0]["text"] == "back"


async def test_a_member_added_back_is_served_and_pushed_to_at_once(
    stack: Stack, seed: Seeder, settings: Settings
) -> None:
    """Removed, then added back well within the window a removal is remembered for (and
    the worker's 30 s cache): the announced addition lifts both at once."""
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat = await seed.chat(alice, bob)
    await stack.worker(auth_cache_ttl=30.0)
    # The gateway remembers a removal for AUTH_CACHE_TTL + REQUEST_TIMEOUT: 30 s and more.
    url = await stack.gateway(auth_cache_ttl=30.0)
    a = await stack.client(url, a_token)
    b = await stack.client(url, b_token)
    await b.join(chat)
    await _admin(settings, "remove-member", "--chat-id", chat, "--user-id", bob)
    assert (await b.request("get_history", chat))["type"] == "chat_not_exists"

    added = await _admin(settings, "add-member", "--chat-id", chat, "--user-id", bob)
    assert added == {"chat_id": chat, "user_id": bob, "changed": True, "announced": True}
    # The worker reads the announcement on a connection of its own, so its first request
    # may still race it by a moment; its cache alone would refuse Bob for 30 s.
    deadline = time.monotonic() + WAIT
    while (await b.request("get_history", chat))["type"] != "success":
        assert time.monotonic() < deadline, "the worker still refuses a member added back"
        await asyncio.sleep(0.05)
    await a.send_text(chat, "welcome back")
    assert (await b.push())["messages"][0]["text"] == "welcome back"


async def test_a_reply_held_for_order_goes_out_when_the_grant_ends(
    stack: Stack, seed: Seeder, settings: Settings
) -> None:
    """A socket's own reply held back behind a gap being filled answers a request that
    was authorised. Ending the grant sends it: dropped, nothing would ever answer that
    request and the client would wait for it forever."""
    pair = await alice_and_bob(stack, seed)
    chat, b = pair.chat, pair.b
    hub = app_of(stack, pair.url)[HUB]
    (conn,) = [c for c in hub.connections.values() if chat in c.chats]  # Bob's
    state = conn.chats[chat]
    # What the hub keeps when the socket's own send lands one id past a gap.
    reply = {"type": "success", "event_type": "send_message", "request_id": "held"}
    state.hold(state.last_seq + 2, orjson.dumps(reply))
    assert await admin.announce(settings, Revocation(chat_id=chat, user_ids=(pair.bob,)))
    assert await b.reply() == reply
    assert chat not in conn.chats
    await b.no_push(0.2)


async def test_a_retried_send_is_not_held_in_place_of_a_newer_push(
    stack: Stack, seed: Seeder
) -> None:
    """A retry's reply carries an old message while the grant's head is the chat's last
    id. Holding the reply for the head's place would send it instead of that push."""
    pair = await alice_and_bob(stack, seed)
    alice, chat, url, a, b = pair.alice, pair.chat, pair.url, pair.a, pair.b
    assert (await a.send_text(chat, "first", client_msg_id="k1"))["messages"][0]["id"] == "1"
    await b.send_text(chat, "second")
    assert (await a.push())["messages"][0]["id"] == "2"
    hub = app_of(stack, url)[HUB]
    (state,) = [c.chats[chat] for c in hub.connections.values() if c.chats[chat].user_id == alice]
    state.last_seq = 1  # as if the push of 2 had been lost with a pub/sub connection
    retry = await a.send_text(chat, "first", client_msg_id="k1")
    assert retry["messages"][0]["id"] == "1"
    await b.send_text(chat, "third")
    assert [(await a.push())["messages"][0]["id"] for _ in range(2)] == ["2", "3"]
    await a.no_push(0.2)


async def test_a_send_landing_past_a_gap_is_answered_after_the_gap_is_filled(
    stack: Stack, seed: Seeder
) -> None:
    """A send's reply, carried by its push, for an id past the socket's last id plus one
    waits while the gap is filled from history: the socket gets the message it missed,
    then its reply, in id order."""
    pair = await alice_and_bob(stack, seed)
    alice, chat, url, a, b = pair.alice, pair.chat, pair.url, pair.a, pair.b
    await a.join(chat)
    await b.send_text(chat, "one")
    assert (await a.push())["messages"][0]["id"] == "1"
    hub = app_of(stack, url)[HUB]
    (state,) = [c.chats[chat] for c in hub.connections.values() if c.chats[chat].user_id == alice]
    state.last_seq = 0  # as if the push of 1 had been lost with a pub/sub connection
    seen = len(a.frames)
    reply = await a.send_text(chat, "two", request_id="mine")
    assert reply["messages"][0]["id"] == "2" and reply["request_id"] == "mine"
    filled, answered = a.frames[seen:]
    assert filled["messages"][0]["id"] == "1" and filled["messages"][0]["is_my"] is False
    assert "request_id" not in filled and answered is reply
    assert state.last_seq == 2 and not state.held
    assert await a.push() == filled  # the gap's message, once
    await a.no_push(0.2)


async def test_pushes_stop_when_the_token_expires(
    stack: Stack, seed: Seeder, settings: Settings
) -> None:
    alice, a_token = await seed.user("Alice")
    erin, _ = await seed.user("Erin")
    short = "5" * 32
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    await seed.store.tokens.insert_one(
        {"_id": token_digest(short), "user_id": erin, "expires_at": expires}
    )
    chat = await seed.chat(alice, erin)
    await stack.worker()
    url = await stack.gateway()
    a = await stack.client(url, a_token)
    e = await stack.client(url, short)
    await e.join(chat)
    await a.send_text(chat, "before")
    assert (await e.push())["messages"][0]["text"] == "before"
    await asyncio.sleep(max(0.0, expires.timestamp() - time.time()) + 0.1)
    await a.send_text(chat, "after")
    await e.no_push(0.5)
    assert (await _grants_revoked(stack, url))["token_expired"] == 1.0


async def test_admin_says_when_it_could_not_announce(seed: Seeder, settings: Settings) -> None:
    """The change stands; the output says so and tells the operator to run it again."""
    alice, _ = await seed.user("Alice")
    chat = await seed.chat(alice)
    unreachable = replace(settings, redis_url="redis://127.0.0.1:1/0")
    result = await _admin(unreachable, "remove-member", "--chat-id", chat, "--user-id", alice)
    assert result == {"chat_id": chat, "user_id": alice, "changed": True, "announced": False}
    assert (await seed.store.chats.find_one({"_id": chat}))["member_ids"] == []


# -- live: tokens -----------------------------------------------------------------------------


async def test_tokens_are_digests_honour_expiry_and_never_leak(
    stack: Stack, seed: Seeder, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user, token = await seed.user()
    chat = await seed.chat(user, chat_id="chat-id-never-a-label-77")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    expired, fresh = "e" * 32, "f" * 32
    await seed.store.tokens.insert_one(
        {"_id": token_digest(expired), "user_id": user, "expires_at": past}
    )
    await seed.store.tokens.insert_one(
        {"_id": token_digest(fresh), "user_id": user, "expires_at": future}
    )
    await stack.worker()
    url = await stack.gateway(rate_limit_per_second=5, rate_limit_burst=20)
    client = await stack.client(url, token)
    secret_text = "never-log-this-text-5f1c"
    assert (await client.send_text(chat, secret_text))["type"] == "success"
    assert (await client.request("get_history", chat, token=expired))["type"] == (
        "token_validation_error"
    )
    assert (await client.request("get_history", chat, token=fresh))["type"] == "success"
    assert (await client.request("get_history", chat, token=token + "x"))["type"] == (
        "token_validation_error"
    )
    for _ in range(30):  # rate limited replies and their logging
        await client.send_raw(orjson.dumps({"chat_id": chat, "token": token}).decode())
    for _ in range(30):
        await client.reply()
    # Only digests are stored: in MongoDB and in the request streams.
    assert await seed.store.tokens.find_one({"_id": token}) is None
    assert await seed.store.tokens.find_one({"_id": token_digest(token)}) is not None
    redis = Redis.from_url(settings.redis_url)
    entries: list[Any] = []
    try:
        async for key in redis.scan_iter(match=f"{settings.redis_prefix}:*", count=1000):
            if await redis.type(key) == b"stream":
                entries.extend(await redis.xrange(key))
    finally:
        await redis.aclose()
    assert entries, "requests went through the streams"
    dumped = repr(entries).encode()
    assert token.encode() not in dumped and token_digest(token).encode() in dumped
    # Never in our logs (with every extra field, as the JSON formatter writes them)...
    # PyMongo's own DEBUG command log is left out: it echoes queries and documents
    # (this test's look-up by raw token above, stored texts); docs/security.md says to
    # keep LOG_LEVEL at INFO or above in production for that reason.
    formatter = JsonFormatter()
    ours = [r for r in caplog.records if not r.name.startswith("pymongo")]
    assert any(r.name.startswith("gateway") for r in ours), "the gateway logged something"
    logged = "\n".join(formatter.format(record) for record in ours)
    for leak in (token, expired, fresh, secret_text):
        assert leak not in logged
    # ... nor in metrics.
    async with stack.session.get(url + "metrics") as resp:
        exposition = await resp.text()
    for leak in (token, token_digest(token), secret_text, chat):
        assert leak not in exposition
