"""A lean WebSocket client for the load generator (RFC 6455, no extensions).

aiohttp's client hands every received message to a reader task through a queue: one
task wake-up and several Python frames per message, ~20 us of CPU per delivery at the
rates of the ``rooms`` workload, so the generator ran out of core before the servers
did. Here frames are parsed in the protocol's ``data_received`` and handed to a plain
callback: no task, no queue, no per-message future. Every target is driven by the same
client, so the comparison stays fair; what the servers do is unchanged.

Scope: text and binary messages (fragmented ones reassembled), ping answered with pong,
close answered and reported. Client frames are masked as the RFC requires.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

MAX_MESSAGE = 16 * 1024 * 1024
MAX_HEADER = 64 * 1024

_keys = random.Random(os.urandom(16))

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(ConnectionError):
    """The server did not switch protocols; ``status`` is its HTTP status (0: no answer)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"websocket handshake: {status} {detail}")
        self.status = status


def mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (masking and unmasking are the same)."""
    n = len(payload)
    if n == 0:
        return payload
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One complete, masked client->server frame."""
    # Masking keeps intermediaries from caching what a script wrote; on loopback, in a
    # load generator, a pseudo-random key does that as well without a system call.
    key = _keys.getrandbits(32).to_bytes(4, "little")
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + mask(payload, key)


class WsClient(asyncio.Protocol):
    """One client WebSocket.

    Until :meth:`listen` sets a handler, messages are kept for :meth:`receive`
    (handshakes of protocols layered on top); afterwards each is passed to the handler
    as it is parsed. ``on_close`` is called once when the connection ends, whoever ended it.
    """

    def __init__(self, handshake: bytes, key: str) -> None:
        self._handshake = handshake
        digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        self._accept = base64.b64encode(digest).decode()
        self._buf = bytearray()
        self._upgraded = False
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fragments: list[bytes] = []
        self._frag_opcode = 0
        self._inbox: deque[bytes | None] = deque()
        self._inbox_waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.on_message: Callable[[bytes], None] | None = None
        self.on_close: Callable[[], None] | None = None
        self.closed = False
        self.close_code: int | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self._handshake)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if not self._upgraded:
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER:
                    self._fail(HandshakeError(0, "response header too large"))
                return
            head = bytes(buf[:end]).decode("latin-1")
            data = bytes(buf[end + 4 :])
            buf.clear()
            error = self._check_response(head)
            if error is not None:
                self._fail(error)
                return
            self._upgraded = True
            if not self._opened.done():
                self._opened.set_result(None)
        elif buf:
            # The rest of a frame that an earlier read cut in two.
            buf += data
            data = bytes(buf)
            buf.clear()
        used = self._parse(data)
        if used < len(data) and not self.closed:
            buf += data[used:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._opened.done():
            self._opened.set_exception(ConnectionError(f"connection lost: {exc!r}"))
        self._closed()

    # -- frames

    def _parse(self, data: bytes) -> int:
        """Handle every whole frame in ``data``; return how many bytes they took."""
        pos = 0
        size = len(data)
        while size - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1]
            head = 2
            if length >= 126:
                if length == 126:
                    if size - pos < 4:
                        break
                    length = (data[pos + 2] << 8) | data[pos + 3]
                    head = 4
                elif length == 127:
                    if size - pos < 10:
                        break
                    (length,) = struct.unpack_from("!Q", data, pos + 2)
                    head = 10
                else:  # the mask bit: a server must not mask
                    self._protocol_error()
                    return pos
                if length > MAX_MESSAGE:
                    self._protocol_error()
                    return pos
            end = pos + head + length
            if end > size:
                break
            payload = data[pos + head : end]
            pos = end
            handler = self.on_message
            if b0 == 0x81 and handler is not None:
                handler(payload)  # the common case: a whole text message
            else:
                self._frame(b0 & 0x80, b0 & 0x0F, payload)
            if self.closed:
                break
        return pos

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT or opcode == OP_BINARY:
            if fin:
                self._message(payload)
            else:
                self._frag_opcode = opcode
                self._fragments = [payload]
        elif opcode == OP_CONT:
            self._fragments.append(payload)
            if fin:
                whole = b"".join(self._fragments)
                self._fragments = []
                self._message(whole)
        elif opcode == OP_PING:
            self._write(client_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self._write(client_frame(OP_CLOSE, payload[:2]))
            if self.transport is not None:
                self.transport.close()
            self._closed()

    def _message(self, data: bytes) -> None:
        handler = self.on_message
        if handler is not None:
            handler(data)
            return
        self._inbox.append(data)
        self._wake()

    # -- API

    def listen(self, handler: Callable[[bytes], None]) -> None:
        """Pass every message to ``handler`` from now on, starting with those kept."""
        self.on_message = handler
        while self._inbox and self._inbox[0] is not None:
            handler(self._inbox.popleft())  # type: ignore[arg-type]

    async def opened(self, timeout: float) -> None:
        """Wait for the server's 101 (raises :class:`HandshakeError` or ConnectionError)."""
        await asyncio.wait_for(asyncio.shield(self._opened), timeout)

    async def receive(self, timeout: float) -> bytes:
        """The next message kept before ``on_message`` was set (ConnectionError at close)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._inbox:
            if self.closed:
                raise ConnectionError("websocket closed")
            self._inbox_waiter = loop.create_future()
            await asyncio.wait_for(self._inbox_waiter, max(0.0, deadline - loop.time()))
        item = self._inbox.popleft()
        if item is None:
            raise ConnectionError("websocket closed")
        return item

    def send_text(self, text: str | bytes) -> None:
        """Write one text message (ConnectionError when the socket is closed)."""
        data = text.encode() if isinstance(text, str) else text
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("websocket closed")
        self._write(client_frame(OP_TEXT, data))

    async def close(self, code: int = 1000) -> None:
        """Send a close frame and close the connection (no wait for the server's reply)."""
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self._write(client_frame(OP_CLOSE, struct.pack("!H", code)))
            self.transport.close()
        self._closed()

    # -- internals

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _check_response(self, head: str) -> HandshakeError | None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            return HandshakeError(0, f"bad status line {lines[0][:80]!r}")
        if status != 101:
            return HandshakeError(status, lines[0][:80])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept") != self._accept:
            return HandshakeError(status, "bad Sec-WebSocket-Accept")
        return None

    def _fail(self, error: Exception) -> None:
        if not self._opened.done():
            self._opened.set_exception(error)
        if self.transport is not None:
            self.transport.abort()
        self._closed()

    def _protocol_error(self) -> None:
        self.close_code = 1002
        if self.transport is not None:
            self.transport.abort()
        self._closed()

    def _wake(self) -> None:
        waiter = self._inbox_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._inbox_waiter = None

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._inbox.append(None)
        self._wake()
        callback = self.on_close
        if callback is not None:
            callback()


async def connect(
    url: str, *, local_addr: str = "", timeout: float = 15.0, path: str | None = None
) -> WsClient:
    """Open a WebSocket to ``url`` (ws:// only), optionally from ``local_addr``."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"only ws:// URLs: {url!r}")
    host, port = parts.hostname, parts.port or 80
    target = path or ((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    transport, protocol = await asyncio.wait_for(
        loop.create_connection(
            lambda: WsClient(request, key),
            host,
            port,
            local_addr=(local_addr, 0) if local_addr else None,
        ),
        timeout,
    )
    try:
        await protocol.opened(timeout)
    except BaseException:
        transport.abort()
        raise
    return protocol
