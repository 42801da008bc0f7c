"""Routing on one gateway node: requests out to streams, replies and pushes back to sockets.

- A request takes a reference on its chat's channel (confirmed subscription) before it is
  forwarded, so the worker's result cannot be published before this node listens.
- Replies come on the node channel and are matched to in-flight requests by an id of
  this node's; a reply for a request that already timed out is dropped.
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
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared import protocol
from shared.codec import (
    Grant,
    Push,
    StreamEntry,
    decode_push,
    decode_reply_envelope,
    encode_stream_entry,
    token_digest,
)
from shared.config import Settings
from shared.keys import Keys, partition_of
from shared.metrics import GatewayMetrics

from .connection import ChatState, Connection, text_frame
from .producer import StreamProducer
from .subscriber import Subscriber

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Pending:
    """A request forwarded to a worker and not yet answered."""

    conn: Connection
    chat_id: str
    event_type: str
    request_id: str | None
    received_at: float
    digest: str
    timer: asyncio.TimerHandle | None = None
    # Internal gap fills carry the frames to deliver after them.
    fill: list[Push] | None = field(default=None)


class Hub:
    """The node's sockets, their chats and their requests in flight."""

    def __init__(
        self,
        settings: Settings,
        producer: StreamProducer,
        metrics: GatewayMetrics,
        subscriber_factory: Callable[[Hub], Subscriber],
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.node_id = settings.node_id
        self.producer = producer
        self.metrics = metrics
        self.limits = protocol.Limits(max_text_length=settings.max_text_length)
        self.connections: dict[int, Connection] = {}
        self.chats: dict[str, dict[int, Connection]] = {}
        self.pending: dict[int, Pending] = {}
        self._ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        # Token digests that authorised (conn, chat): used to fill gaps on its behalf.
        self._grant_tokens: dict[tuple[int, str], str] = {}
        self._filling: dict[tuple[int, str], list[Push]] = {}
        self.subscriber = subscriber_factory(self)

    # -- connections -------------------------------------------------------------

    def new_connection_id(self) -> int:
        """A connection id unique on this node."""
        return next(self._ids)

    def add(self, conn: Connection) -> None:
        """Register an accepted socket."""
        self.connections[conn.conn_id] = conn
        self.metrics.sockets_open.set(len(self.connections))

    def remove(self, conn: Connection) -> None:
        """Forget a closed socket and release its chats."""
        conn.closed = True
        if self.connections.pop(conn.conn_id, None) is None:
            return
        for chat_id in conn.chats:
            members = self.chats.get(chat_id)
            if members is not None:
                members.pop(conn.conn_id, None)
                if not members:
                    del self.chats[chat_id]
            self._grant_tokens.pop((conn.conn_id, chat_id), None)
            self._filling.pop((conn.conn_id, chat_id), None)
            self.subscriber.release(self.keys.chat_channel(chat_id))
        conn.chats.clear()
        self.metrics.sockets_open.set(len(self.connections))
        self.metrics.chat_channels.set(self.subscriber.chat_channels)

    # -- requests ----------------------------------------------------------------

    def reply_now(self, conn: Connection, frame: bytes, reply_type: str) -> None:
        """Send a reply decided on this node (no worker involved)."""
        self.metrics.replies.labels(reply_type).inc()
        self.metrics.frames_out.labels("reply").inc()
        conn.send(frame)

    async def submit(self, conn: Connection, request: protocol.Request, received_at: float) -> None:
        """Forward a validated request to its partition stream; its reply comes later."""
        channel = self.keys.chat_channel(request.chat_id)
        try:
            await self.subscriber.acquire(channel)
        except TimeoutError:
            self.subscriber.release(channel)
            self._fail(conn, request.event_type, request.request_id, protocol.DETAIL_SERVER_ERROR)
            return
        self._forward(
            conn,
            request.chat_id,
            request.event_type,
            request.message,
            request.request_id,
            token_digest(request.token),
            received_at,
        )

    def _forward(
        self,
        conn: Connection,
        chat_id: str,
        event_type: str,
        message: dict[str, Any] | None,
        request_id: str | None,
        digest: str,
        received_at: float,
        fill: list[Push] | None = None,
    ) -> None:
        """XADD one request (the caller holds a reference on the chat's channel)."""
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
            received_at=time.time(),
        )
        stream = self.keys.stream(partition_of(chat_id, self.settings.partitions))
        if not self.producer.submit(stream, encode_stream_entry(entry)):
            self.subscriber.release(self.keys.chat_channel(chat_id))
            if fill is None:
                self._fail(conn, event_type, request_id, "Server is overloaded, retry later")
            return
        pending = Pending(conn, chat_id, event_type, request_id, received_at, digest, fill=fill)
        pending.timer = asyncio.get_running_loop().call_later(
            self.settings.request_timeout, self._timeout, req
        )
        self.pending[req] = pending
        self.metrics.requests_in_flight.set(len(self.pending))

    def _fail(self, conn: Connection, event_type: str, request_id: str | None, detail: str) -> None:
        frame = protocol.encode_reply(protocol.SERVER_ERROR, event_type, None, detail, request_id)
        self.reply_now(conn, frame, protocol.SERVER_ERROR)

    def _timeout(self, req: int) -> None:
        pending = self.pending.pop(req, None)
        if pending is None:
            return
        self.metrics.requests_in_flight.set(len(self.pending))
        self.subscriber.release(self.keys.chat_channel(pending.chat_id))
        if pending.fill is not None:
            # A gap fill that got no answer: deliver what waited rather than hold it.
            self._end_fill(pending.conn, pending.chat_id, None)
            return
        self.metrics.request_timeouts.inc()
        self._observe(pending)
        self._fail(pending.conn, pending.event_type, pending.request_id, protocol.DETAIL_TIMEOUT)

    def _observe(self, pending: Pending) -> None:
        self.metrics.request_seconds.labels(pending.event_type).observe(
            time.monotonic() - pending.received_at
        )

    # -- pub/sub -----------------------------------------------------------------

    def on_message(self, channel: str, data: bytes) -> None:
        """Dispatch one pub/sub message (called by the subscriber's read loop)."""
        try:
            chat_id = self.keys.chat_from_channel(channel)
            if chat_id is None:
                self._on_reply(data)
            else:
                self._on_push(chat_id, decode_push(data))
        except Exception:
            log.exception("bad pub/sub payload", extra={"channel": channel[:80]})

    def _on_reply(self, data: bytes) -> None:
        reply = decode_reply_envelope(data)
        pending = self.pending.pop(reply.req, None)
        if pending is None:
            return  # timed out already: the client was told; a second reply would confuse it
        self.metrics.requests_in_flight.set(len(self.pending))
        if pending.timer is not None:
            pending.timer.cancel()
        conn = pending.conn
        channel = self.keys.chat_channel(pending.chat_id)
        if pending.fill is not None:
            self.subscriber.release(channel)
            self._end_fill(conn, pending.chat_id, reply.frame)
            return
        if not conn.closed:
            if reply.grant is not None:
                self._authorise(conn, reply.grant, pending)
            elif reply.revoke is not None:
                self._revoke(conn, reply.revoke)
            self._observe(pending)
            reply_type = _reply_type(reply.frame)
            self.metrics.replies.labels(reply_type).inc()
            self.metrics.frames_out.labels("reply").inc()
            conn.send(reply.frame)
        self.subscriber.release(channel)

    def _authorise(self, conn: Connection, grant: Grant, pending: Pending) -> None:
        state = conn.chats.get(grant.chat_id)
        if state is None:
            conn.chats[grant.chat_id] = ChatState(grant.user_id, grant.head)
            self.chats.setdefault(grant.chat_id, {})[conn.conn_id] = conn
            # The socket keeps its own reference on the channel while authorised.
            self.subscriber.hold(self.keys.chat_channel(grant.chat_id))
            self._grant_tokens[(conn.conn_id, grant.chat_id)] = pending.digest
            self.metrics.chat_channels.set(self.subscriber.chat_channels)
        else:
            state.user_id = grant.user_id
            self._grant_tokens[(conn.conn_id, grant.chat_id)] = pending.digest
            if grant.head > state.last_seq:
                state.last_seq = grant.head

    def _revoke(self, conn: Connection, chat_id: str) -> None:
        if conn.chats.pop(chat_id, None) is None:
            return
        members = self.chats.get(chat_id)
        if members is not None:
            members.pop(conn.conn_id, None)
            if not members:
                del self.chats[chat_id]
        self._grant_tokens.pop((conn.conn_id, chat_id), None)
        self.subscriber.release(self.keys.chat_channel(chat_id))

    def _on_push(self, chat_id: str, push: Push) -> None:
        members = self.chats.get(chat_id)
        if not members:
            return
        now = time.time()
        wire_mine: bytes | None = None
        wire_other: bytes | None = None
        origin_here = push.origin_node == self.node_id
        delivered = 0
        for conn in list(members.values()):
            state = conn.chats.get(chat_id)
            if state is None or push.seq <= state.last_seq:
                continue
            if origin_here and conn.conn_id == push.origin_conn:
                state.last_seq = push.seq  # the author's socket got it as its reply
                continue
            waiting = self._filling.get((conn.conn_id, chat_id))
            if waiting is not None:
                waiting.append(push)
                continue
            if push.seq > state.last_seq + 1:
                self._start_fill(conn, chat_id, state, push)
                continue
            state.last_seq = push.seq
            if state.user_id == push.author:
                if wire_mine is None:
                    wire_mine = text_frame(push.mine)
                conn.send(push.mine, wire_mine)
            else:
                if wire_other is None:
                    wire_other = text_frame(push.other)
                conn.send(push.other, wire_other)
            delivered += 1
        if delivered:
            self.metrics.deliveries.inc(delivered)
            self.metrics.frames_out.labels("push").inc(delivered)
            self.metrics.delivery_seconds.observe(max(0.0, now - push.stored_at))

    # -- gap recovery ------------------------------------------------------------

    def _start_fill(self, conn: Connection, chat_id: str, state: ChatState, push: Push) -> None:
        digest = self._grant_tokens.get((conn.conn_id, chat_id))
        if digest is None:
            state.last_seq = push.seq
            return
        self.metrics.gaps_filled.inc()
        waiting = [push]
        self._filling[(conn.conn_id, chat_id)] = waiting
        self.subscriber.hold(self.keys.chat_channel(chat_id))
        query = {"after_id": state.last_seq, "limit": protocol.HISTORY_MAX_LIMIT}
        self._forward(
            conn,
            chat_id,
            protocol.GET_HISTORY,
            query,
            None,
            digest,
            time.monotonic(),
            fill=waiting,
        )

    def _end_fill(self, conn: Connection, chat_id: str, frame: bytes | None) -> None:
        waiting = self._filling.pop((conn.conn_id, chat_id), None)
        state = conn.chats.get(chat_id)
        if waiting is None or state is None or conn.closed:
            return
        if frame is not None:
            for message in _history_messages(frame):
                seq = int(message["id"])
                if seq > state.last_seq:
                    state.last_seq = seq
                    payload = protocol.encode_reply(
                        protocol.SUCCESS,
                        protocol.SEND_FILE
                        if message["type"] != protocol.TEXT
                        else protocol.SEND_MESSAGE,
                        [message],
                        protocol.DETAIL_SUCCESS,
                    )
                    conn.send(payload)
        for push in waiting:
            if push.seq > state.last_seq:
                state.last_seq = push.seq
                conn.send(push.mine if state.user_id == push.author else push.other)

    def on_resubscribed(self) -> None:
        """After a reconnect: every socket may have missed pushes; fetch what came after."""
        for chat_id, members in list(self.chats.items()):
            for conn in list(members.values()):
                state = conn.chats.get(chat_id)
                key = (conn.conn_id, chat_id)
                if state is None or key in self._filling or key not in self._grant_tokens:
                    continue
                waiting: list[Push] = []
                self._filling[key] = waiting
                self.subscriber.hold(self.keys.chat_channel(chat_id))
                self._forward(
                    conn,
                    chat_id,
                    protocol.GET_HISTORY,
                    {"after_id": state.last_seq, "limit": protocol.HISTORY_MAX_LIMIT},
                    None,
                    self._grant_tokens[key],
                    time.monotonic(),
                    fill=waiting,
                )


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
