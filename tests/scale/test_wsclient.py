"""The load generator's lean WebSocket client against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from tests.scale import wsclient
from tests.scale.wsclient import HandshakeError, WsClient, mask

pytestmark = pytest.mark.timeout(30)


def test_mask_round_trips() -> None:
    key = os.urandom(4)
    for n in (0, 1, 3, 4, 5, 125, 126, 1000, 70_000):
        payload = os.urandom(n)
        masked = mask(payload, key)
        assert len(masked) == n
        assert mask(masked, key) == payload
        if n:
            # byte i is XORed with key[i % 4], as RFC 6455 section 5.3 says
            assert masked[n - 1] == payload[n - 1] ^ key[(n - 1) % 4]


class Server:
    """An aiohttp server whose socket handler is chosen per test."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.behaviour: Any = None
        self.url = ""

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await self.behaviour(ws, request)
        return ws


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_get("/ws", srv.ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    srv.url = f"ws://127.0.0.1:{port}/ws"
    try:
        yield srv
    finally:
        await runner.cleanup()


async def _collect(ws: WsClient, count: int) -> list[bytes]:
    got: list[bytes] = []
    done = asyncio.get_running_loop().create_future()

    def on_message(data: bytes) -> None:
        got.append(data)
        if len(got) == count and not done.done():
            done.set_result(None)

    ws.listen(on_message)
    await asyncio.wait_for(done, 10)
    return got


async def test_echo_of_every_length_class(server: Server) -> None:
    async def echo(ws: web.WebSocketResponse, _: web.Request) -> None:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)

    server.behaviour = echo
    client = await wsclient.connect(server.url)
    texts = ["x" * n for n in (1, 125, 126, 4000, 65_535, 65_536, 300_000)]
    for text in texts:
        client.send_text(text)
    got = await _collect(client, len(texts))
    assert [g.decode() for g in got] == texts
    await client.close()


async def test_frames_written_together_are_all_delivered_in_order(server: Server) -> None:
    async def burst(ws: web.WebSocketResponse, request: web.Request) -> None:
        # Many whole frames in one write, as the gateway's write batching produces.
        frames = b"".join(b"\x81" + bytes([len(p)]) + p for p in (b"%d" % i for i in range(50)))
        assert request.transport is not None
        request.transport.write(frames)
        # A fragmented message: "abc" + "def".
        request.transport.write(b"\x01\x03abc" + b"\x80\x03def")
        await ws.receive()

    server.behaviour = burst
    client = await wsclient.connect(server.url)
    got = await _collect(client, 51)
    assert got[:50] == [b"%d" % i for i in range(50)]
    assert got[50] == b"abcdef"
    await client.close()


async def test_ping_is_answered_and_close_is_reported(server: Server) -> None:
    pong = asyncio.get_running_loop().create_future()

    async def ping_then_close(ws: web.WebSocketResponse, _: web.Request) -> None:
        await ws.ping(b"hi")
        msg = await ws.receive()
        pong.set_result((msg.type, msg.data))
        await ws.close(code=4000, message=b"bye")

    server.behaviour = ping_then_close
    client = await wsclient.connect(server.url)
    closed = asyncio.get_running_loop().create_future()
    client.on_close = lambda: closed.set_result(None)
    client.listen(lambda data: None)
    assert await asyncio.wait_for(pong, 10) == (WSMsgType.PONG, b"hi")
    await asyncio.wait_for(closed, 10)
    assert client.closed and client.close_code == 4000
    with pytest.raises(ConnectionError):
        client.send_text("late")


async def test_messages_before_a_handler_wait_for_receive(server: Server) -> None:
    async def greet(ws: web.WebSocketResponse, _: web.Request) -> None:
        await ws.send_str("0hello")
        await ws.receive()

    server.behaviour = greet
    client = await wsclient.connect(server.url)
    assert await client.receive(timeout=5) == b"0hello"
    with pytest.raises(TimeoutError):
        await client.receive(timeout=0.2)
    await client.close()


async def test_refused_upgrade_is_a_handshake_error(server: Server) -> None:
    with pytest.raises(HandshakeError) as info:
        await wsclient.connect(server.url.replace("/ws", "/nothing"))
    assert info.value.status == 404
