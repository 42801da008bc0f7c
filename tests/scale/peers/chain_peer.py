"""The agreed architecture's hops and nothing else: the floor under ours on this machine.

Gateways (K processes) take ``send_message`` frames and XADD them to partition streams
through ours' batching producer (gateway.producer). One worker reads every stream in a
consumer group, gives each message its chat's next id, inserts the batch into MongoDB
with ours' indexes and write concern (journaled) over ours' lean connection
(shared.wire), then PUBLISHes one frame per message on the chat's channel and XACKs the
batch. Every gateway with a socket in the chat gets that frame: the sender's gateway
writes the reply, and each gateway pushes to its other members.

``get_history`` makes the same trip: the worker reads the page with ours' query over
ours' lean connection and PUBLISHes the reply on the asking gateway's channel. The first
request on a chat also subscribes the gateway to the chat's channel (before it is
forwarded) and joins the socket to the chat.

Left out is all that ours does beyond those hops: tokens, membership, grants and gap
fill, idempotent retries, limits, metrics, the drain and fail-over. A send makes the
same hops as in ours (gateway, Redis, worker, MongoDB, Redis, gateway), with one PUBLISH
that carries both the reply and the push, as ours does since its sixteenth benchmark
round (before, ours PUBLISHed the reply on the sender's node channel apart). So under
the same load, what this takes is the price of the hops, and what ours takes beyond it
is the price of the rest.

Run: ``ROLE=gateway|worker REDIS_URL=... MONGO_URL=... PORT=... PARTITIONS=16
python -m tests.scale.peers.chain_peer`` (one worker: ids are counted in its memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from pymongo import AsyncMongoClient

from gateway.connection import text_frame
from gateway.producer import StreamProducer
from shared.codec import entry_payload, event_id
from shared.keys import partition_of
from shared.mongo import client_options
from shared.protocol import message_view
from shared.resp import RespConnection, RespError
from shared.runtime import settle_gc
from shared.wire import WireClient
from tests.scale.peers import serve
from tests.scale.peers.frames import error, reply, requests
from worker.store import Store

GROUP = "chain"
PARTITIONS = int(os.environ.get("PARTITIONS", "16"))
STREAMS = [f"chain:s:{p}" for p in range(PARTITIONS)]
READ_COUNT = 500


def chat_channel(chat: str) -> str:
    return f"chain:c:{chat}"


def node_channel(node: str) -> str:
    return f"chain:g:{node}"


def split_published(data: bytes) -> tuple[str, int, bytes, bytes]:
    """(node, request number, reply frame, push frame) of one published message."""
    head, mine, push = data.split(b"\n", 2)
    node, number = head.split(b" ")
    return node.decode(), int(number), mine, push


def join_published(node: str, number: int, mine: bytes, push: bytes) -> bytes:
    # orjson escapes newlines inside strings, so a raw one only ever separates the parts.
    return b"%s %d\n%s\n%s" % (node.encode(), number, mine, push)


# --------------------------------------------------------------------------- gateway


class Gateway:
    """Sockets, the chats they joined, and the sends waiting for their reply."""

    def __init__(self, redis_url: str, node: str) -> None:
        self.redis_url = redis_url
        self.node = node
        self.producer = StreamProducer(
            redis_url,
            name=f"{node}-xadd",
            batch=READ_COUNT,
            max_buffered=20_000,
            maxlen=1_000_000,
            expire_after=10.0,
        )
        self.rooms: dict[str, set[asyncio.Transport]] = {}
        self.pending: dict[int, asyncio.Transport] = {}
        self.numbers = itertools.count(1)
        self.sub: RespConnection | None = None
        self.subscribed: dict[str, asyncio.Future[None]] = {}

    async def subscribe(self, channel: str) -> None:
        confirmed = self.subscribed.get(channel)
        if confirmed is None:
            assert self.sub is not None
            confirmed = self.subscribed[channel] = asyncio.get_running_loop().create_future()
            self.sub.send(("SUBSCRIBE", channel))
        await confirmed

    async def join(self, chat: str, transport: asyncio.Transport) -> None:
        await self.subscribe(chat_channel(chat))
        self.rooms.setdefault(chat, set()).add(transport)

    def submit(self, transport: asyncio.Transport, req: dict[str, Any], chat: str) -> bool:
        """Forward a send or a history read; False when the producer's buffer is full."""
        number = next(self.numbers)
        body = req.get("message") or {}
        user = f"anon-{id(transport):x}"
        if req["event_type"] == "send_message":
            fields = [body.get("text"), body.get("client_msg_id")]
        else:
            before = body.get("before_id")
            fields = [int(before) if before is not None else None, body.get("limit") or 50]
        payload = orjson.dumps(
            [req["event_type"], self.node, number, req.get("request_id"), chat, user, *fields]
        )
        if not self.producer.submit(STREAMS[partition_of(chat, PARTITIONS)], payload):
            return False
        self.pending[number] = transport
        return True

    async def listen(self) -> None:
        assert self.sub is not None
        prefix = len("chain:c:")
        mine = node_channel(self.node).encode()
        while True:
            for item in await self.sub.read_burst():
                kind = item[0]
                if kind == b"message":
                    if item[1] == mine:
                        self.answer(item[2])
                    else:
                        self.deliver(item[1][prefix:].decode(), item[2])
                elif kind == b"subscribe":
                    confirmed = self.subscribed.get(item[1].decode())
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)

    def answer(self, data: bytes) -> None:
        number, _, frame = data.partition(b"\n")
        asker = self.pending.pop(int(number), None)
        if asker is not None and not asker.is_closing():
            asker.write(text_frame(frame))

    def deliver(self, chat: str, data: bytes) -> None:
        node, number, mine, push = split_published(data)
        sender = self.pending.pop(number, None) if node == self.node else None
        if sender is not None and not sender.is_closing():
            sender.write(text_frame(mine))
        frame = text_frame(push)
        for transport in self.rooms.get(chat, ()):
            if transport is not sender and not transport.is_closing():
                transport.write(frame)

    def leave(self, transport: asyncio.Transport, chats: set[str]) -> None:
        for chat in chats:
            members = self.rooms.get(chat)
            if members is not None:
                members.discard(transport)


