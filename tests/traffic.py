"""A steady stream of chat traffic from many clients, with a ledger of what happened.

Each client sends at a fixed interval into its chats with a fresh ``client_msg_id`` per
message, retries anything not acknowledged (same ``client_msg_id``), reconnects to
another gateway when its socket drops and catches up with ``after_id``, and records
every id it receives. :func:`verify` then checks the ledger against MongoDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from worker.store import Store

RETRY_DELAY = 0.3


@dataclass
class Sent:
    """One message a client wants stored."""

    cmid: str
    chat: str
    first_sent: float
    attempts: int = 0
    acked_id: int | None = None
    acked_at: float | None = None


@dataclass
class TrafficClient:
    """One user with one socket, sending into and receiving from its chats."""

    name: str
    user_id: str
    token: str
    chats: list[str]
    urls: list[str]
    session: aiohttp.ClientSession
    interval: float
    url_index: int = 0
    ws: aiohttp.ClientWebSocketResponse | None = None
    max_seen: dict[str, int] = field(default_factory=dict)
    received: dict[str, set[int]] = field(default_factory=dict)
    joined_at: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    unacked: dict[str, Sent] = field(default_factory=dict)
    reconnects: int = 0
    pushes: int = 0
    _rids: Any = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _inflight: dict[str, Sent] = field(default_factory=dict)
    _recovering: dict[str, list[int]] = field(default_factory=dict)
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    _recent: dict[str, deque[str]] = field(default_factory=dict)

    # -- connection ----------------------------------------------------------------

    async def connect(self, deadline: float) -> None:
        """Connect (rotating through gateways) and join or catch up on every chat."""
        while True:
            url = self.urls[self.url_index % len(self.urls)]
            try:
                self.ws = await self.session.ws_connect(url + "ws", heartbeat=None)
                break
            except (aiohttp.ClientError, OSError):
                if time.monotonic() > deadline:
                    raise
                self.url_index += 1
                await asyncio.sleep(0.2)
        reader = asyncio.create_task(self._read(self.ws))
        try:
            for chat in self.chats:
                await self._catch_up(chat)
        except Exception:
            reader.cancel()
            raise
        self._connected.set()
        self._reader = reader
        # Everything not acknowledged goes again, with its client_msg_id.
        for sent in list(self.unacked.values()):
            await self._send(sent)

    async def _request(self, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        rid = f"{self.name}-q{next(self._rids)}"
        body["request_id"] = rid
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        assert self.ws is not None
        await self.ws.send_str(orjson.dumps(body).decode())
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(rid, None)

    async def _catch_up(self, chat: str) -> None:
        """First join: note the head. Later: fetch everything after the last id seen."""
        self._recovering[chat] = []
        try:
            if chat not in self.max_seen:
                reply = await self._request(
                    {
                        "chat_id": chat,
                        "token": self.token,
                        "event_type": "get_history",
                        "message": {"limit": 1},
                    }
                )
                assert reply["type"] == "success", reply
                head = int(reply["messages"][-1]["id"]) if reply["messages"] else 0
                self.max_seen[chat] = head
                self.joined_at[chat] = head
                self.received[chat] = set()
            else:
                while True:
                    reply = await self._request(
                        {
                            "chat_id": chat,
                            "token": self.token,
                            "event_type": "get_history",
                            "message": {"after_id": str(self.max_seen[chat]), "limit": 200},
                        }
                    )
                    if reply["type"] != "success":
                        raise ConnectionError(f"catch-up failed: {reply}")
                    for message in reply["messages"]:
                        self._record(chat, int(message["id"]), "history")
                    if len(reply["messages"]) < 200:
                        break
        finally:
            for seq in self._recovering.pop(chat, []):
                self._record(chat, seq, "push")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = orjson.loads(msg.data)
            rid = frame.get("request_id")
            if rid is not None:
                if rid in self._waiting:
                    self._waiting[rid].set_result(frame)
                elif rid in self._inflight:
                    self._on_reply(self._inflight.pop(rid), frame)
                continue
            if frame.get("type") != "success" or not frame.get("messages"):
                self.violations.append(f"unexpected frame {frame}")
                continue
            message = frame["messages"][0]
            chat, seq = message["chat_id"], int(message["id"])
            self.pushes += 1
            if message["is_my"] != (message["user_id"] == self.user_id):
                self.violations.append(f"is_my wrong on {chat}/{seq}")
            if chat in self._recovering:
                self._recovering[chat].append(seq)
            else:
                self._record(chat, seq, "push")
        self._connected.clear()

    def _record(self, chat: str, seq: int, how: str) -> None:
        if chat not in self.received:
            self.violations.append(f"{how} for a chat never joined: {chat}/{seq}")
            return
        recent = self._recent.setdefault(chat, deque(maxlen=8))
        recent.append(f"{how}:{seq}")
        if seq <= self.max_seen[chat]:
            if how != "ack":
                self.violations.append(
                    f"{how} {chat}/{seq} after {self.max_seen[chat]} (dup or reorder); "
                    f"last frames {list(recent)}"
                )
        else:
            self.max_seen[chat] = seq
        self.received[chat].add(seq)

    # -- sending -------------------------------------------------------------------

    async def _send(self, sent: Sent) -> None:
        if self.ws is None or self.ws.closed:
            return  # resent after the reconnect
        rid = f"{self.name}-s{next(self._rids)}"
        sent.attempts += 1
        self._inflight[rid] = sent
        body = {
            "chat_id": sent.chat,
            "token": self.token,
            "event_type": "send_message",
            "message": {
                "type": "text",
                "text": f"{sent.cmid} from {self.name}",
                "client_msg_id": sent.cmid,
            },
            "request_id": rid,
        }
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            await self.ws.send_str(orjson.dumps(body).decode())

    def _on_reply(self, sent: Sent, frame: dict[str, Any]) -> None:
        if frame["type"] == "success":
            message = frame["messages"][0]
            if message.get("client_msg_id") != sent.cmid or not message["is_my"]:
                self.violations.append(f"reply for {sent.cmid} carries {message}")
            seq = int(message["id"])
            if sent.acked_id is not None and sent.acked_id != seq:
                self.violations.append(f"{sent.cmid} acked as {sent.acked_id} and {seq}")
            if sent.acked_id is None:
                sent.acked_id = seq
                sent.acked_at = time.monotonic()
            self.unacked.pop(sent.cmid, None)
            self._record(sent.chat, seq, "ack")
            return
        if frame["type"] != "server_error":
            self.violations.append(f"{sent.cmid}: unexpected {frame['type']}: {frame['detail']}")
        # Timed out or refused: the documented answer is a retry with the same id.
        asyncio.get_running_loop().call_later(
            RETRY_DELAY, lambda: asyncio.ensure_future(self._retry(sent))
        )

    async def _retry(self, sent: Sent) -> None:
        if sent.cmid in self.unacked:
            await self._send(sent)

    async def run(self, stop: asyncio.Event, deadline: float) -> None:
        """Send until ``stop``; reconnect whenever the socket drops."""
        counter = itertools.count(1)
        chat_cycle = itertools.cycle(self.chats)
        next_send = time.monotonic()
        while not stop.is_set():
            if self.ws is None or self.ws.closed:
                self._connected.clear()
                self._inflight.clear()
                self.reconnects += 1
                self.url_index += 1
                await self.connect(deadline)
                continue
            now = time.monotonic()
            if now < next_send:
                await asyncio.sleep(next_send - now)
                continue
            next_send += self.interval
            sent = Sent(f"{self.name}-{next(counter)}", next(chat_cycle), now)
            self.sent.append(sent)
            self.unacked[sent.cmid] = sent
            await self._send(sent)

    async def settle(self, deadline: float) -> None:
        """After sending stopped: keep reconnecting and retrying until all is acknowledged."""
        while self.unacked and time.monotonic() < deadline:
            if self.ws is None or self.ws.closed:
                self._inflight.clear()
                self.reconnects += 1
                self.url_index += 1
                await self.connect(deadline)
            await asyncio.sleep(0.1)
        # In-flight sends that were lost with a socket are resent by connect(); the
        # rest are retried on their error replies. What is still unacked here is a bug.

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


@dataclass
class Ledger:
    """The counts a scenario checked."""

    sent: int
    acknowledged: int
    stored: int
    delivered: int
    expected_deliveries: int
    reconnects: int
    max_ack_seconds: float


async def wait_delivered(clients: list[TrafficClient], store: Store, deadline: float) -> None:
    """Wait until every client has every stored message of its chats (or the deadline)."""
    while time.monotonic() < deadline:
        stored = await stored_ids(store, {c for client in clients for c in client.chats})
        if all(
            client.received[chat] >= {s for s in stored[chat] if s > client.joined_at[chat]}
            for client in clients
            for chat in client.chats
        ):
            return
        await asyncio.sleep(0.2)


async def stored_ids(store: Store, chats: set[str]) -> dict[str, set[int]]:
    """Ids stored per chat."""
    result: dict[str, set[int]] = {chat: set() for chat in chats}
    async for doc in store.messages.find(
        {"chat_id": {"$in": list(chats)}}, {"chat_id": 1, "seq": 1}
    ):
        result[doc["chat_id"]].add(doc["seq"])
    return result


async def verify(clients: list[TrafficClient], store: Store) -> Ledger:
    """Check the ledger against MongoDB; raise AssertionError listing every problem."""
    problems: list[str] = []
    chats = {chat for client in clients for chat in client.chats}
    docs_by_chat: dict[str, list[dict[str, Any]]] = {chat: [] for chat in chats}
    async for doc in store.messages.find({"chat_id": {"$in": list(chats)}}).sort("seq", 1):
        docs_by_chat[doc["chat_id"]].append(doc)
    by_cmid: dict[str, dict[str, Any]] = {}
    for chat, docs in docs_by_chat.items():
        seqs = [d["seq"] for d in docs]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"chat {chat}: ids not 1..n in storage order: {seqs[:20]}...")
        for doc in docs:
            cmid = doc.get("client_msg_id")
            if cmid in by_cmid:
                problems.append(f"client_msg_id {cmid} stored twice")
            by_cmid[cmid] = doc
    sent = [s for client in clients for s in client.sent]
    acked = [s for s in sent if s.acked_id is not None]
    for s in sent:
        doc = by_cmid.get(s.cmid)
        if s.acked_id is not None and (
            doc is None or doc["seq"] != s.acked_id or doc["chat_id"] != s.chat
        ):
            problems.append(
                f"acknowledged {s.cmid} as {s.chat}/{s.acked_id} but stored {doc and (doc['chat_id'], doc['seq'])}"
            )
        if s.acked_id is None:
            problems.append(f"{s.cmid} never acknowledged")
    known = {s.cmid for s in sent}
    problems.extend(f"stored message nobody sent: {c}" for c in by_cmid if c not in known)
    delivered = expected = 0
    for client in clients:
        problems.extend(f"{client.name}: {v}" for v in client.violations[:20])
        for chat in client.chats:
            want = {d["seq"] for d in docs_by_chat[chat] if d["seq"] > client.joined_at[chat]}
            got = client.received[chat]
            expected += len(want)
            delivered += len(want & got)
            missing = sorted(want - got)
            if missing:
                detail = [
                    (d["seq"], d["user_id"], d.get("client_msg_id"))
                    for d in docs_by_chat[chat]
                    if d["seq"] in missing[:5]
                ]
                problems.append(
                    f"{client.name} ({client.user_id}) missed {chat} ids {missing[:20]} "
                    f"({len(missing)}); max seen {client.max_seen[chat]}; stored as {detail}; "
                    f"received {sorted(got)[-5:]}"
                )
    ack_times = [s.acked_at - s.first_sent for s in acked if s.acked_at is not None]
    ledger = Ledger(
        sent=len(sent),
        acknowledged=len(acked),
        stored=sum(len(d) for d in docs_by_chat.values()),
        delivered=delivered,
        expected_deliveries=expected,
        reconnects=sum(c.reconnects for c in clients),
        max_ack_seconds=round(max(ack_times, default=0.0), 3),
    )
    assert not problems, f"{ledger}\n" + "\n".join(problems[:60])
    return ledger
