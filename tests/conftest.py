"""Session fixtures: a real Redis and a real MongoDB on free loopback ports.

Each test gets its own Redis key prefix and MongoDB database (dropped afterwards), so
tests never see each other's data while the servers start only once per session.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from redis.asyncio import Redis

from deploy.local.servers import LocalServer, free_port, mongo_server, redis_server
from shared.config import Settings
from tests.support import Seeder, Stack, mongo_store

# Tests run on a loaded 2-core box next to real servers: Hypothesis must not fail on
# timing (speed is measured by benchmarks, never asserted in tests).
hypothesis_settings.register_profile(
    "chat", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200
)
hypothesis_settings.load_profile("chat")


@dataclass
class Servers:
    """A Redis and a mongod started for tests."""

    redis: LocalServer
    mongo: LocalServer


@contextlib.contextmanager
def local_servers(base: Path) -> Iterator[Servers]:
    """Redis (AOF on) and mongod on free loopback ports under ``base``; stopped on exit."""
    redis = redis_server(free_port(), base / "redis").start()
    try:
        mongo = mongo_server(free_port(), base / "mongo").start(timeout=60)
    except Exception:
        redis.stop()
        raise
    try:
        yield Servers(redis, mongo)
    finally:
        redis.stop()
        mongo.stop()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """The session's servers, started once."""
    with local_servers(tmp_path_factory.mktemp("servers")) as started:
        yield started


@pytest.fixture
def settings(servers: Servers) -> Settings:
    """Settings isolated to this test: own key prefix, own database, short timeouts."""
    tag = uuid.uuid4().hex[:10]
    mongo_url = servers.mongo.url.rsplit("/", 1)[0] + f"/t_{tag}"
    return Settings(
        redis_url=servers.redis.url,
        mongo_url=mongo_url,
        redis_prefix=f"t{tag}",
        partitions=4,
        node_id=f"test-{tag}",
        request_timeout=5.0,
        lease_seconds=2.0,
        auth_cache_ttl=0.5,
        worker_block_ms=100,
        heartbeat_seconds=30.0,
        log_level="WARNING",
        use_uvloop=False,
        retry_backoff_max=0.5,
    )


@pytest.fixture
async def cleanup(settings: Settings) -> AsyncIterator[None]:
    """Drop the test's database and keys afterwards."""
    yield
    client, _ = await mongo_store(settings)
    try:
        await client.drop_database(settings.mongo_database)
    finally:
        await client.close()
    redis = Redis.from_url(settings.redis_url)
    try:
        keys = [
            key async for key in redis.scan_iter(match=f"{settings.redis_prefix}:*", count=1000)
        ]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
async def seed(settings: Settings, cleanup: None) -> AsyncIterator[Seeder]:
    """Create users and chats in the test's database."""
    client, store = await mongo_store(settings)
    await store.ensure_indexes()
    try:
        yield Seeder(store)
    finally:
        await client.close()


@pytest.fixture
async def stack(settings: Settings, cleanup: None) -> AsyncIterator[Stack]:
    """Factory for gateways, workers and clients; closes all of them at the end."""
    async with aiohttp.ClientSession() as session:
        created = Stack(settings, session)
        try:
            yield created
        finally:
            await created.close()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Where child process logs go."""
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A Redis client on the session's server."""
    client = Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
