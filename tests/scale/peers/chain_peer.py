"""The agreed architecture's hops and nothing else: the floor under ours on this machine.

Gateways (K processes) take ``send_message`` frames and XADD them to partition streams
through ours' batching producer (gateway.producer). One worker reads every stream in a
consumer group, gives each message its chat's next id, inserts the batch into MongoDB
with ours' indexes and write concern (journaled) over ours' lean connection
(worker.wire), then PUBLISHes one frame per message on the chat's channel and XACKs the
batch. Every gateway with a socket in the chat gets that frame: the sender's gateway
writes the reply, and each gateway pushes to its other members.

Left out is all that ours does beyond those hops: tokens, membership, grants and gap
fill, idempotent retries, history, limits, metrics, the drain and fail-over. A send
makes the same hops as in ours (gateway, Redis, worker, MongoDB, Redis, gateway), with
one PUBLISH where ours makes two (the reply to the sender's node, the push to the chat).
So under the same load, what this takes is the price of the hops, and what ours takes
beyond it is the price of the rest. The first request on a chat (``get_history``)
subscribes the gateway to the chat's channel and joins the socket, with an empty page.

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
from shared.codec import STREAM_FIELD
from shared.keys import partition_of
from shared.protocol import message_view
from shared.resp import RespConnection, RespError
from shared.runtime import settle_gc
from tests.scale.peers import serve
from tests.scale.peers.frames import error, reply
from worker.store import Store, client_options
from worker.wire import WireClient

GROUP = "chain"
PARTITIONS = int(os.environ.get("PARTITIONS", "16"))
STREAMS = [f"chain:s:{p}" for p in range(PARTITIONS)]
READ_COUNT = 500


def chat_channel(chat: str) -> str:
    return f"chain:c:{chat}"


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

    async def join(self, chat: str, transport: asyncio.Transport) -> None:
        confirmed = self.subscribed.get(chat)
        if confirmed is None:
            assert self.sub is not None
            confirmed = self.subscribed[chat] = asyncio.get_running_loop().create_future()
            self.sub.send(("SUBSCRIBE", chat_channel(chat)))
        await confirmed
        self.rooms.setdefault(chat, set()).add(transport)

    def submit(self, transport: asyncio.Transport, req: dict[str, Any], chat: str) -> bool:
        number = next(self.numbers)
        body = req.get("message") or {}
        payload = orjson.dumps(
            [
                self.node,
                number,
                req.get("request_id"),
                chat,
                body.get("text"),
                body.get("client_msg_id"),
                f"anon-{id(transport):x}",
            ]
        )
        if not self.producer.submit(STREAMS[partition_of(chat, PARTITIONS)], payload):
            return False
        self.pending[number] = transport
        return True

    async def listen(self) -> None:
        assert self.sub is not None
        prefix = len("chain:c:")
        while True:
            for item in await self.sub.read_burst():
                kind = item[0]
                if kind == b"message":
                    self.deliver(item[1][prefix:].decode(), item[2])
                elif kind == b"subscribe":
                    confirmed = self.subscribed.get(item[1][prefix:].decode())
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)

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
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                req = orjson.loads(msg.data)
                event = req["event_type"]
                chat = str(req["chat_id"])
            except (ValueError, KeyError, TypeError):
                await ws.send_frame(
                    orjson.dumps(error("bad_request", "bad frame", None, None)), WSMsgType.TEXT
                )
                continue
            rid = req.get("request_id")
            if event == "get_history":
                if chat not in joined:
                    await gw.join(chat, transport)
                    joined.add(chat)
                await ws.send_frame(orjson.dumps(reply(event, [], rid)), WSMsgType.TEXT)
            elif event == "send_message" and chat in joined:
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
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == STREAM_FIELD:
            return list(orjson.loads(fields[i + 1]))
    raise ValueError("entry without a payload")


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
        docs: list[dict[str, Any]] = []
        publish: list[tuple[Any, ...]] = []
        acks: list[tuple[Any, ...]] = []
        now = int(time.time())
        for stream, entries in streams:
            partition = stream.rsplit(b":", 1)[1].decode()
            for entry_id, fields in entries:
                node, number, rid, chat, text, key, user = decode_entry(fields)
                seq = last.get(chat, 0) + 1
                last[chat] = seq
                doc: dict[str, Any] = {
                    "_id": f"{partition}-{entry_id.decode()}",  # as ours' event ids
                    "chat_id": chat,
                    "seq": seq,
                    "user_id": user,
                    "username": user,
                    "avatar": None,
                    "type": "text",
                    "text": text,
                    "file_url": None,
                    "created_at": now,
                }
                if key is not None:
                    doc["client_msg_id"] = key
                docs.append(doc)
                mine = orjson.dumps(reply("send_message", [message_view(doc, True)], rid))
                push = orjson.dumps(reply("send_message", [message_view(doc, False)], None))
                publish.append(
                    ("PUBLISH", chat_channel(chat), join_published(node, number, mine, push))
                )
            acks.append(("XACK", stream, GROUP, *(entry_id for entry_id, _ in entries)))
        await store.insert_messages(docs)
        await out.execute(publish + acks)


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
