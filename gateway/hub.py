"""Routing on one gateway node: requests out to streams, replies and pushes back to sockets.

- A request takes a reference on its chat's channel (confirmed subscription) before it is
  forwarded, so the worker's result cannot be published before this node listens.
- Replies come on the node channel and are matched to in-flight requests by an id of
  this node's; a reply for a request that already timed out is dropped. A stored send's
  reply comes inside its push instead (the request asks for it: ``codec.Push``).
- Pushes come on chat channels. Each socket remembers, per chat, the last id it was
  sent: duplicates are dropped, and a jump in ids (a push lost while the pub/sub
  connection was down) is filled from history through the worker before newer pushes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from shared import protocol
from shared.codec import (
    Admission,
    Grant,
    Push,
    Revocation,
    StreamEntry,
    decode_control,
    decode_push,
    decode_reply_envelope,
    encode_stream_entry,
    event_id,
)
from shared.config import Settings
from shared.keys import Keys, partition_of
from shared.logs import describe_error
from shared.metrics import GRANT_END_REASONS, GatewayMetrics
from shared.mongo import HistoryReader
from shared.wire import Doc

from .connection import ChatState, Connection, WriteBatch, text_frame
from .producer import StreamProducer
from .subscriber import Subscriber

log = logging.getLogger(__name__)

# Pushes held per chat while its gap is being filled; beyond it the next fill fetches them.
MAX_FILL_BUFFER = 10_000
# Revocations remembered so that a grant decided before one (a worker's cached view of
# a chat's members or of a token) does not bring the pushes back; beyond the bound the
# oldest are forgotten first.
MAX_REMEMBERED_REVOCATIONS = 10_000
MAX_FILL_ATTEMPTS = 3
# History pages read from MongoDB at once by one node; more go to the workers.
MAX_DIRECT_READS = 16
# Seconds a page read may take (a page normally takes a millisecond or two); after it,
# or any other failure, the request goes to a worker.
READ_TIMEOUT = 1.0
# Seconds this node leaves MongoDB alone after a page read failed (workers answer).
READER_PAUSE = 5.0
# Seconds before its deadline a request may be answered server_error (timer rounding).
EXPIRY_SLACK = 0.001


@dataclass(slots=True)
class Fill:
    """A history fetch in flight for one chat, and the pushes that arrived meanwhile."""

    waiting: list[Push]
    after: int
    attempt: int = 1


@dataclass(slots=True)
class Pending:
    """A request forwarded to a worker and not yet answered."""

    conn: Connection
    chat_id: str
    event_type: str
    request_id: str | None
    received_at: float
    digest: str
    deadline: float  # event-loop time when this node answers server_error itself
    fill: bool = False  # an internal gap fill, not a client's request
    entry_id: bytes | None = None  # a send's stream entry, once written
    # A get_history sent for its grant only (the page read here once it is renewed):
    # resolved True when renewed, False when answered (an error, a worker's page, a
    # timeout).
    renewal: asyncio.Future[bool] | None = None


class Hub:
    """The node's sockets, their chats and their requests in flight."""

    def __init__(
        self,
        settings: Settings,
        producer: StreamProducer,
        metrics: GatewayMetrics,
        subscriber_factory: Callable[[Hub], Subscriber],
        reader: HistoryReader | None = None,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.node_id = settings.node_id
        self.producer = producer
        self.metrics = metrics
        self.limits = protocol.Limits(max_text_length=settings.max_text_length)
        self.connections: dict[int, Connection] = {}
        self.chats: dict[str, dict[int, Connection]] = {}
        # In forwarding order, which is also deadline order (one timeout for all).
        self.pending: dict[int, Pending] = {}
        # One timer for the oldest request's deadline, not one per request: a timer per
        # request (made, then cancelled when its reply came) was the costliest line of
        # the send path, ~3 % of a gateway's CPU at 3,000 sends/s.
        self._expiry: asyncio.TimerHandle | None = None
        # A request forwarded late (after a failed page read, or a long wait for its
        # subscription) is due before requests forwarded ahead of it: it gets a timer of
        # its own, so it is answered at its own deadline too. The latest deadline so far
        # tells which ones those are.
        self._own_timers: dict[int, asyncio.TimerHandle] = {}
        self._last_deadline = 0.0
        # The event loop, once known: on Python 3.11 each asyncio.get_running_loop() is a
        # getpid() system call, ~1 µs a request on a loaded gateway.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._fills: dict[str, Fill] = {}
        # Look-ups of sends whose replies may have been missed (see on_resubscribed).
        self._recoveries: set[asyncio.Task[None]] = set()
        # History pages this node reads itself (GATEWAY_READS_HISTORY), and the sockets
        # whose page is being read (bounded: beyond it, pages go to the workers).
        self.reader = reader
        self.reading: set[int] = set()
        self._reader_off_until = 0.0
        self._history_here = metrics.history_reads.labels("gateway")
        self._history_by_worker = metrics.history_reads.labels("worker")
        self._renewals = metrics.grant_renewals
        self._read_seconds = metrics.history_read_seconds
        # (chat, user) pairs and token digests -> until when (monotonic) grants for them are
        # refused. Workers cache members and tokens for AUTH_CACHE_TTL_SECONDS, and a
        # request may be answered up to REQUEST_TIMEOUT_SECONDS after it was read.
        self._revoked: dict[tuple[str, str] | str, float] = {}
        self._revoked_for = settings.auth_cache_ttl + settings.request_timeout
        self._revoked_counts = {r: metrics.grants_revoked.labels(r) for r in GRANT_END_REASONS}
        # Socket writes made while a burst of pub/sub messages is handled go out together.
        self.writes = WriteBatch()
        self.subscriber = subscriber_factory(self)
        # Label look-ups cost a lock and a dict per call: resolve them once.
        self._replies = {t: metrics.replies.labels(t) for t in (*protocol.REPLY_TYPES, "unknown")}
        self._out_reply = metrics.frames_out.labels("reply")
        self._out_push = metrics.frames_out.labels("push")
        self._latency = {e: metrics.request_seconds.labels(e) for e in protocol.EVENTS}
        # Gauges read at scrape time instead of being set on every change.
        metrics.requests_in_flight.set_function(lambda: len(self.pending))
        metrics.sockets_open.set_function(lambda: len(self.connections))
        metrics.chat_channels.set_function(lambda: self.subscriber.chat_channels)
        metrics.stream_buffer.set_function(lambda: self.producer.buffered)

    # -- connections -------------------------------------------------------------

    def new_connection_id(self) -> int:
        """A connection id unique on this node."""
        return next(self._ids)

    def add(self, conn: Connection) -> None:
        """Register an accepted socket."""
        self.connections[conn.conn_id] = conn

    def remove(self, conn: Connection) -> None:
        """Forget a closed socket and release its chats."""
        conn.closed = True
        if self.connections.pop(conn.conn_id, None) is None:
            return
        for chat_id in list(conn.chats):
            self._leave(conn, chat_id)

    # -- requests ----------------------------------------------------------------

    def reply_now(self, conn: Connection, frame: bytes, reply_type: str) -> None:
        """Send a reply decided on this node (no worker involved)."""
        self._replies[reply_type].inc()
        self._out_reply.inc()
        conn.send(frame)

    async def submit(self, conn: Connection, request: protocol.Request, received_at: float) -> None:
        """Forward a validated request to its partition stream; its reply comes later.

        A ``get_history`` that this node may serve itself (:meth:`_reads_here`) is read
        from MongoDB here instead, and forwarded only if that read fails.
        """
        digest = conn.token_digest(request.token)
        if request.event_type == protocol.GET_HISTORY:
            if self._reads_here(conn, request, digest):
                if await self._read_here(conn, request, received_at):
                    return
            elif self._reads_here(conn, request, digest, stale=True):
                if await self._renew_and_read(conn, request, digest, received_at):
                    return
            self._history_by_worker.inc()
        await self._to_worker(conn, request, digest, received_at)

    async def _to_worker(
        self,
        conn: Connection,
        request: protocol.Request,
        digest: str,
        received_at: float,
        renewal: asyncio.Future[bool] | None = None,
    ) -> bool:
        """Forward ``request`` to its partition stream; False when it was refused (and
        answered so)."""
        channel = self.keys.chat_channel(request.chat_id)
        try:
            await self.subscriber.acquire(channel)
        except TimeoutError:
            self.subscriber.release(channel)
            self._fail(conn, request.event_type, request.request_id, protocol.DETAIL_SERVER_ERROR)
            return False
        return self._forward(
            conn,
            request.chat_id,
            request.event_type,
            request.message,
            request.request_id,
            digest,
            received_at,
            renewal=renewal,
        )

    async def _renew_and_read(
        self, conn: Connection, request: protocol.Request, digest: str, received_at: float
    ) -> bool:
        """A page for a socket whose grant is only too old: a worker checks the token
        and the chat again and renews the grant without reading the page, which this
        node then reads itself. Most sockets ask for history now and then, further apart
        than AUTH_CACHE_TTL_SECONDS; without this, each of their pages made the worker's
        trip (a read and a page through Redis). False when the page is still to be
        asked of a worker as usual (nothing was sent)."""
        renewal: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # This socket's next frame waits for the renewal, as it does while a page is
        # read here: its replies keep the order of its requests.
        if not await self._to_worker(conn, request, digest, received_at, renewal) or not (
            await renewal
        ):
            # Refused, timed out, or answered by the worker: an error, or its own page
            # (a worker of an earlier release).
            self._history_by_worker.inc()
            return True
        self._renewals.inc()
        try:
            if conn.closed:
                return True
            return self._reads_here(conn, request, digest) and await self._read_here(
                conn, request, received_at
            )
        finally:
            self.reading.discard(conn.conn_id)

    def _reads_here(
        self, conn: Connection, request: protocol.Request, digest: str, stale: bool = False
    ) -> bool:
        """Whether this node may read the page of a ``get_history`` itself (with
        ``stale``: would, once a worker renewed the socket's grant, which is too old).

        Only for a socket a worker has authorised for the chat with this very token, on
        a view of MongoDB the worker would still answer from (read within
        AUTH_CACHE_TTL_SECONDS), with no revocation or expiry since; with none of its
        own requests in flight, so every send it was answered for is stored; and with no
        gap being filled, so the pushes it was sent are every message up to its last
        id. Anything else goes to the worker, which decides as before.
        """
        if self.reader is None or conn.in_flight or len(self.reading) >= MAX_DIRECT_READS:
            return False
        if self._reader_off_until > time.monotonic():
            return False
        chat_id = request.chat_id
        state = conn.chats.get(chat_id)
        if state is None or state.digest != digest or state.held is not None:
            return False
        if chat_id in self._fills:
            return False
        if (state.granted_at + self.settings.auth_cache_ttl <= time.monotonic()) != stale:
            return False
        if state.expires_at is not None and state.expires_at <= time.time():
            return False
        return not self._is_revoked(chat_id, state.user_id, digest)

    async def _read_here(
        self, conn: Connection, request: protocol.Request, received_at: float
    ) -> bool:
        """Answer a ``get_history`` from MongoDB; False (nothing sent) when it could not.

        The page stops at the socket's last pushed id: what it shows, the socket was
        also pushed, as when a worker answers (its pushes go out before its pages).
        """
        assert self.reader is not None
        chat_id = request.chat_id
        state = conn.chats[chat_id]
        query = request.message or {}
        self.reading.add(conn.conn_id)
        started = time.monotonic()
        try:
            async with asyncio.timeout(min(READ_TIMEOUT, self.settings.request_timeout / 2)):
                page = await self.reader.history(
                    chat_id,
                    limit=query.get("limit", protocol.HISTORY_DEFAULT_LIMIT),
                    before=query.get("before_id"),
                    after=query.get("after_id"),
                    upto=state.last_seq,
                )
        except Exception as exc:
            # The worker answers instead; MongoDB is left alone here for a while, so an
            # outage costs each read one attempt at most, not one per request.
            self._reader_off_until = time.monotonic() + READER_PAUSE
            self.metrics.history_read_errors.inc()
            log.warning(
                "reading a history page failed; workers answer pages for %.0f s",
                READER_PAUSE,
                extra={"error": describe_error(exc)},
            )
            return False
        finally:
            self.reading.discard(conn.conn_id)
        self._read_seconds.observe(time.monotonic() - started)
        if conn.closed:
            return True
        if conn.chats.get(chat_id) is not state or self._is_revoked(
            chat_id, state.user_id, state.digest
        ):
            return False  # revoked meanwhile: the worker decides
        frame = protocol.history_frame(page, state.user_id, request.request_id)
        self._history_here.inc()
        self._latency[protocol.GET_HISTORY].observe(time.monotonic() - received_at)
        self.reply_now(conn, frame, protocol.SUCCESS)
        return True

    def _forward(
        self,
        conn: Connection,
        chat_id: str,
        event_type: str,
        message: dict[str, Any] | None,
        request_id: str | None,
        digest: str,
        received_at: float,
        fill: bool = False,
        renewal: asyncio.Future[bool] | None = None,
    ) -> bool:
        """XADD one request (the caller holds a reference on the chat's channel); with
        ``renewal``, a ``get_history`` for the socket's grant only.

        Returns False, with the reference released, when the request was refused.
        The request's REQUEST_TIMEOUT_SECONDS count from ``received_at``, so time spent
        before forwarding it (a page read that failed) is not given to it twice.
        """
        elapsed = time.monotonic() - received_at
        remaining = self.settings.request_timeout - elapsed
        if remaining <= 0:
            # Its time is up already: written now, it would be handled after its client
            # was told it timed out.
            self.subscriber.release(self.keys.chat_channel(chat_id))
            if not fill:
                self.metrics.request_timeouts.inc()
                self._latency[event_type].observe(elapsed)
                self._fail(conn, event_type, request_id, protocol.DETAIL_TIMEOUT)
            return False
        req = next(self._req_ids)
        entry = StreamEntry(
            node=self.node_id,
            conn=conn.conn_id,
            req=req,
            request_id=request_id,
            chat_id=chat_id,
            token_digest=digest,
            event_type=event_type,
            message=message,
            received_at=time.time() - elapsed,
            timeout=remaining,
            reply_on_push=True,
            carried_age=True,
            grant_only=renewal is not None,
        )
        stream = self.keys.stream(partition_of(chat_id, self.settings.partitions))
        # A send's entry id is kept: its message's _id, by which this node's reader finds
        # it stored if its reply is missed (on_resubscribed). Without a reader, no use.
        keep = event_type in protocol.SEND_EVENTS and not fill and self.reader is not None
        key = req if keep else 0
        if not self.producer.submit(stream, encode_stream_entry(entry), key):
            self.subscriber.release(self.keys.chat_channel(chat_id))
            if not fill:
                self.metrics.overload_refusals.inc()
                self._fail(conn, event_type, request_id, "Server is overloaded, retry later")
            return False
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + remaining
        self.pending[req] = Pending(
            conn,
            chat_id,
            event_type,
            request_id,
            received_at,
            digest,
            deadline,
            fill=fill,
            renewal=renewal,
        )
        if not fill:
            conn.in_flight += 1
        if deadline + EXPIRY_SLACK < self._last_deadline:
            self._own_timers[req] = loop.call_at(deadline, self._timeout, req)
        else:
            self._last_deadline = deadline
        if self._expiry is None:
            self._expiry = loop.call_at(deadline, self._expire)
        return True

    def _fail(self, conn: Connection, event_type: str, request_id: str | None, detail: str) -> None:
        frame = protocol.encode_reply(protocol.SERVER_ERROR, event_type, None, detail, request_id)
        self.reply_now(conn, frame, protocol.SERVER_ERROR)

    def _expire(self) -> None:
        """Answer every request whose deadline has come, then wait for the next one.

        Every request gets the same timeout, so ``pending`` (in forwarding order) is in
        deadline order: only its oldest entries can be due, and the first one that is
        not names when to look again. (The few forwarded late, due before requests
        ahead of them, have timers of their own.)
        """
        self._expiry = None
        loop = asyncio.get_running_loop()
        # A timer may fire a little before its time (the loop rounds to a millisecond):
        # a request due within that is answered now rather than by another wake-up.
        now = loop.time() + EXPIRY_SLACK
        due = []
        for req, pending in self.pending.items():
            if pending.deadline > now:
                break
            due.append(req)
        for req in due:
            self._timeout(req)  # a gap fill's retry may forward again (a later deadline)
        if self._expiry is not None:
            self._expiry.cancel()
        first = next(iter(self.pending.values()), None)
        self._expiry = None if first is None else loop.call_at(first.deadline, self._expire)

    def close(self) -> None:
        """Stop the deadline timer and the look-ups of missed replies (the node is
        shutting down); :meth:`wait_closed` waits for the look-ups to end."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for handle in self._own_timers.values():
            handle.cancel()
        self._own_timers.clear()
        for task in self._recoveries:
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait for the look-ups :meth:`close` cancelled."""
        await asyncio.gather(*self._recoveries, return_exceptions=True)

    def written(self, req: int, entry_id: bytes) -> None:
        """The producer wrote request ``req``'s stream entry (a send): remember its id."""
        pending = self.pending.get(req)
        if pending is not None:
            pending.entry_id = entry_id

    def _timeout(self, req: int) -> None:
        pending = self._take(req)
        if pending is None:
            return
        self.subscriber.release(self.keys.chat_channel(pending.chat_id))
        if pending.fill:
            self._finish_fill(pending.chat_id, None)
            return
        self.metrics.request_timeouts.inc()
        self._observe(pending)
        self._fail(pending.conn, pending.event_type, pending.request_id, protocol.DETAIL_TIMEOUT)
        _resolve(pending, False)

    def _take(self, req: int) -> Pending | None:
        """Take request ``req`` out of ``pending`` (None when it is not there)."""
        pending = self.pending.pop(req, None)
        if pending is not None and not pending.fill:
            pending.conn.in_flight -= 1
        if self._own_timers:
            handle = self._own_timers.pop(req, None)
            if handle is not None:
                handle.cancel()
        return pending

    def _observe(self, pending: Pending) -> None:
        self._latency[pending.event_type].observe(time.monotonic() - pending.received_at)

    # -- pub/sub -----------------------------------------------------------------

    def on_message(self, channel: str, data: bytes) -> None:
        """Dispatch one pub/sub message (called by the subscriber's read loop)."""
        try:
            chat_id = self.keys.chat_from_channel(channel)
            if chat_id is not None:
                push = decode_push(data)
                if push.reply_req is not None and push.origin_node == self.node_id:
                    self._on_carried_reply(push, push.reply_req)
                self._on_push(chat_id, push)
            elif channel == self.keys.control_channel:
                control = decode_control(data)
                if isinstance(control, Revocation):
                    self.revoke(control)
                elif isinstance(control, Admission):
                    self.admit(control)
            else:
                self._on_reply(data)
        except Exception:
            log.exception("bad pub/sub payload", extra={"channel": channel[:80]})

    def _on_reply(self, data: bytes) -> None:
        reply = decode_reply_envelope(data)
        pending = self._take(reply.req)
        if pending is None:
            return  # timed out already: the client was told; a second reply would confuse it
        self._answer(pending, reply.frame, reply.grant, reply.revoke)

    def _on_carried_reply(self, push: Push, req: int) -> None:
        """Answer request ``req`` of this node from the push of the message it stored
        (handled before the push itself, as a reply on the node channel would be)."""
        pending = self._take(req)
        if pending is None:
            return  # timed out already, or a redelivered entry's push: answered before
        frame = push.mine
        if pending.request_id is not None:
            frame = protocol.with_request_id(frame, pending.request_id)
        grant = Grant(
            push.chat_id, push.author, push.seq, push.reply_expires_at, age=push.reply_age or 0.0
        )
        self._answer(pending, frame, grant, None)

    def _answer(
        self, pending: Pending, frame: bytes, grant: Grant | None, revoke: str | None
    ) -> None:
        """Deliver the reply to a request taken out of ``pending``."""
        conn = pending.conn
        channel = self.keys.chat_channel(pending.chat_id)
        if pending.fill:
            self.subscriber.release(channel)
            self._finish_fill(pending.chat_id, frame)
            return
        if pending.renewal is not None and grant is not None and not frame:
            # The grant renewed, without a page: the page is read here (_renew_and_read).
            # Counted as being read from now on, so a drain does not close the socket
            # before the reader's task resumes.
            self.reading.add(conn.conn_id)
            if not conn.closed:
                self._authorise(conn, grant, pending, frame)
            self.subscriber.release(channel)
            _resolve(pending, True)
            return
        if not conn.closed:
            send_now = True
            if grant is not None:
                send_now = self._authorise(conn, grant, pending, frame)
            elif revoke is not None:
                self._leave(conn, revoke)
            self._observe(pending)
            reply_type = _reply_type(frame)
            self._replies[reply_type].inc()
            self._out_reply.inc()
            if send_now:
                conn.send(frame)
        self.subscriber.release(channel)
        _resolve(pending, False)

    def _deliver(
        self,
        conn: Connection,
        state: ChatState,
        seq: int,
        payload: bytes | None,
        wire: bytes | None = None,
    ) -> bool:
        """Send id ``seq`` (the next one) to a socket, then any held frames that follow.

        A frame held for ``seq`` (the socket's own reply) goes instead of ``payload``;
        ``payload`` None advances without sending (the author's own socket). Returns
        True when a push was written.
        """
        state.last_seq = seq
        held = state.held
        own = held.pop(seq, None) if held is not None else None
        pushed = False
        if own is not None:
            conn.send(own)
        elif payload is not None:
            conn.send(payload, wire)
            pushed = True
        if held is not None:
            while state.last_seq + 1 in held:
                state.last_seq += 1
                conn.send(held.pop(state.last_seq))
            if not held:
                state.held = None
        return pushed

    def _release_held(self, chat_id: str) -> None:
        """Send every held frame of the chat in id order (a gap that could not be filled)."""
        for conn in list((self.chats.get(chat_id) or {}).values()):
            state = conn.chats.get(chat_id)
            if state is None or state.held is None:
                continue
            for seq in sorted(state.held):
                if seq > state.last_seq:
                    state.last_seq = seq
                conn.send(state.held[seq])
            state.held = None

    def _authorise(self, conn: Connection, grant: Grant, pending: Pending, frame: bytes) -> bool:
        """Record the grant; False when the reply ``frame`` is held back (sent later in order)."""
        state = conn.chats.get(grant.chat_id)
        if self._is_revoked(grant.chat_id, grant.user_id, pending.digest):
            # Decided on a worker's view from before the revocation: the reply goes out
            # (as for any request within AUTH_CACHE_TTL_SECONDS), the pushes do not.
            return True
        # Counted from the worker's read of what it decided on, which its cache may have
        # kept for up to AUTH_CACHE_TTL_SECONDS before this grant: a change made straight
        # in MongoDB then reaches this node's own page reads within the TTL, not twice it.
        checked_at = time.monotonic() - grant.age
        if state is None:
            conn.chats[grant.chat_id] = ChatState(
                grant.user_id, grant.head, pending.digest, grant.expires_at, checked_at
            )
            self.chats.setdefault(grant.chat_id, {})[conn.conn_id] = conn
            # The socket keeps its own reference on the channel while authorised.
            self.subscriber.hold(self.keys.chat_channel(grant.chat_id))
            return True
        state.user_id = grant.user_id
        state.digest = pending.digest
        state.expires_at = grant.expires_at
        state.granted_at = checked_at
        if pending.event_type not in protocol.SEND_EVENTS:
            # A history page changes nothing about which pushes this socket has had.
            return True
        # A send's grant names the message the reply carries. Pushes of everything
        # before it were published ahead of this reply, so normally it is the next id;
        # if not, pushes were lost (a pub/sub outage): hold the reply back, fill the gap,
        # and send the reply in its place in id order (it then stands for the push too).
        # A retry's message is older than the socket's last id, and its reply goes now.
        own = grant.carries
        if own == state.last_seq + 1:
            state.hold(own, frame)
            self._deliver(conn, state, own, None)
            return False
        if own > state.last_seq + 1:
            state.hold(own, frame)
            if grant.chat_id not in self._fills and not self._start_fill(
                grant.chat_id, state.last_seq, []
            ):
                self._release_held(grant.chat_id)
            return False
        return True

    def _leave(self, conn: Connection, chat_id: str) -> None:
        """The socket no longer sees the chat: forget it and drop its channel reference.

        Replies of its own held back for order (behind a gap being filled) are sent
        first: they answer requests that were authorised, and nothing else would.
        """
        state = conn.chats.pop(chat_id, None)
        if state is None:
            return
        if state.held and not conn.closed:
            for seq in sorted(state.held):
                conn.send(state.held[seq])
        members = self.chats.get(chat_id)
        if members is not None:
            members.pop(conn.conn_id, None)
            if not members:
                del self.chats[chat_id]
        self.subscriber.release(self.keys.chat_channel(chat_id))

    # -- revocation --------------------------------------------------------------

    def revoke(self, revocation: Revocation) -> None:
        """End the grants a revocation names, on every socket of this node, and refuse
        grants for them that a worker decided from an older view."""
        until = time.monotonic() + self._revoked_for
        removed = token_revoked = 0
        chat_id = revocation.chat_id
        if chat_id is not None and revocation.user_ids:
            users = set(revocation.user_ids)
            for user in users:
                self._remember((chat_id, user), until)
            for conn in list((self.chats.get(chat_id) or {}).values()):
                state = conn.chats.get(chat_id)
                if state is not None and state.user_id in users:
                    self._leave(conn, chat_id)
                    removed += 1
        digests = set(revocation.token_digests)
        if digests:
            for digest in digests:
                self._remember(digest, until)
            for chat, members in list(self.chats.items()):
                for conn in list(members.values()):
                    state = conn.chats.get(chat)
                    if state is not None and state.digest in digests:
                        self._leave(conn, chat)
                        token_revoked += 1
        if removed:
            self._revoked_counts["member_removed"].inc(removed)
        if token_revoked:
            self._revoked_counts["token_revoked"].inc(token_revoked)
        log.info(
            "revocation",
            extra={"grants_ended": removed + token_revoked, "tokens": len(digests)},
        )

    def admit(self, admission: Admission) -> None:
        """Forget earlier removals of these users from the chat: a member added back gets
        pushes from its next granted request, not only once the removal is forgotten."""
        for user in admission.user_ids:
            self._revoked.pop((admission.chat_id, user), None)

    def _remember(self, key: tuple[str, str] | str, until: float) -> None:
        self._revoked.pop(key, None)  # re-inserted last: the order is the expiry order
        self._revoked[key] = until
        while len(self._revoked) > MAX_REMEMBERED_REVOCATIONS:
            del self._revoked[next(iter(self._revoked))]

    def _is_revoked(self, chat_id: str, user_id: str, digest: str) -> bool:
        if not self._revoked:
            return False
        now = time.monotonic()
        while self._revoked:  # forget what has run out (oldest first)
            oldest = next(iter(self._revoked))
            if self._revoked[oldest] > now:
                break
            del self._revoked[oldest]
        return (chat_id, user_id) in self._revoked or digest in self._revoked

    def _on_push(self, chat_id: str, push: Push, *, may_fill: bool = True) -> None:
        members = self.chats.get(chat_id)
        if not members:
            return
        fill = self._fills.get(chat_id)
        if fill is not None:
            # Delivered in order once the history in front of them has been sent.
            # At the bound they are dropped here and fetched by the next fill instead.
            if len(fill.waiting) < MAX_FILL_BUFFER:
                fill.waiting.append(push)
            return
        seq = push.seq
        # One pass over the chat's sockets: those this push is for, and the lowest last id
        # among those that missed one before it.
        targets: list[tuple[Connection, ChatState]] = []
        behind: int | None = None
        for conn in members.values():
            state = conn.chats.get(chat_id)
            if state is None or seq <= state.last_seq:
                continue
            if seq > state.last_seq + 1 and (behind is None or state.last_seq < behind):
                behind = state.last_seq
            targets.append((conn, state))
        if behind is not None and may_fill and self._start_fill(chat_id, behind, [push]):
            return
        origin_here = push.origin_node == self.node_id
        now = time.time()
        wire_mine: bytes | None = None
        wire_other: bytes | None = None
        delivered = 0
        expired = 0
        for conn, state in targets:
            if state.expires_at is not None and state.expires_at <= now:
                # The token that authorised this socket has expired: no more pushes.
                self._leave(conn, chat_id)
                expired += 1
                continue
            if origin_here and conn.conn_id == push.origin_conn:
                # The author's socket got this message as its reply.
                self._deliver(conn, state, seq, None)
                continue
            if state.user_id == push.author:
                if wire_mine is None:
                    wire_mine = text_frame(push.mine)
                sent = self._deliver(conn, state, seq, push.mine, wire_mine)
            else:
                if wire_other is None:
                    wire_other = text_frame(push.other)
                sent = self._deliver(conn, state, seq, push.other, wire_other)
            delivered += sent
        if expired:
            self._revoked_counts["token_expired"].inc(expired)
        if delivered:
            self.metrics.deliveries.inc(delivered)
            self._out_push.inc(delivered)
            self.metrics.delivery_seconds.observe(max(0.0, now - push.stored_at))

    # -- gap recovery ------------------------------------------------------------
    #
    # Pub/sub drops what is published while a subscriber is disconnected. Ids are
    # sequential per chat, so a socket that was sent id N and now sees N+2 missed N+1.
    # One history fetch per chat (not per socket) then brings every local socket of the
    # chat up to date, page by page, and the pushes that arrived meanwhile follow it.

    def _start_fill(self, chat_id: str, after: int, waiting: list[Push], attempt: int = 1) -> bool:
        """Fetch the chat's messages after ``after`` through the worker; False if impossible."""
        members = self.chats.get(chat_id) or {}
        owner = next((c for c in members.values() if chat_id in c.chats), None)
        if owner is None:
            return False
        fill = Fill(waiting=waiting, after=after, attempt=attempt)
        self._fills[chat_id] = fill
        self.subscriber.hold(self.keys.chat_channel(chat_id))
        submitted = self._forward(
            owner,
            chat_id,
            protocol.GET_HISTORY,
            {"after_id": after, "limit": protocol.HISTORY_MAX_LIMIT},
            None,
            owner.chats[chat_id].digest,
            time.monotonic(),
            fill=True,
        )
        if not submitted:
            self._fills.pop(chat_id, None)
            return False
        self.metrics.gap_fills.inc()
        return True

    def _finish_fill(self, chat_id: str, frame: bytes | None) -> None:
        fill = self._fills.pop(chat_id, None)
        if fill is None:
            return
        if frame is None:
            # No answer in time (workers busy or down): try again a few times, then let
            # the pushes through; a socket can still catch up itself with after_id.
            if fill.attempt < MAX_FILL_ATTEMPTS and self._start_fill(
                chat_id, fill.after, fill.waiting, fill.attempt + 1
            ):
                return
            self.metrics.gaps_unfilled.inc()
            self._replay(chat_id, fill.waiting)
            return
        messages = _history_messages(frame)
        self._deliver_history(chat_id, messages)
        if len(messages) >= protocol.HISTORY_MAX_LIMIT:
            # A full page: there is more between it and the waiting pushes.
            last = int(messages[-1]["id"])
            if self._start_fill(chat_id, last, fill.waiting):
                return
        # A socket further behind than this fill reached (it fell behind while the fill
        # was in flight) gets one more round from where it is.
        behind = self._most_behind(chat_id, fill.after)
        if behind is not None and fill.attempt < MAX_FILL_ATTEMPTS:
            if self._start_fill(chat_id, behind, fill.waiting, fill.attempt + 1):
                return
        self._replay(chat_id, fill.waiting)

    def _most_behind(self, chat_id: str, after: int) -> int | None:
        """The lowest last id among the chat's sockets when it is below ``after``."""
        lowest = min(
            (
                s.last_seq
                for c in (self.chats.get(chat_id) or {}).values()
                if (s := c.chats.get(chat_id))
            ),
            default=None,
        )
        return lowest if lowest is not None and lowest < after else None

    def _replay(self, chat_id: str, waiting: list[Push]) -> None:
        # A gap still open after a completed fill cannot be filled (the ids are not in
        # history); deliver rather than loop, and let held replies go.
        for push in waiting:
            self._on_push(chat_id, push, may_fill=False)
        self._release_held(chat_id)

    def _deliver_history(self, chat_id: str, messages: list[dict[str, Any]]) -> None:
        members = self.chats.get(chat_id)
        if not members or not messages:
            return
        variants: dict[int, tuple[bytes, bytes]] = {}
        recovered = 0
        for conn in list(members.values()):
            state = conn.chats.get(chat_id)
            if state is None:
                continue
            for message in messages:
                seq = int(message["id"])
                if seq <= state.last_seq:
                    continue
                if seq not in variants:
                    variants[seq] = _push_variants(message)
                mine, other = variants[seq]
                frame = mine if message["user_id"] == state.user_id else other
                recovered += self._deliver(conn, state, seq, frame)
        if recovered:
            self.metrics.gaps_filled.inc(recovered)
            self.metrics.deliveries.inc(recovered)
            self._out_push.inc(recovered)

    def on_resubscribed(self) -> None:
        """After a (re)connect: fetch what every local chat may have missed meanwhile.

        Sends written before the pub/sub connection was lost may have been stored and
        answered while it was down: those replies are gone. Each such send is looked up
        first by its entry id (its message's _id) and, found, answered from MongoDB (one
        not yet stored is answered by its worker, now heard); the chats' gaps are filled
        after it, so a recovered reply stands for its message's push on the author's
        socket, in id order, as a worker's reply does. Needs this node's MongoDB reader.
        """
        partitions = self.settings.partitions
        lost = {
            event_id(partition_of(p.chat_id, partitions), p.entry_id.decode()): req
            for req, p in self.pending.items()
            if p.entry_id is not None
        }
        if not lost:
            self._fill_gaps()
            return
        task = asyncio.get_running_loop().create_task(self._recover(lost))
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _recover(self, lost: dict[str, int]) -> None:
        await self._answer_stored(lost)
        self._fill_gaps()

    def _fill_gaps(self) -> None:
        for chat_id, members in list(self.chats.items()):
            if chat_id in self._fills or not members:
                continue
            after = min(
                (state.last_seq for c in members.values() if (state := c.chats.get(chat_id))),
                default=None,
            )
            if after is not None:
                self._start_fill(chat_id, after, [])

    async def _answer_stored(self, lost: dict[str, int]) -> None:
        assert self.reader is not None
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                docs = await self.reader.by_ids(list(lost))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Those requests are answered as before: by their timeout.
            log.warning(
                "could not look up sends whose replies may have been missed",
                extra={"error": describe_error(exc), "requests": len(lost)},
            )
            return
        for doc in docs:
            req = lost.get(doc["_id"])
            pending = self._take(req) if req is not None else None
            if pending is None:
                continue  # answered meanwhile (its reply came after all), or timed out
            self.metrics.replies_recovered.inc()
            view = protocol.message_view(doc, True)
            frame = protocol.encode_reply(
                protocol.SUCCESS,
                pending.event_type,
                [view],
                protocol.DETAIL_SUCCESS,
                pending.request_id,
            )
            self._answer(pending, frame, self._kept_grant(pending, doc), None)

    @staticmethod
    def _kept_grant(pending: Pending, doc: Doc) -> Grant | None:
        """The socket's grant to the chat as it stands, naming the recovered message (so
        the reply goes out in id order, as a worker's would); None when the socket has no
        grant to the chat for the message's author: no worker's word extends one here."""
        state = pending.conn.chats.get(pending.chat_id)
        if state is None or state.user_id != doc["user_id"]:
            return None
        age = max(0.0, time.monotonic() - state.granted_at)
        return Grant(pending.chat_id, state.user_id, int(doc["seq"]), state.expires_at, age=age)


def _resolve(pending: Pending, renewed: bool) -> None:
    """Tell a renewal's waiter how its request ended (nothing for other requests)."""
    if pending.renewal is not None and not pending.renewal.done():
        pending.renewal.set_result(renewed)


def _reply_type(frame: bytes) -> str:
    # Frames start with {"type":"<type>", written by protocol.encode_reply.
    end = frame.find(b'"', 9)
    kind = frame[9:end].decode() if end > 9 else "unknown"
    return kind if kind in protocol.REPLY_TYPES else "unknown"


def _history_messages(frame: bytes) -> list[dict[str, Any]]:
    body = orjson.loads(frame)
    if body.get("type") != protocol.SUCCESS:
        return []
    messages = body.get("messages") or []
    return [m for m in messages if isinstance(m, dict)]


def _push_variants(message: dict[str, Any]) -> tuple[bytes, bytes]:
    """The push frames (is_my true, false) of a message read back from history."""
    event = protocol.SEND_MESSAGE if message["type"] == protocol.TEXT else protocol.SEND_FILE
    frames = []
    for is_my in (True, False):
        view = dict(message, is_my=is_my)
        frames.append(
            protocol.encode_reply(protocol.SUCCESS, event, [view], protocol.DETAIL_SUCCESS)
        )
    return frames[0], frames[1]
