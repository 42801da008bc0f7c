"""Batched XADD of validated requests to their partition streams.

Requests are buffered (bounded) and written by one task in pipelines on a lean
connection of its own (shared/resp.py), which costs a small fraction of the client CPU
of one awaited redis-py XADD each. At the bound, :meth:`submit` refuses and the caller
answers ``server_error`` at once rather than queueing without limit.

Nothing is written while the gateway cannot hear replies (``listening`` clear: its
pub/sub connection is down or not yet resubscribed, as after a Redis restart): a worker
would answer into a channel nobody listens to, and the client would wait for its
timeout. Entries wait in the buffer instead, and those older than the request timeout
are dropped when writing resumes (their clients were already answered).

A pipeline whose outcome is unknown (its connection broke, no answer in time, or Redis
refused some of its commands) may have been written, in full or in part. Before writing
it again the producer looks for its entries among the latest of their streams (the
callers' payloads name their node and request, so each is unique) and writes only what
is missing: a send written twice would be stored twice unless it carries a
``client_msg_id``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

from shared.backoff import Backoff
from shared.codec import STREAM_FIELD, entry_payload
from shared.resp import RespConnection

log = logging.getLogger(__name__)

WRITE_TIMEOUT = 5.0
# (submitted at, stream, payload, key): a buffered entry.
Entry = tuple[float, str, bytes, int]
# How many of a stream's latest entries a retry looks through for what its failed
# attempt wrote (the attempt is that recent: a backoff ago).
CHECK_BACK = 2000


class StreamProducer:
    """Buffers (stream key, payload) pairs and XADDs them in pipelines."""

    def __init__(
        self,
        redis_url: str,
        *,
        name: str,
        batch: int,
        max_buffered: int,
        maxlen: int,
        expire_after: float,
        backoff_cap: float = 2.0,
        listening: asyncio.Event | None = None,
    ) -> None:
        self._redis_url = redis_url
        self._name = name
        self._conn: RespConnection | None = None
        self._batch = batch
        self._max_buffered = max_buffered
        self._maxlen = maxlen
        self._expire_after = expire_after
        self._backoff_cap = backoff_cap
        self._buffer: deque[Entry] = deque()
        # What the writer awaits while the buffer is empty, resolved by the next submit.
        # A bare future: asyncio.Event.wait makes a getpid() call per wait on Python
        # 3.11 (finding its loop), ~2 % of a gateway's busy samples at 3,000 sends/s.
        self._wakeup: asyncio.Future[None] | None = None
        self._listening = listening
        self.healthy = True
        # Told (key, entry id) for each entry submitted with a key, once it is written.
        self.on_written: Callable[[int, bytes], None] | None = None

    def submit(self, stream: str, payload: bytes, key: int = 0) -> bool:
        """Buffer one entry; False when the buffer is full (the caller refuses the request).

        With a ``key`` (not 0), :attr:`on_written` is told the entry's id once written.
        """
        if len(self._buffer) >= self._max_buffered:
            return False
        self._buffer.append((time.monotonic(), stream, payload, key))
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():  # cancelled with the writer task
                wakeup.set_result(None)
        return True

    @property
    def buffered(self) -> int:
        """Entries waiting to be written."""
        return len(self._buffer)

    async def run(self) -> None:
        """Write buffered entries until cancelled; retry a failed pipeline with backoff."""
        try:
            await self._loop()
        finally:
            if self._conn is not None:
                self._conn.close()

    async def _loop(self) -> None:
        backoff = Backoff(cap=self._backoff_cap)
        maxlen = str(self._maxlen)
        loop = asyncio.get_running_loop()
        while True:
            if not self._buffer:
                self._wakeup = loop.create_future()
                await self._wakeup
            if self._listening is not None and not self._listening.is_set():
                await self._listening.wait()
                self._drop_expired()
                continue
            batch = [self._buffer.popleft() for _ in range(min(self._batch, len(self._buffer)))]
            uncertain = False  # the last attempt may have been written
            while batch:
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = await RespConnection.open(self._redis_url, name=self._name)
                    if uncertain:
                        batch = await self._unwritten(batch)
                        uncertain = False
                    commands = [
                        ("XADD", stream, "MAXLEN", "~", maxlen, "*", STREAM_FIELD, payload)
                        for _, stream, payload, _ in batch
                    ]
                    ids = await self._conn.execute(commands, WRITE_TIMEOUT) if commands else []
                    self._report(zip(batch, ids, strict=True))
                    self.healthy = True
                    backoff.reset()
                    batch = []
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # connection lost, Redis error, or a bug: keep going
                    uncertain = True
                    self.healthy = False
                    if self._conn is not None:
                        self._conn.close()
                    log.warning(
                        "XADD failed; retrying", extra={"error": repr(exc), "entries": len(batch)}
                    )
                    await backoff.sleep()
                    if self._listening is not None:
                        await self._listening.wait()
                    horizon = self._horizon()
                    batch = [item for item in batch if item[0] >= horizon]

    def _report(self, written: Iterable[tuple[Entry, bytes]]) -> None:
        on_written = self.on_written
        if on_written is not None:
            for (_, _, _, key), entry_id in written:
                if key:
                    on_written(key, entry_id)

    async def _unwritten(self, batch: list[Entry]) -> list[Entry]:
        """The entries of ``batch`` not found among the latest of their streams; those
        found are reported as written."""
        assert self._conn is not None
        streams = sorted({stream for _, stream, _, _ in batch})
        replies = await self._conn.execute(
            [("XREVRANGE", stream, "+", "-", "COUNT", CHECK_BACK) for stream in streams],
            WRITE_TIMEOUT,
        )
        present: dict[bytes, bytes] = {}
        for entries in replies:
            for entry_id, fields in entries:
                payload = entry_payload(fields)
                if payload is not None:
                    present[payload] = entry_id
        found = [(item, present[item[2]]) for item in batch if item[2] in present]
        if found:
            log.info("XADD retry: entries already written are not written again",
                     extra={"entries": len(found), "of": len(batch)})  # fmt: skip
            self._report(found)
        return [item for item in batch if item[2] not in present]

    def _horizon(self) -> float:
        # A request whose client has already been told it timed out must not be written
        # late: what was submitted before this is dropped.
        return time.monotonic() - self._expire_after

    def _drop_expired(self) -> None:
        horizon = self._horizon()
        while self._buffer and self._buffer[0][0] < horizon:
            self._buffer.popleft()
