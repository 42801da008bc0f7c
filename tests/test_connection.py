"""Pure unit tests of a socket's output path: write batching, order and bounds.

The transport here is a recording stand-in (no Redis, no MongoDB, no network): what is
tested is which bytes the gateway hands to it, in which order and in how many writes.
"""

from __future__ import annotations

from typing import Any

from gateway.connection import TRANSPORT_HIGH_WATER, Connection, WriteBatch, text_frame
from shared.codec import token_digest


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


class Ws:
    """What the queue's writer task uses of aiohttp's WebSocketResponse."""

    compress = 0
    transport: RecordingTransport

    async def send_frame(self, payload: bytes, _opcode: Any) -> None:
        self.transport.write(text_frame(payload))


def _conn(conn_id: int, batch: WriteBatch, slow: list[Connection]) -> tuple[Connection, Any]:
    transport = RecordingTransport()
    ws = Ws()
    ws.transport = transport
    conn = Connection(
        conn_id,
        ws,  # type: ignore[arg-type]
        transport,  # type: ignore[arg-type]
        "127.0.0.1",
        max_messages=4,
        max_bytes=1 << 20,
        on_slow=slow.append,
        batch=batch,
    )
    return conn, transport


def test_frames_sent_while_a_batch_is_open_go_out_in_one_write_per_socket() -> None:
    batch = WriteBatch()
    slow: list[Connection] = []
    a, ta = _conn(1, batch, slow)
    b, tb = _conn(2, batch, slow)
    batch.open()
    for i in range(3):
        assert a.send(b"a%d" % i)
    assert b.send(b"b0", text_frame(b"b0"))
    assert ta.writes == [] and tb.writes == []  # nothing before the burst ends
    batch.flush()
    assert ta.writes == [text_frame(b"a0") + text_frame(b"a1") + text_frame(b"a2")]
    assert tb.writes == [text_frame(b"b0")]
    # Closed again: the next frame is written at once.
    assert a.send(b"a3")
    assert ta.writes[-1] == text_frame(b"a3")
    assert not slow


def test_a_socket_closed_during_the_burst_gets_nothing() -> None:
    batch = WriteBatch()
    a, ta = _conn(1, batch, [])
    batch.open()
    a.send(b"x")
    ta.closing = True
    batch.flush()
    assert ta.writes == []
    batch.open()
    assert not a.send(b"y")  # a closing transport accepts nothing
    batch.flush()
    assert ta.writes == []


async def test_gathered_bytes_count_against_the_high_water_mark() -> None:
    # Past the mark, frames go to the socket's bounded queue instead of being gathered,
    # so a burst cannot put more than the mark (plus one frame) in front of a slow
    # reader; the queue is written after the gathered frames, in order.
    batch = WriteBatch()
    slow: list[Connection] = []
    a, ta = _conn(1, batch, slow)
    big = b"x" * (TRANSPORT_HIGH_WATER // 2)
    batch.open()
    a.send(big)
    a.send(big)
    assert a.queued == (0, 0)
    a.send(b"third")  # over the mark now: queued, not gathered
    assert a.queued == (1, 5)
    batch.flush()
    assert ta.writes == [text_frame(big) + text_frame(big)]
    writer = a._writer
    assert writer is not None
    await writer
    assert ta.writes[1:] == [text_frame(b"third")]
    assert a.queued == (0, 0)
    assert not slow


def test_a_sockets_token_digest_follows_the_token_it_sends() -> None:
    """Hashed once per token, not per request: a socket that changes tokens (a refresh,
    or another user's token tried on it) gets the new token's digest at once."""
    conn, _ = _conn(1, WriteBatch(), [])
    first, second = "token-one", "token-two"
    assert conn.token_digest(first) == token_digest(first)
    assert conn.token_digest(first) == token_digest(first)
    assert conn.token_digest(second) == token_digest(second)
    assert conn.token_digest(first) == token_digest(first)
