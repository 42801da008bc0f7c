"""The gateway's aiohttp application: ``create_app(settings)``.

Routes: WebSocket on ``/`` and ``/ws``; the web client on a plain ``GET /`` and
``/demo``; ``/healthz``, ``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler
from redis.asyncio import Redis

from shared import protocol
from shared.config import Settings
from shared.metrics import CONTENT_TYPE, GatewayMetrics, prime_gateway, render
from shared.redis_client import create_redis

from .connection import Connection
from .drain import Drain
from .hub import Hub
from .producer import StreamProducer
from .subscriber import Subscriber

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", GatewayMetrics)
REDIS = web.AppKey("redis", Redis)
HUB = web.AppKey("hub", Hub)
BACKGROUND = web.AppKey("background", list[asyncio.Task[None]])
DRAIN = web.AppKey("drain", Drain)

BAD_BINARY = protocol.ProtocolError(
    protocol.BAD_REQUEST, "Binary frames are not supported: send JSON in text frames"
).to_frame()


def create_app(settings: Settings) -> web.Application:
    """Build the gateway application; resources start and stop with it."""
    app = web.Application(middlewares=[_refuse_upgrades_while_draining])
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics()
    prime_gateway(app[METRICS])
    app[DRAIN] = Drain(settings, app[METRICS])
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_hub_ctx)
    app.router.add_get("/", root)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/demo", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if STATIC_DIR.is_dir():
        app.router.add_static("/static/", STATIC_DIR, append_version=False)
    return app


@web.middleware
async def _refuse_upgrades_while_draining(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    # A draining gateway answers upgrades 503 (nginx then tries another gateway at once
    # and benches this one) instead of accepting a socket it is about to close.
    if request.app[DRAIN].draining and request.headers.get("Upgrade", "").lower() == "websocket":
        raise web.HTTPServiceUnavailable(
            text="draining: connect to another gateway", headers={"Retry-After": "1"}
        )
    return await handler(request)


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[REDIS] = create_redis(settings.redis_url, name=f"gateway:{settings.node_id}")
    yield
    await app[REDIS].aclose()


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    producer = StreamProducer(
        settings.redis_url,
        name=f"gateway-xadd:{settings.node_id}",
        batch=settings.xadd_batch,
        max_buffered=settings.xadd_batch * 64,
        maxlen=settings.stream_maxlen,
        expire_after=settings.request_timeout,
        backoff_cap=settings.retry_backoff_max,
    )

    def subscriber_for(hub: Hub) -> Subscriber:
        return Subscriber(
            settings.redis_url,
            hub.keys.node_channel(settings.node_id),
            hub.on_message,
            hub.on_resubscribed,
            lambda: metrics.redis_reconnects.labels("gateway_pubsub").inc(),
            backoff_cap=settings.retry_backoff_max,
            name=f"gateway-pubsub:{settings.node_id}",
        )

    hub = Hub(settings, producer, metrics, subscriber_for)
    app[HUB] = hub
    tasks = [
        asyncio.create_task(producer.run(), name="xadd-producer"),
        asyncio.create_task(hub.subscriber.run(), name="pubsub"),
    ]
    app[BACKGROUND] = tasks
    log.info("gateway started", extra={"node": settings.node_id})
    yield
    for conn in list(hub.connections.values()):
        await conn.close(1001, "server shutting down")
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def root(request: web.Request) -> web.StreamResponse:
    """``/``: WebSocket when the client asks for an upgrade (seed clients), else the web client."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await websocket(request)
    return await index(request)


async def index(request: web.Request) -> web.StreamResponse:
    """The single-page web client."""
    page = STATIC_DIR / "index.html"
    if not page.exists():
        raise web.HTTPNotFound(text="web client not installed")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def websocket(request: web.Request) -> web.StreamResponse:
    """One client socket: read frames, validate, forward; replies arrive through the hub."""
    app = request.app
    settings = app[SETTINGS]
    hub = app[HUB]
    metrics = app[METRICS]
    ws = web.WebSocketResponse(
        heartbeat=settings.heartbeat_seconds,
        max_msg_size=settings.max_frame_bytes,
        compress=settings.websocket_compression,
    )
    await ws.prepare(request)
    conn = Connection(
        hub.new_connection_id(),
        ws,
        request.transport,
        request.remote or "-",
        max_messages=settings.send_queue_max_messages,
        max_bytes=settings.send_queue_max_bytes,
        on_slow=lambda c: _slow_consumer(c, metrics),
    )
    hub.add(conn)
    metrics.connections_opened.inc()
    limits = hub.limits
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                received = time.monotonic()
                try:
                    req = protocol.parse_request(msg.data, limits)
                except protocol.ProtocolError as exc:
                    metrics.frames_in.labels("invalid").inc()
                    hub.reply_now(conn, exc.to_frame(), exc.reply_type)
                    continue
                metrics.frames_in.labels(req.event_type).inc()
                await hub.submit(conn, req, received)
            elif msg.type == WSMsgType.BINARY:
                metrics.frames_in.labels("binary").inc()
                hub.reply_now(conn, BAD_BINARY, protocol.BAD_REQUEST)
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        hub.remove(conn)
        metrics.connections_closed.labels(str(ws.close_code or 1006)).inc()
    return ws


def _slow_consumer(conn: Connection, metrics: GatewayMetrics) -> None:
    if conn.closed:
        return
    conn.closed = True
    metrics.send_queue_drops.inc()
    metrics.slow_consumer_disconnects.inc()
    log.info("closing slow consumer", extra={"conn": conn.conn_id, "peer": conn.peer})
    asyncio.get_running_loop().create_task(_close_slow(conn), name=f"close-slow-{conn.conn_id}")


async def _close_slow(conn: Connection) -> None:
    # The socket's queue is full, so a polite close frame may never get through:
    # give it a moment, then drop the transport.
    await conn.close(1008, "slow consumer: send queue full")
    if conn.transport is not None and not conn.transport.is_closing():
        conn.transport.abort()


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers HTTP."""
    return web.json_response({"status": "ok", "node": request.app[SETTINGS].node_id})


def is_ready(app: web.Application) -> tuple[bool, dict[str, bool]]:
    """Ready to serve sockets: Redis takes requests, the subscriptions are live, not draining."""
    hub = app[HUB]
    checks = {
        "pubsub": hub.subscriber.live,
        "redis_writes": hub.producer.healthy,
        "not_draining": not app[DRAIN].draining,
    }
    return all(checks.values()), checks


async def readyz(request: web.Request) -> web.Response:
    """Ready (200) or not (503), with the checks that decided it."""
    ready, checks = is_ready(request.app)
    request.app[METRICS].ready.set(1 if ready else 0)
    return web.json_response(
        {"ready": ready, "checks": checks, "node": request.app[SETTINGS].node_id},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    app = request.app
    app[METRICS].ready.set(1 if is_ready(app)[0] else 0)
    return web.Response(body=render(app[METRICS].registry), headers={"Content-Type": CONTENT_TYPE})
