"""The Python ceiling: one aiohttp process, rooms in memory, orjson, no Redis, no DB.

Speaks the gateway's frames on ``/ws``. The first request on a chat joins its room;
``send_message`` gives the message the room's next id, pushes it to every other member
and replies to the sender. Nothing is persisted and tokens are not checked.

Run: ``HOST=127.0.0.1 PORT=8500 python -m tests.scale.peers.aiohttp_peer``.
"""

from __future__ import annotations

import contextlib

import orjson
from aiohttp import WSMsgType, web

from tests.scale.peers import serve
from tests.scale.peers.frames import error, message, reply, requests

ROOMS: dict[str, set[web.WebSocketResponse]] = {}
SEQ: dict[str, int] = {}


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=65_536, compress=False, heartbeat=30.0)
    await ws.prepare(request)
    joined: set[str] = set()
    user = f"anon-{id(ws):x}"
    try:
        async for req, event, chat in requests(ws):
            rid = req.get("request_id")
            if chat not in joined:
                joined.add(chat)
                ROOMS.setdefault(chat, set()).add(ws)
            if event == "get_history":
                await ws.send_frame(orjson.dumps(reply(event, [], rid)), WSMsgType.TEXT)
            elif event == "send_message":
                seq = SEQ.get(chat, 0) + 1
                SEQ[chat] = seq
                m = message(req, chat, str(seq), user)
                mine = orjson.dumps(reply(event, [m], rid))
                m["is_my"] = False
                push = orjson.dumps(reply(event, [m], None))
                for peer in tuple(ROOMS.get(chat, ())):
                    if peer is not ws and not peer.closed:
                        with contextlib.suppress(ConnectionError, RuntimeError):
                            await peer.send_frame(push, WSMsgType.TEXT)
                await ws.send_frame(mine, WSMsgType.TEXT)
            else:
                await ws.send_frame(
                    orjson.dumps(error("event_not_found", "unknown event", event, rid)),
                    WSMsgType.TEXT,
                )
    finally:
        for chat in joined:
            members = ROOMS.get(chat)
            if members is not None:
                members.discard(ws)
    return ws


async def readyz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/readyz", readyz)
    serve.run(app)


if __name__ == "__main__":
    main()
