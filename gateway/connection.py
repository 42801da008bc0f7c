"""One client socket: identity, per-chat authorisation and a bounded output path.

Frames are written straight to the transport while it keeps up (the common case: no
task, no copy). When the transport pushes back, frames wait in a per-socket queue
bounded in messages and bytes, drained by a writer task; a socket that lets the queue
fill up is closed as a slow consumer instead of growing memory.

While a :class:`WriteBatch` is open (one burst of pub/sub messages being dispatched),
the frames for each socket are gathered and written with one ``write`` per socket when
the burst ends: a socket in a busy room then costs one system call (and one wake-up of
its client) per burst instead of one per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from shared.codec import token_digest

log = logging.getLogger(__name__)

# Above this many buffered bytes in the transport, frames go through the queue instead.
TRANSPORT_HIGH_WATER = 64 * 1024
CLOSE_SLOW_CONSUMER = WSCloseCode.POLICY_VIOLATION


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked server->client text frame (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


class ChatState:
    """What one socket may see of one chat: as whom, and the last id it was sent.

    ``held`` keeps frames for ids above ``last_seq`` that must wait for the ids before
    them: the socket's own replies while a gap in front of them is being filled.
    """

    __slots__ = ("digest", "expires_at", "granted_at", "held", "last_seq", "user_id")

    def __init__(
        self,
        user_id: str,
        last_seq: int,
        digest: str,
        expires_at: float | None = None,
        granted_at: float = 0.0,
    ) -> None:
        self.user_id = user_id
        self.last_seq = last_seq
        # The token digest that authorised the socket: gap fills are asked with it, and a
        # revocation of that token ends the grant.
        self.digest = digest
        # When that token expires (unix seconds; None: never): no pushes after it.
        self.expires_at = expires_at
        # When the worker's view of MongoDB that the grant rests on was read (monotonic:
        # the grant's arrival less its age): the node reads history pages itself only
        # within AUTH_CACHE_TTL_SECONDS of it.
        self.granted_at = granted_at
        self.held: dict[int, bytes] | None = None

    def hold(self, seq: int, frame: bytes) -> None:
        """Keep ``frame`` (id ``seq``) until every id before it has been sent."""
        if self.held is None:
            self.held = {}
        self.held[seq] = frame


class WriteBatch:
    """Gathers frames per socket while open; :meth:`flush` writes each socket's at once.

    Opened and flushed synchronously around one burst of pub/sub messages, so nothing
    else writes to a socket in between and frame order is kept. What it holds is bounded
    by the burst: at most one read of the pub/sub socket's worth of messages.
    """

    __slots__ = ("_dirty", "is_open")

    def __init__(self) -> None:
        self.is_open = False
        self._dirty: list[Connection] = []

    def open(self) -> None:
        """Start gathering."""
        self.is_open = True

    def add(self, conn: Connection, data: bytes) -> None:
        """Keep ``data`` (a whole frame) for ``conn`` until :meth:`flush`."""
        gathered = conn._gathered
        if gathered is None:
            conn._gathered = [data]
            conn._gathered_bytes = len(data)
            self._dirty.append(conn)
        else:
            gathered.append(data)
            conn._gathered_bytes += len(data)

    def flush(self) -> None:
        """Write what was gathered, one write per socket, and stop gathering."""
        self.is_open = False
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for conn in dirty:
            gathered = conn._gathered
            conn._gathered = None
            conn._gathered_bytes = 0
            transport = conn.transport
            if gathered is None or conn.closed or transport is None or transport.is_closing():
                continue
            transport.write(gathered[0] if len(gathered) == 1 else b"".join(gathered))


class Connection:
    """A WebSocket and its state on this node."""

    __slots__ = (
        "_batch",
        "_digest",
        "_gathered",
        "_gathered_bytes",
        "_limits",
        "_queue",
        "_queued_bytes",
        "_token",
        "_writer",
        "chats",
        "close_code",
        "closed",
        "conn_id",
        "in_flight",
        "on_slow",
        "peer",
        "raw_ok",
        "transport",
        "ws",
    )

    def __init__(
        self,
        conn_id: int,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        peer: str,
        *,
        max_messages: int,
        max_bytes: int,
        on_slow: Callable[[Connection], None],
        batch: WriteBatch | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.ws = ws
        self.transport = transport
        self.peer = peer
        self.chats: dict[str, ChatState] = {}
        self.closed = False
        # Requests of this socket forwarded and not answered yet.
        self.in_flight = 0
        # The code this side chose when it closed the socket (None: the peer closed).
        self.close_code: int | None = None
        self.on_slow = on_slow
        # Pre-built frames are only valid without permessage-deflate.
        self.raw_ok = not ws.compress
        self._queue: deque[bytes] | None = None
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._limits = (max_messages, max_bytes)
        self._batch = batch
        self._gathered: list[bytes] | None = None
        self._gathered_bytes = 0
        self._token: str | None = None
        self._digest = ""

    def token_digest(self, token: str) -> str:
        """``codec.token_digest(token)``, hashed once while the socket keeps sending the
        same token: a SHA-256 through OpenSSL per request was ~5 % of a gateway's busy
        samples, a string comparison costs ~1/15 of one. The last token stays in this
        process's memory only, as the request that brought it did."""
        if token != self._token:
            self._digest = token_digest(token)
            self._token = token
        return self._digest

    def send(self, payload: bytes, wire: bytes | None = None) -> bool:
        """Queue one text frame; ``wire`` is ``text_frame(payload)`` when the caller has it.

        Returns False when the frame was not accepted (socket closed or too slow).
        """
        if self.closed:
            return False
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if (
            self.raw_ok
            and self._queue is None
            and transport.get_write_buffer_size() + self._gathered_bytes < TRANSPORT_HIGH_WATER
        ):
            data = wire if wire is not None else text_frame(payload)
            batch = self._batch
            if batch is not None and batch.is_open:
                batch.add(self, data)
            else:
                transport.write(data)
            return True
        return self._enqueue(payload)

    def _enqueue(self, payload: bytes) -> bool:
        max_messages, max_bytes = self._limits
        if self._queue is None:
            self._queue = deque()
        if len(self._queue) >= max_messages or self._queued_bytes + len(payload) > max_bytes:
            self.on_slow(self)
            return False
        self._queue.append(payload)
        self._queued_bytes += len(payload)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        return True

    async def _drain(self) -> None:
        queue = self._queue
        try:
            while queue:
                payload = queue[0]
                # send_frame awaits the transport's drain when it is over its limit.
                await self.ws.send_frame(payload, WSMsgType.TEXT)
                queue.popleft()
                self._queued_bytes -= len(payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away mid-write
            log.debug("writer stopped", extra={"conn": self.conn_id, "error": repr(exc)})
        finally:
            self._writer = None
            if not self._queue:
                self._queue = None
                self._queued_bytes = 0

    @property
    def queued(self) -> tuple[int, int]:
        """(frames, bytes) waiting in this socket's own queue."""
        return (len(self._queue) if self._queue else 0, self._queued_bytes)

    async def close(self, code: int, reason: str, timeout: float = 5.0) -> None:
        """Close the socket with ``code`` and ``reason``; safe to call twice.

        The close handshake gets ``timeout`` seconds; when it does not complete (a peer
        that stopped reading never takes the close frame), the TCP connection is aborted,
        so its unsent buffer is freed instead of waiting for a reader that never comes.
        """
        self.closed = True
        if self.close_code is None:
            self.close_code = code
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
        done = False
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), timeout)
            done = True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Not our cancellation: aiohttp shares one drain future among every task
            # waiting on the transport, so cancelling the writer above cancelled the
            # future ws.close() then waited on.
        except Exception:  # the peer went away, or the handshake timed out
            pass
        if not done and self.transport is not None:
            self.transport.abort()

    def __repr__(self) -> str:
        return f"<Connection {self.conn_id} {self.peer}>"


def describe(conn: Any) -> dict[str, Any]:
    """Log fields for a connection (never a token)."""
    return {"conn": getattr(conn, "conn_id", None), "peer": getattr(conn, "peer", None)}
