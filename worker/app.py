"""The worker process: ``create_app(settings)`` runs the consumer as background tasks of a
small aiohttp app that serves ``/healthz``, ``/readyz`` and ``/metrics``.

:func:`drain` is the graceful stop (SIGTERM, see ``worker/__main__.py``): unready at
once, stop reading, finish and ack the batch in hand, release every partition lease so
the other workers take them at their next lease round instead of after the lease
expires. The HTTP server keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient
from redis.asyncio import Redis

from shared.config import Settings
from shared.keys import Keys
from shared.logs import describe_error
from shared.metrics import (
    CONTENT_TYPE,
    REDIS_COMPONENT_LEASES,
    REDIS_COMPONENT_STREAMS,
    WorkerMetrics,
    prime_worker,
    render,
)
from shared.mongo import create_client, wire_client
from shared.redis_client import create_redis
from shared.wire import Doc

from .auth import Authenticator
from .consumer import Consumer
from .partitions import PartitionManager
from .processor import Counters, Processor
from .store import Store

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", WorkerMetrics)
REDIS = web.AppKey("redis", Redis)
MONGO = web.AppKey("mongo", AsyncMongoClient)
STORE = web.AppKey("store", Store)
PARTITIONS = web.AppKey("partitions", PartitionManager)
CONSUMER = web.AppKey("consumer", Consumer)
TASKS = web.AppKey("tasks", dict[str, asyncio.Task[None]])


class DrainState:
    """Whether the worker is draining, and the drain itself (run once)."""

    def __init__(self) -> None:
        self.draining = False
        self.task: asyncio.Task[None] | None = None


DRAIN = web.AppKey("drain", DrainState)

# MongoDB is pinged this often for /readyz.
PING_EVERY = 1.0
# How long the drain waits for the cancelled background tasks to end.
TASK_STOP_TIMEOUT = 2.0
# Stream length and pending counts are read when /metrics is scraped, within this bound.
SAMPLE_TIMEOUT = 1.0


def create_app(settings: Settings) -> web.Application:
    """Build the worker application; its resources and loops start and stop with it."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = WorkerMetrics()
    prime_worker(app[METRICS])
    app[DRAIN] = DrainState()
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_mongo_ctx)
    app.cleanup_ctx.append(_consumer_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[REDIS] = create_redis(settings.redis_url, name=f"worker:{settings.node_id}")
    yield
    await app[REDIS].aclose()


async def _mongo_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client: AsyncMongoClient[Doc] = create_client(settings.mongo_url)
    wire = wire_client(client, settings)
    app[MONGO] = client
    app[STORE] = Store(client[settings.mongo_database], wire)
    yield
    if wire is not None:
        wire.close()
    await client.close()


async def _consumer_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    redis = app[REDIS]
    store = app[STORE]
    keys = Keys(settings.redis_prefix)
    reconnects = metrics.redis_reconnects
    partitions = _LeasesCountingReconnects(
        reconnects.labels(REDIS_COMPONENT_LEASES).inc,
        redis,
        keys,
        settings.node_id,
        settings.partitions,
        settings.lease_seconds,
        metrics,
        backoff_cap=settings.retry_backoff_max,
        redis_url=settings.redis_url,
    )
    counters = Counters(store)
    auth = Authenticator(store, settings.auth_cache_ttl, metrics, keep=settings.auth_cache_keep)
    processor = Processor(store, auth, counters, metrics)
    consumer = _ConsumerCountingReconnects(
        reconnects.labels(REDIS_COMPONENT_STREAMS).inc,
        redis,
        keys,
        settings.node_id,
        partitions,
        processor,
        counters,
        metrics,
        batch=settings.worker_batch,
        block_ms=settings.worker_block_ms,
        backoff_cap=settings.retry_backoff_max,
        redis_url=settings.redis_url,
    )
    app[PARTITIONS] = partitions
    app[CONSUMER] = consumer
    indexes = asyncio.create_task(_retrying("create indexes", store.ensure_indexes))
    app[TASKS] = {
        "indexes": indexes,
        "leases": asyncio.create_task(partitions.run(), name="leases"),
        "presence": asyncio.create_task(partitions.run_presence(), name="presence"),
        "consumer": asyncio.create_task(_after(indexes, consumer.run), name="consumer"),
        "mongo_ping": asyncio.create_task(_ping_mongo(app), name="mongo-ping"),
        "auth_refresh": asyncio.create_task(auth.run_refresh(), name="auth-refresh"),
        "clock": asyncio.create_task(consumer.clock.run(redis), name="redis-clock"),
        "trim": asyncio.create_task(consumer.run_trim(), name="stream-trim"),
        "control": asyncio.create_task(
            auth.run_control(
                settings.redis_url, keys.control_channel, name=f"worker-control:{settings.node_id}"
            ),
            name="control",
        ),
    }
    log.info("worker started", extra={"node": settings.node_id})
    yield
    await drain(app)


async def drain(app: web.Application) -> None:
    """Stop gracefully: unready, finish the batch in hand (it acks), release every lease.

    Idempotent: a second call waits for the first. Bounded by DRAIN_TIMEOUT_SECONDS for
    the batch in hand (a batch stuck on MongoDB is left pending for the next owner).
    """
    state = app[DRAIN]
    if state.task is None:
        state.draining = True
        app[METRICS].ready.set(0)
        state.task = asyncio.create_task(_drain(app), name="drain")
    if not state.task.done():  # done: finished, or cut short by a second signal
        await asyncio.shield(state.task)


async def _drain(app: web.Application) -> None:
    settings = app[SETTINGS]
    consumer = app[CONSUMER]
    partitions = app[PARTITIONS]
    tasks = app[TASKS]
    started = time.monotonic()
    owned = partitions.owned
    log.info("draining", extra={"partitions": owned})
    consumer.stopping = True
    partitions.stopping = True  # no new leases from here on
    consumer_task = tasks["consumer"]
    # Until the indexes exist (MongoDB down since start-up) nothing was read: no batch to wait for.
    wait = settings.drain_timeout if tasks["indexes"].done() else 0.0
    try:
        # The loop ends after the batch in hand: processed, published, acked.
        await asyncio.wait_for(asyncio.shield(consumer_task), wait)
    except TimeoutError:
        log.warning("batch not finished in time; leaving it pending for the next owner")
    except Exception:
        log.exception("consumer failed while draining")
    finally:
        # Also when the drain itself is cut short: nothing may keep running after it.
        for task in tasks.values():
            task.cancel()
    # Bounded: a task can swallow its cancellation (PyMongo's async client does, when
    # cancelled inside an operation), and a drain must never hang on one.
    _, stuck = await asyncio.wait(tasks.values(), timeout=TASK_STOP_TIMEOUT)
    if stuck:
        log.warning(
            "tasks still running after cancel", extra={"tasks": sorted(t.get_name() for t in stuck)}
        )
    # Hand every partition back now: the others take them at their next lease round
    # (a third of LEASE_SECONDS) rather than when the lease expires.
    await partitions.release_all()
    log.info(
        "drained",
        extra={"partitions": owned, "seconds": round(time.monotonic() - started, 3)},
    )


async def _after(first: asyncio.Task[None], then: Callable[[], Coroutine[Any, Any, None]]) -> None:
    # ``then`` is called only once ``first`` is done: a coroutine made up front would be
    # left never awaited (and warned about) when this task is cancelled before that.
    await first
    await then()


async def _retrying(what: str, action: Any) -> None:
    from shared.backoff import Backoff

    backoff = Backoff(cap=5.0)
    while True:
        try:
            await action()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(f"{what} failed; retrying", extra={"error": describe_error(exc)})
            await backoff.sleep()


async def _ping_mongo(app: web.Application) -> None:
    """Keep ``consumer.mongo_ok`` current for /readyz, also while no traffic flows."""
    consumer = app[CONSUMER]
    store = app[STORE]
    drain = app[DRAIN]
    while not drain.draining:
        try:
            await store.ping()
            consumer.mongo_ok = True
        except asyncio.CancelledError:
            raise
        except Exception:
            consumer.mongo_ok = False
        await asyncio.sleep(PING_EVERY)


class _ConsumerCountingReconnects(Consumer):
    """The consumer, counting each return of its Redis health flag to True after a loss
    (``chat_redis_reconnects_total{component="worker_streams"}``)."""

    def __init__(self, on_recovered: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        self._on_recovered = on_recovered
        self._redis_ok = True
        super().__init__(*args, **kwargs)

    @property
    def redis_ok(self) -> bool:
        """True unless the last Redis call of the read loop failed."""
        return self._redis_ok

    @redis_ok.setter
    def redis_ok(self, value: bool) -> None:
        if value and not self._redis_ok:
            self._on_recovered()
            log.info("redis connection recovered", extra={"component": REDIS_COMPONENT_STREAMS})
        self._redis_ok = value


class _LeasesCountingReconnects(PartitionManager):
    """The lease manager, counting each return of its health flag to True after a loss
    (``chat_redis_reconnects_total{component="worker_leases"}``); its first healthy
    round is start-up, not a recovery."""

    def __init__(self, on_recovered: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        self._on_recovered = on_recovered
        self._healthy = False
        self._was_healthy = False
        super().__init__(*args, **kwargs)

    @property
    def healthy(self) -> bool:
        """True while the lease rounds succeed."""
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        if value and not self._healthy and self._was_healthy:
            self._on_recovered()
            log.info("redis connection recovered", extra={"component": REDIS_COMPONENT_LEASES})
        self._was_healthy = self._was_healthy or value
        self._healthy = value


def is_ready(app: web.Application) -> tuple[bool, dict[str, bool]]:
    """Ready: Redis and MongoDB reachable, leases kept up, not draining."""
    consumer = app[CONSUMER]
    checks = {
        "redis": consumer.redis_ok and app[PARTITIONS].healthy,
        "mongo": consumer.mongo_ok,
        "not_draining": not app[DRAIN].draining,
    }
    return all(checks.values()), checks


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers HTTP."""
    return web.json_response({"status": "ok", "node": request.app[SETTINGS].node_id})


async def readyz(request: web.Request) -> web.Response:
    """Ready (200) or not (503), with the checks that decided it."""
    ready, checks = is_ready(request.app)
    request.app[METRICS].ready.set(1 if ready else 0)
    body = {
        "ready": ready,
        "checks": checks,
        "node": request.app[SETTINGS].node_id,
        "partitions": request.app[PARTITIONS].readable(),
    }
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition; stream length and pending counts are read now."""
    app = request.app
    if not app[DRAIN].draining:
        # Read at scrape time so the gauges are as fresh as the scrape (two Redis calls
        # per owned partition); a slow or absent Redis must not hang the scrape.
        try:
            await asyncio.wait_for(app[CONSUMER].sample_streams(), SAMPLE_TIMEOUT)
        except Exception as exc:
            log.debug("stream sampling failed", extra={"error": repr(exc)})
    app[METRICS].ready.set(1 if is_ready(app)[0] else 0)
    wire = app[STORE].wire
    app[METRICS].mongo_wire_connections.set(wire.connections if wire is not None else 0)
    return web.Response(body=render(app[METRICS].registry), headers={"Content-Type": CONTENT_TYPE})
