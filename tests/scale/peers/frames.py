"""Reply and push frames in the gateway's shapes, shared by the peers."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import WSMsgType, web


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def reply(
    event_type: str, messages: list[dict[str, Any]] | None, request_id: Any
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "success",
        "event_type": event_type,
        "messages": messages,
        "detail": "Success",
    }
    if request_id is not None:
        frame["request_id"] = request_id
    return frame


def error(kind: str, detail: str, event_type: Any, request_id: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": kind,
        "event_type": event_type,
        "messages": None,
        "detail": detail,
    }
    if request_id is not None:
        frame["request_id"] = request_id
    return frame


def message(req: dict[str, Any], chat_id: str, msg_id: str | None, user_id: str) -> dict[str, Any]:
    """The message as the sender sees it (``is_my`` true); pushes flip ``is_my``."""
    body = req.get("message") or {}
    out: dict[str, Any] = {
        "id": msg_id,
        "chat_id": chat_id,
        "user_id": user_id,
        "username": user_id,
        "avatar": None,
        "created_at": now_iso(),
        "type": "text",
        "text": body.get("text"),
        "file_url": None,
        "is_my": True,
    }
    if body.get("client_msg_id") is not None:
        out["client_msg_id"] = body["client_msg_id"]
    return out


async def requests(ws: web.WebSocketResponse) -> AsyncIterator[tuple[dict[str, Any], str, str]]:
    """Each text frame of ``ws`` as (request, event type, chat id); a frame that is not a
    request gets a ``bad_request`` reply here and is skipped."""
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
        yield req, event, chat
