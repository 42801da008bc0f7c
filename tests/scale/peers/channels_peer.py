"""Django Channels consumer + channels_redis, served by uvicorn (one process each).

Speaks the gateway's frames on ``/ws``. The first request on a chat adds the consumer
to the chat's group; ``send_message`` does ``group_send`` and replies to the sender;
each member's consumer forwards the push unless it is the sender. No id is assigned,
nothing is persisted, no token is checked.

Run: ``REDIS_URL=... python -m uvicorn tests.scale.peers.channels_peer:application
--host 127.0.0.1 --port 8700 --lifespan off``.
"""

from __future__ import annotations

import json
import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.scale.peers.channels_settings")

import django

django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from tests.scale.peers.frames import error, message, reply  # noqa: E402


def _group(chat: str) -> str:
    # Group names: ASCII letters, digits, hyphens, underscores and periods.
    return "chat." + "".join(c if c.isalnum() or c in "-_." else "_" for c in chat)[:90]


class ChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        self.groups_joined: set[str] = set()
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            req: dict[str, Any] = json.loads(text_data or bytes_data or b"")
            event = req["event_type"]
            chat = str(req["chat_id"])
        except (ValueError, KeyError, TypeError):
            await self.send(text_data=json.dumps(error("bad_request", "bad frame", None, None)))
            return
        rid = req.get("request_id")
        group = _group(chat)
        if group not in self.groups_joined:
            self.groups_joined.add(group)
            await self.channel_layer.group_add(group, self.channel_name)
        if event == "get_history":
            await self.send(text_data=json.dumps(reply(event, [], rid)))
        elif event == "send_message":
            m = message(req, chat, None, self.channel_name)
            mine = json.dumps(reply(event, [m], rid))
            m["is_my"] = False
            push = json.dumps(reply(event, [m], None))
            await self.channel_layer.group_send(
                group, {"type": "chat.message", "push": push, "sender": self.channel_name}
            )
            await self.send(text_data=mine)
        else:
            await self.send(text_data=json.dumps(error("event_not_found", "unknown", event, rid)))

    async def chat_message(self, event: dict[str, Any]) -> None:
        if event["sender"] != self.channel_name:
            await self.send(text_data=event["push"])


application = ProtocolTypeRouter({"websocket": URLRouter([path("ws", ChatConsumer.as_asgi())])})