GATEWAY = web.AppKey("chain_gateway", Gateway)


async def gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    gw.sub = await RespConnection.open(gw.redis_url, name=f"{gw.node}-sub")
    tasks = [asyncio.create_task(gw.producer.run()), asyncio.create_task(gw.listen())]
    await gw.subscribe(node_channel(gw.node))
    settle_gc()
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    gw.sub.close()


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    gw = request.app[GATEWAY]
    ws = web.WebSocketResponse(max_msg_size=65_536, compress=False, heartbeat=30.0)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    joined: set[str] = set()
    try:
        async for req, event, chat in requests(ws):
            rid = req.get("request_id")
            if event == "get_history" and chat not in joined:
                await gw.join(chat, transport)
                joined.add(chat)
            if event in ("get_history", "send_message") and chat in joined:
                if not gw.submit(transport, req, chat):
                    await ws.send_frame(
                        orjson.dumps(error("server_error", "busy", event, rid)), WSMsgType.TEXT
                    )
            else:
                await ws.send_frame(
                    orjson.dumps(error("event_not_found", "unknown event", event, rid)),
                    WSMsgType.TEXT,
                )
    finally:
        gw.leave(transport, joined)
    return ws


async def readyz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def gateway_app() -> web.Application:
    app = web.Application()
    app[GATEWAY] = Gateway(os.environ["REDIS_URL"], os.environ.get("NODE_ID", "chain-gw"))
    app.cleanup_ctx.append(gateway_ctx)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/readyz", readyz)
    return app


# --------------------------------------------------------------------------- worker


def decode_entry(fields: list[bytes]) -> list[Any]:
    payload = entry_payload(fields)
    if payload is None:
        raise ValueError("entry without a payload")
    return list(orjson.loads(payload))


