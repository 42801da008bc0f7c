"""python-socketio ``AsyncServer`` with ``AsyncRedisManager`` behind aiohttp.

K of these processes share one Redis (the manager's pub/sub channel) so a room spans
processes. Events: ``get_history`` joins the chat's room and acks; ``send_message``
emits ``message`` (a push in the gateway's shape) to the room, skipping the sender, then
acks with the reply frame. No id is assigned, nothing is persisted, no token is checked.

Run: ``REDIS_URL=redis://127.0.0.1:6379/0 PORT=8600 python -m tests.scale.peers.socketio_peer``.
"""

from __future__ import annotations

import os
from typing import Any

import socketio
from aiohttp import web

from tests.scale.peers import serve
from tests.scale.peers.frames import message, reply


def build() -> web.Application:
    manager = socketio.AsyncRedisManager(os.environ["REDIS_URL"])
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=manager,
        cors_allowed_origins="*",
        logger=False,
        engineio_logger=False,
    )

    @sio.on("get_history")
    async def get_history(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        await sio.enter_room(sid, str(data["chat_id"]))
        return reply("get_history", [], data.get("request_id"))

    @sio.on("send_message")
    async def send_message(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        chat = str(data["chat_id"])
        if chat not in sio.rooms(sid):
            await sio.enter_room(sid, chat)
        m = message(data, chat, None, sid)
        mine = reply("send_message", [m], data.get("request_id"))
        push_m = dict(m, is_my=False)
        await sio.emit("message", reply("send_message", [push_m], None), room=chat, skip_sid=sid)
        return mine

    app = web.Application()

    async def readyz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/readyz", readyz)
    sio.attach(app)
    return app


def main() -> None:
    serve.run(build())


if __name__ == "__main__":
    main()
