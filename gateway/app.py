"""The gateway's aiohttp application: ``create_app(settings)``.

Routes: WebSocket on ``/`` and ``/ws``; the web client on a plain ``GET /`` and
``/demo``; ``/healthz``, ``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import WebSocketError, WSMessage, WSMsgType, web
from pymongo import AsyncMongoClient

from shared import protocol
from shared.config import ConfigError, Settings
from shared.metrics import (
    CONTENT_TYPE,
    REDIS_COMPONENT_GATEWAY,
    GatewayMetrics,
    prime_gateway,
    render,
)
from shared.mongo import HistoryReader, create_client, wire_client
from shared.wire import Doc

from .connection import TRANSPORT_HIGH_WATER, Connection
from .drain import Drain
from .hub import Hub
from .limits import Guard, RateLimiter, Verdict, address_group
from .producer import StreamProducer
from .subscriber import Subscriber

log = logging.getLogger(__name__)

# Message types that end a socket's receive loop.
_ENDED = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})

STATIC_DIR = Path(__file__).parent / "static"

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", GatewayMetrics)
HUB = web.AppKey("hub", Hub)
BACKGROUND = web.AppKey("background", list[asyncio.Task[None]])
DRAIN = web.AppKey("drain", Drain)
GUARD = web.AppKey("guard", Guard)
LIMITS = web.AppKey("limits", protocol.Limits)
ON_SLOW = web.AppKey[Callable[[Connection], None]]("on_slow")
RATE_LIMITED_DETAIL = web.AppKey("rate_limited_detail", str)
HISTORY_READER = web.AppKey("history_reader", HistoryReader)

BINARY_ERROR = protocol.ProtocolError(
    protocol.BAD_REQUEST, "Binary frames are not supported: send JSON in text frames"
)
BAD_BINARY = BINARY_ERROR.to_frame()
CLOSE_RATE_LIMITED = 1008
_CLOSING: set[asyncio.Task[None]] = set()


def create_app(settings: Settings) -> web.Application:
    """Build the gateway application; resources start and stop with it."""
    app = web.Application()
    app[SETTINGS] = settings
    # Abuse settings are parsed here, so a bad TRUSTED_PROXIES, ALLOWED_ORIGINS or
    # FILE_URL_PREFIXES stops the gateway at start with the variable's name.
    app[GUARD] = Guard.from_settings(settings)
    try:
        prefixes = protocol.normalise_url_prefixes(settings.file_url_prefixes)
    except ValueError as exc:
        raise ConfigError(f"FILE_URL_PREFIXES: {exc}") from None
    app[LIMITS] = protocol.Limits(settings.max_text_length, prefixes)
    app[RATE_LIMITED_DETAIL] = (
        f"Too many requests: at most {settings.rate_limit_per_second:g} per second "
        f"(bursts of {settings.rate_limit_burst}); slow down and retry"
    )
    app[METRICS] = GatewayMetrics()
    # One slow-consumer handler per app, not a closure per socket.
    on_slow: Callable[[Connection], None] = functools.partial(_slow_consumer, metrics=app[METRICS])
    app[ON_SLOW] = on_slow
    prime_gateway(app[METRICS])
    app[DRAIN] = Drain(settings, app[METRICS])
    app.cleanup_ctx.append(_history_ctx)
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


async def _history_ctx(app: web.Application) -> AsyncIterator[None]:
    """MongoDB for the pages this node reads itself (GATEWAY_READS_HISTORY)."""
    settings = app[SETTINGS]
    if not settings.gateway_reads_history:
        log.info("GATEWAY_READS_HISTORY is off: workers read every history page")
        yield
        return
    client: AsyncMongoClient[Doc] = create_client(settings.mongo_url, appname="chat-gateway")
    wire = wire_client(client, settings, calls="history pages")
    app[HISTORY_READER] = HistoryReader(client[settings.mongo_database]["messages"], wire)
    yield
    if wire is not None:
        wire.close()
    await client.close()


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    # Set while the pub/sub connection hears every channel: requests are written only then.
    listening = asyncio.Event()
    producer = StreamProducer(
        settings.redis_url,
        name=f"gateway-xadd:{settings.node_id}",
        batch=settings.xadd_batch,
        max_buffered=settings.xadd_batch * 64,
        maxlen=settings.stream_maxlen,
        expire_after=settings.request_timeout,
        backoff_cap=settings.retry_backoff_max,
        listening=listening,
    )

    def subscriber_for(hub: Hub) -> Subscriber:
        return Subscriber(
            settings.redis_url,
            (hub.keys.node_channel(settings.node_id), hub.keys.control_channel),
            hub.on_message,
            hub.on_resubscribed,
            lambda: metrics.redis_reconnects.labels(REDIS_COMPONENT_GATEWAY).inc(),
            backoff_cap=settings.retry_backoff_max,
            name=f"gateway-pubsub:{settings.node_id}",
            writes=hub.writes,
            live=listening,
        )

    hub = Hub(settings, producer, metrics, subscriber_for, app.get(HISTORY_READER))
    producer.on_written = hub.written
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
    hub.close()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await hub.wait_closed()


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
    """One client socket: admit it, then read frames, validate, rate-limit and forward.

    Replies arrive through the hub. A handshake from a foreign browser page is refused
    with 403, one over the per-address connection limit with 429, one to a draining
    gateway with 503 (all before the upgrade, so they cost no socket state).

    Everything a socket needs lives in this one coroutine: it stays suspended for the
    socket's whole life, and every frame under it (a middleware, a helper coroutine)
    would be kept per socket too.
    """
    app = request.app
    if app[DRAIN].draining:
        # nginx then tries another gateway at once and benches this one, instead of
        # this gateway accepting a socket it is about to close.
        raise web.HTTPServiceUnavailable(
            text="draining: connect to another gateway", headers={"Retry-After": "1"}
        )
    guard = app[GUARD]
    metrics = app[METRICS]
    client = guard.client_address(request.remote, request.headers.getall("X-Forwarded-For", ()))
    if not guard.origins.allows(request.headers.get("Origin"), request.headers.get("Host")):
        metrics.connections_rejected.labels("origin").inc()
        # Debug only: a refused handshake costs the attacker nothing, so neither may the log.
        log.debug("refused handshake from a foreign origin", extra={"peer": client})
        raise web.HTTPForbidden(text="This page's origin may not open chat sockets")
    group = address_group(client)
    if not guard.per_ip.acquire(group):
        metrics.connections_rejected.labels("per_ip").inc()
        log.debug("refused handshake over the per-address limit", extra={"peer": client})
        raise web.HTTPTooManyRequests(
            text="Too many connections from your address", headers={"Retry-After": "10"}
        )
    try:
        settings = app[SETTINGS]
        hub = app[HUB]
        ws = web.WebSocketResponse(
            heartbeat=settings.heartbeat_seconds,
            max_msg_size=settings.max_frame_bytes,
            compress=settings.websocket_compression,
            # aiohttp waits for the transport to drain only after this many bytes of output
            # (default 256 KiB): at the transport's own high-water mark, a socket that stops
            # reading holds at most ~2 x 64 KiB in the transport besides its send queue.
            writer_limit=TRANSPORT_HIGH_WATER,
            # Text frames arrive as bytes: orjson validates the UTF-8 itself, so invalid UTF-8
            # gets a bad_request reply instead of aiohttp closing the socket with 1007.
            decode_text=False,
        )
        await ws.prepare(request)
        conn = Connection(
            hub.new_connection_id(),
            ws,
            request.transport,
            client,
            max_messages=settings.send_queue_max_messages,
            max_bytes=settings.send_queue_max_bytes,
            on_slow=app[ON_SLOW],
            batch=hub.writes,
        )
        hub.add(conn)
        metrics.connections_opened.inc()
        limiter = app[GUARD].limiter(time.monotonic())
        try:
            # The message is handed over without a name in this frame, and everything
            # made from it dies with _on_message: between messages a socket keeps none.
            while await _on_message(app, conn, limiter, await ws.receive()):
                pass
        finally:
            hub.remove(conn)
            metrics.connections_closed.labels(_close_label(conn.close_code or ws.close_code)).inc()
        return ws
    finally:
        guard.per_ip.release(group)


async def _on_message(
    app: web.Application, conn: Connection, limiter: RateLimiter, msg: WSMessage
) -> bool:
    """Handle one received WebSocket message; False ends the socket's receive loop."""
    metrics = app[METRICS]
    hub = app[HUB]
    if msg.type == WSMsgType.TEXT:
        req, error = _parse(msg.data, app[LIMITS])
        metrics.frame_in(req.event_type if req else "invalid").inc()
    elif msg.type == WSMsgType.BINARY:
        req, error = None, BINARY_ERROR
        metrics.frame_in("binary").inc()
    elif msg.type in _ENDED:
        return False
    elif msg.type == WSMsgType.ERROR:
        if isinstance(msg.data, WebSocketError) and conn.close_code is None:
            # The code aiohttp closed with (1009 too big, 1002 protocol error), not
            # whatever the peer answered, or failed to answer, to it.
            conn.close_code = msg.data.code
        return False
    else:
        return True
    received = time.monotonic()
    verdict = limiter.check(received)
    if verdict is not Verdict.ALLOW:
        metrics.rate_limited.inc()
        if verdict is Verdict.CLOSE:
            log.info(
                "closing a client that kept sending past its rate limit",
                extra={"conn": conn.conn_id, "peer": conn.peer},
            )
            await conn.close(CLOSE_RATE_LIMITED, "rate limit exceeded")
            return False
        said = req if req is not None else error
        assert said is not None
        frame = protocol.encode_reply(
            protocol.RATE_LIMITED,
            said.event_type,
            None,
            app[RATE_LIMITED_DETAIL],
            said.request_id,
        )
        hub.reply_now(conn, frame, protocol.RATE_LIMITED)
        return True
    if error is not None:
        hub.reply_now(conn, error.to_frame(), error.reply_type)
        return True
    assert req is not None
    await hub.submit(conn, req, received)
    return True