class Batch:
    """One batch's MongoDB work and what to PUBLISH after it, in stream order.

    As in ours, consecutive reads run together, and a send is stored before any read
    that follows it: a page never misses a message acknowledged before it was asked for.
    """

    def __init__(self, store: Store, last: dict[str, int]) -> None:
        self.store = store
        self.last = last
        self.docs: list[dict[str, Any]] = []
        # (place in ``publish``, node, request number, request id, chat, user, before, limit)
        self.reads: list[tuple[int, str, int, Any, str, str, int | None, int]] = []
        self.publish: list[tuple[Any, ...]] = []

    async def add(self, event_id: str, entry: list[Any]) -> None:
        """Take one entry in stream order (awaiting only when MongoDB must be asked)."""
        chat = entry[4]
        if entry[0] == "send_message":
            if self.reads:
                await self.flush_reads()
        elif self.docs:
            await self.flush_docs()
        if chat not in self.last:
            # As ours, a chat's last id is read once, by its first request (in the load's
            # set-up, a join): it may have been written before this worker started.
            self.last[chat] = (await self.store.last_seqs([chat]))[chat]
        if entry[0] == "send_message":
            self.send(event_id, entry)
        else:
            self.read(entry)

    def send(self, event_id: str, entry: list[Any]) -> None:
        _, node, number, rid, chat, user, text, key = entry
        seq = self.last[chat] + 1
        self.last[chat] = seq
        doc: dict[str, Any] = {
            "_id": event_id,
            "chat_id": chat,
            "seq": seq,
            "user_id": user,
            "username": user,
            "avatar": None,
            "type": "text",
            "text": text,
            "file_url": None,
            "created_at": int(time.time()),
        }
        if key is not None:
            doc["client_msg_id"] = key
        self.docs.append(doc)
        mine = orjson.dumps(reply("send_message", [message_view(doc, True)], rid))
        push = orjson.dumps(reply("send_message", [message_view(doc, False)], None))
        self.publish.append(
            ("PUBLISH", chat_channel(chat), join_published(node, number, mine, push))
        )

    def read(self, entry: list[Any]) -> None:
        _, node, number, rid, chat, user, before, limit = entry
        self.reads.append((len(self.publish), node, number, rid, chat, user, before, limit))
        self.publish.append(())  # its place in the order, filled by flush_reads

    async def flush_docs(self) -> None:
        if self.docs:
            await self.store.insert_messages(self.docs)
            self.docs = []

    async def flush_reads(self) -> None:
        if not self.reads:
            return
        reads, self.reads = self.reads, []
        calls = [
            self.store.history(chat, limit=limit, before=before)
            for _, _, _, _, chat, _, before, limit in reads
        ]
        # As ours: a single read is awaited without a Task.
        pages = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        for (slot, node, number, rid, _, user, _, _), page in zip(reads, pages, strict=True):
            views = [message_view(doc, doc["user_id"] == user) for doc in page]
            frame = orjson.dumps(reply("get_history", views, rid))
            self.publish[slot] = ("PUBLISH", node_channel(node), b"%d\n%s" % (number, frame))

    async def finish(self) -> list[tuple[Any, ...]]:
        await self.flush_docs()
        await self.flush_reads()
        return self.publish


async def work(redis_url: str, mongo_url: str) -> None:
    """Read, store, publish, ack: one batch at a time, until cancelled."""
    read = await RespConnection.open(redis_url, name="chain-worker-read")
    out = await RespConnection.open(redis_url, name="chain-worker-out")
    for stream in STREAMS:
        with contextlib.suppress(RespError):  # BUSYGROUP: made by an earlier start
            await read.execute([("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")])
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, **client_options(mongo_url)
    )
    db = client.get_default_database()
    store = Store(db, WireClient(client, mongo_url, db.name))
    await store.ensure_indexes()
    last: dict[str, int] = {}
    command = (
        "XREADGROUP", "GROUP", GROUP, "worker", "COUNT", str(READ_COUNT), "BLOCK", "1000",
        "STREAMS", *STREAMS, *([">"] * len(STREAMS)),
    )  # fmt: skip
    settle_gc()
    while True:
        streams = (await read.execute([command]))[0]
        if not streams:
            continue
        batch = Batch(store, last)
        acks: list[tuple[Any, ...]] = []
        for stream, entries in streams:
            partition = int(stream.rsplit(b":", 1)[1])
            for entry_id, fields in entries:
                # The event id as ours makes it: partition and entry id.
                await batch.add(event_id(partition, entry_id.decode()), decode_entry(fields))
            acks.append(("XACK", stream, GROUP, *(entry_id for entry_id, _ in entries)))
        await out.execute([*await batch.finish(), *acks])


async def worker_main() -> None:
    await work(os.environ["REDIS_URL"], os.environ["MONGO_URL"])


def main() -> None:
    if os.environ.get("ROLE") == "worker":
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker_main())
    else:
        serve.run(gateway_app())


if __name__ == "__main__":
    main()
