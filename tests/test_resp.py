"""The lean RESP connection against a real Redis: pipelines, errors, pub/sub, AUTH."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from deploy.local.servers import LocalServer, free_port, redis_server
from shared.resp import RespConnection, RespError
from tests.conftest import Servers


async def test_pipeline_replies_in_order(servers: Servers) -> None:
    conn = await RespConnection.open(servers.redis.url, name="resp-test")
    try:
        key = "resp:test:stream"
        replies = await conn.execute(
            [("DEL", key), ("XADD", key, "*", "d", b"\x00\xffbytes"), ("XLEN", key), ("PING",)]
        )
        assert replies[0] in (0, 1) and replies[1].count(b"-") == 1
        assert replies[2] == 1 and replies[3] == b"PONG"
        redis = Redis.from_url(servers.redis.url)
        entries = await redis.xrange(key)
        assert entries[0][1] == {b"d": b"\x00\xffbytes"}
        await redis.delete(key)
        await redis.aclose()
        assert await conn.execute([("CLIENT", "GETNAME")]) == [b"resp-test"]
    finally:
        await conn.aclose()


async def test_error_reply_raises_and_connection_stays_in_step(servers: Servers) -> None:
    conn = await RespConnection.open(servers.redis.url)
    try:
        with pytest.raises(RespError, match="unknown command"):
            await conn.execute([("PING",), ("NOSUCHCOMMAND",), ("PING",)])
        assert await conn.execute([("ECHO", "after")]) == [b"after"]
    finally:
        await conn.aclose()


async def test_pubsub_messages_and_confirmations(servers: Servers) -> None:
    sub = await RespConnection.open(servers.redis.url)
    pub = await RespConnection.open(servers.redis.url)
    try:
        sub.send(("SUBSCRIBE", "resp:a", "resp:b"))
        assert await sub.read() == [b"subscribe", b"resp:a", 1]
        assert await sub.read() == [b"subscribe", b"resp:b", 2]
        big = b"x" * 300_000  # larger than one read chunk
        await pub.execute([("PUBLISH", "resp:a", b"one"), ("PUBLISH", "resp:b", big)])
        assert await sub.read() == [b"message", b"resp:a", b"one"]
        assert await sub.read() == [b"message", b"resp:b", big]
        sub.send(("UNSUBSCRIBE", "resp:a"))
        assert await sub.read() == [b"unsubscribe", b"resp:a", 1]
    finally:
        await sub.aclose()
        await pub.aclose()


async def test_closed_by_server_raises_connection_error(servers: Servers) -> None:
    conn = await RespConnection.open(servers.redis.url, name="to-kill")
    admin = Redis.from_url(servers.redis.url)
    try:
        await admin.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(conn.execute([("PING",)]), 5)
        assert conn.closed
    finally:
        await admin.aclose()
        await conn.aclose()


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    server = redis_server(
        free_port(), Path(tmp_path_factory.mktemp("redis-auth")), extra=["--requirepass", "s3cret"]
    ).start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_call_that_outlives_its_timeout_fails_and_closes_the_connection(
    servers: Servers,
) -> None:
    """The connection keeps each call's deadline itself: quick calls with a timeout leave
    nothing behind that could cut a later call short, a call answered just inside its
    timeout succeeds, and one Redis keeps waiting on (a BLPOP of an empty list) fails
    with TimeoutError once its own timeout has passed, the connection closed."""
    loop = asyncio.get_running_loop()
    conn = await RespConnection.open(servers.redis.url)
    try:
        # A timer armed by the first of these fires while later ones run or after.
        until = loop.time() + 0.6
        while loop.time() < until:
            assert await conn.execute([("PING",)], 0.2) == [b"PONG"]
            await asyncio.sleep(0.01)
        assert await conn.execute([("BLPOP", "resp:test:empty", "0.3")], 1.0) == [None]
        # Idle past the last call's deadline: the connection is not closed for it.
        await asyncio.sleep(1.2)
        assert await conn.execute([("PING",)]) == [b"PONG"]
        assert not conn.closed
        # Its timer is still pending when the next call starts: it must re-arm for it.
        assert await conn.execute([("PING",)], 0.1) == [b"PONG"]
        started = loop.time()
        with pytest.raises(TimeoutError, match=r"within 0\.4 s"):
            await conn.execute([("BLPOP", "resp:test:empty", "5")], 0.4)
        waited = loop.time() - started
        assert 0.4 <= waited < 1.0, waited
        assert conn.closed
    finally:
        await conn.aclose()


async def test_auth_from_url(password_redis: LocalServer) -> None:
    url = f"redis://:s3cret@127.0.0.1:{password_redis.port}/0"
    conn = await RespConnection.open(url)
    try:
        assert await conn.execute([("PING",)]) == [b"PONG"]
    finally:
        await conn.aclose()
    with pytest.raises(RespError, match=r"(?i)auth|password"):
        await RespConnection.open(f"redis://:wrong@127.0.0.1:{password_redis.port}/0")
