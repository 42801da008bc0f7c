"""The worker process: ``create_app(settings)`` runs the consumer as background tasks of a
small aiohttp app that serves ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient
from redis.asyncio import Redis

from shared.config import Settings
from shared.keys import Keys
from shared.metrics import CONTENT_TYPE, WorkerMetrics, render
from shared.redis_client import create_redis

from .auth import Authenticator
from .consumer import Consumer
from .partitions import PartitionManager
from .processor import Counters, Processor
from .store import Doc, Store, create_client

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", WorkerMetrics)
REDIS = web.AppKey("redis", Redis)
MONGO = web.AppKey("mongo", AsyncMongoClient)
STORE = web.AppKey("store", Store)
PARTITIONS = web.AppKey("partitions", PartitionManager)
CONSUMER = web.AppKey("consumer", Consumer)
DRAINING = web.AppKey("draining", list[bool])

SAMPLE_EVERY = 5.0
STOP_TIMEOUT = 10.0


def create_app(settings: Settings) -> web.Application:
    """Build the worker application; its resources and loops start and stop with it."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = WorkerMetrics()
    app[DRAINING] = [False]
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
    app[MONGO] = client
    app[STORE] = Store(client[settings.mongo_database])
    yield
    await client.close()


async def _consumer_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    redis = app[REDIS]
    store = app[STORE]
    keys = Keys(settings.redis_prefix)
    partitions = PartitionManager(
        redis,
        keys,
        settings.node_id,
        settings.partitions,
        settings.lease_seconds,
        metrics,
        backoff_cap=settings.retry_backoff_max,
    )
    counters = Counters(store)
    processor = Processor(
        store, Authenticator(store, settings.auth_cache_ttl, metrics), counters, metrics
    )
    consumer = Consumer(
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
    lease_task = asyncio.create_task(partitions.run(), name="leases")
    consumer_task = asyncio.create_task(_after(indexes, consumer.run()), name="consumer")
    sampler = asyncio.create_task(_sample(app), name="sampler")
    log.info("worker started", extra={"node": settings.node_id})
    yield
    # Drain: finish the batch in hand (it acks), then hand every partition back so
    # another worker takes them at once instead of after the lease runs out.
    app[DRAINING][0] = True
    consumer.stopping = True
    partitions.stopping = True
    try:
        await asyncio.wait_for(asyncio.shield(consumer_task), STOP_TIMEOUT)
    except (TimeoutError, Exception):
        consumer_task.cancel()
    for task in (sampler, lease_task, consumer_task, indexes):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await partitions.release_all()
    log.info("worker stopped", extra={"node": settings.node_id})


async def _after(first: asyncio.Task[None], then: Coroutine[Any, Any, None]) -> None:
    await first
    await then


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
            log.warning(f"{what} failed; retrying", extra={"error": repr(exc)[:300]})
            await backoff.sleep()


async def _sample(app: web.Application) -> None:
    consumer = app[CONSUMER]
    store = app[STORE]
    while True:
        try:
            await store.ping()
            consumer.mongo_ok = True
        except asyncio.CancelledError:
            raise
        except Exception:
            consumer.mongo_ok = False
        try:
            await consumer.sample_streams()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("stream sampling failed", extra={"error": repr(exc)})
        await asyncio.sleep(SAMPLE_EVERY)


def is_ready(app: web.Application) -> tuple[bool, dict[str, bool]]:
    """Ready: Redis and MongoDB reachable, leases kept up, not draining."""
    consumer = app[CONSUMER]
    checks = {
        "redis": consumer.redis_ok and app[PARTITIONS].healthy,
        "mongo": consumer.mongo_ok,
        "not_draining": not app[DRAINING][0],
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
    """Prometheus text exposition."""
    app = request.app
    app[METRICS].ready.set(1 if is_ready(app)[0] else 0)
    return web.Response(body=render(app[METRICS].registry), headers={"Content-Type": CONTENT_TYPE})
