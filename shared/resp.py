"""A lean Redis connection for the hot paths: pipelines and pub/sub over raw RESP2.

redis-py costs about 9 us of client CPU per pipelined command and 10 us per pub/sub
message received (docs/benchmarks.md); most of it is per-call bookkeeping, not the
protocol. This connection packs commands with hiredis' C packer, parses replies with
hiredis' reader and does nothing else, for about 2 us a command or message. It is used
where a process sends or receives one command per request (XADD, PUBLISH, XACK, pub/sub
messages); everything else uses redis-py.

One connection serves one task at a time: pipelines are not interleaved, and a
connection in pub/sub mode only subscribes and reads. A broken connection raises
:class:`ConnectionError` (or ``TimeoutError``); the owner reconnects.

A pipeline's timeout is kept by the connection itself: each call only notes its
deadline, and one timer, armed when none is pending and re-armed from the deadline in
force when it fires, closes a connection whose call has outlived it. An
``asyncio.timeout`` around each call cost ~6 µs (a timer made and cancelled, three
``getpid()`` calls on Python 3.11), on paths that make thousands of calls a second.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

Arg = bytes | str | int | float
Command = Sequence[Arg]

READ_CHUNK = 256 * 1024


class RespError(Exception):
    """Redis answered a command with an error (the connection stays usable)."""


class RespConnection:
    """One raw connection to Redis."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()
        self._busy = False
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._deadline = math.inf  # loop time by which the call in progress must end
        self._timeout = 0.0  # that call's timeout, for the error
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False

    @classmethod
    async def open(cls, url: str, *, name: str = "", timeout: float = 2.0) -> RespConnection:
        """Connect to ``url`` (redis:// or rediss://), authenticate and name the client."""
        options = parse_url(url)
        context: ssl.SSLContext | None = None
        if options.get("connection_class") is SSLConnection:
            context = ssl.create_default_context()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                options.get("host", "localhost"),
                int(options.get("port", 6379)),
                ssl=context,
                limit=READ_CHUNK,
            ),
            timeout,
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Notice a dead peer on an idle pub/sub connection, and send small frames now.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(reader, writer)
        try:
            setup: list[Command] = []
            password = options.get("password")
            if password:
                username = options.get("username")
                setup.append(("AUTH", username, password) if username else ("AUTH", password))
            if name:
                setup.append(("CLIENT", "SETNAME", name.replace(" ", "_")))
            if setup:
                await conn.execute(setup, timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def send(self, *commands: Command) -> None:
        """Write commands without waiting for their replies (pub/sub subscriptions)."""
        if self.closed:
            raise ConnectionError("connection closed")
        # hiredis' stub declares a one-element tuple; the C function takes any length.
        packed = [hiredis.pack_command(tuple(c)) for c in commands]  # type: ignore[arg-type]
        self._writer.write(b"".join(packed))

    async def execute(self, commands: Sequence[Command], timeout: float | None = None) -> list[Any]:
        """Send a pipeline and return one reply per command.

        Raises :class:`RespError` (after reading every reply, so the connection stays in
        step) when any command failed, and ``TimeoutError`` when the replies took longer
        than ``timeout`` seconds (the connection is closed then).
        """
        if self._busy:
            raise RuntimeError("one pipeline at a time on a RespConnection")
        self._busy = True
        if timeout is not None:
            self._timeout = timeout
            self._deadline = self._loop.time() + timeout
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(self._deadline, self._watch)
        try:
            self.send(*commands)
            # Every reply already received is taken without a coroutine per command
            # (a pipeline of a worker's batch holds a dozen or more).
            replies: list[Any] = []
            gets = self._parser.gets
            while len(replies) < len(commands):
                reply = gets()
                if reply is False:
                    await self._fill()
                else:
                    replies.append(reply)
        except BaseException:
            # Replies may be half read: this connection can no longer be trusted.
            self.close()
            raise
        finally:
            self._busy = False
            self._deadline = math.inf
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise RespError(str(reply))
        return replies

    async def read(self) -> Any:
        """The next reply or pub/sub message (a ``hiredis.ReplyError`` for an error)."""
        while True:
            reply = self._parser.gets()
            if reply is not False:
                return reply
            await self._fill()

    async def _fill(self) -> None:
        """Feed the parser the next chunk received."""
        chunk = await self._reader.read(READ_CHUNK)
        if not chunk:
            self.close()
            if self._timed_out:
                raise TimeoutError(f"Redis did not answer within {self._timeout:g} s")
            raise ConnectionError("Redis closed the connection")
        self._parser.feed(chunk)

    def _watch(self) -> None:
        self._watchdog = None
        if self.closed or self._deadline == math.inf:
            return
        if self._loop.time() >= self._deadline:
            # The call waiting for replies sees the end of the stream and raises.
            self._timed_out = True
            self.close()
            return
        self._watchdog = self._loop.call_at(self._deadline, self._watch)

    async def read_burst(self) -> list[Any]:
        """The next reply and every other one already received with it.

        A burst is at most what one read of the socket brought (``READ_CHUNK`` bytes),
        so a caller handling it in one go holds a bounded amount.
        """
        burst = [await self.read()]
        gets = self._parser.gets
        while (reply := gets()) is not False:
            burst.append(reply)
        return burst

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self.closed:
            self.closed = True
            self._writer.close()
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    async def aclose(self) -> None:
        """Close and wait for the transport to finish."""
        self.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (OSError, TimeoutError, ConnectionError):
            pass