def _parse(
    data: str | bytes, limits: protocol.Limits
) -> tuple[protocol.Request | None, protocol.ProtocolError | None]:
    try:
        return protocol.parse_request(data, limits), None
    except protocol.ProtocolError as exc:
        return None, exc
    except Exception as exc:
        # A parser bug must cost the client one reply, not its socket, and the log gets
        # the exception's type only: its message could quote the frame (a token, a text).
        log.error("request parser failed", extra={"error": type(exc).__name__})
        return None, protocol.ProtocolError(protocol.BAD_REQUEST, "Malformed request")


def _close_label(code: int | None) -> str:
    # Clients choose codes 3000-4999 freely: one label for all of them keeps the
    # metric's cardinality bounded.
    if code is None:
        return "1006"
    return str(code) if code < 3000 else "other"


def _slow_consumer(conn: Connection, metrics: GatewayMetrics) -> None:
    if conn.closed:
        return
    conn.closed = True
    metrics.send_queue_drops.inc()
    metrics.slow_consumer_disconnects.inc()
    log.info("closing slow consumer", extra={"conn": conn.conn_id, "peer": conn.peer})
    task = asyncio.get_running_loop().create_task(
        _close_slow(conn), name=f"close-slow-{conn.conn_id}"
    )
    # The loop keeps only a weak reference to a task: without this one, a close that is
    # waiting on a stalled peer can be garbage-collected half-way and never abort it.
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


async def _close_slow(conn: Connection) -> None:
    # The socket's queue is full, so a polite close frame may never get through:
    # give it a moment (a slow phone may still read it), then drop the transport.
    await conn.close(1008, "slow consumer: send queue full", timeout=1.0)
    # Always abort: after close() the transport is "closing" but still holds its unsent
    # buffer until the peer reads it, which a peer that stopped reading never does.
    if conn.transport is not None:
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
