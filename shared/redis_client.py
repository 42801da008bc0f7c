"""The one way both process kinds open Redis connections."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def create_redis(url: str, *, name: str) -> Redis:
    """A client for ``url`` (hiredis parser when installed); ``name`` shows in CLIENT LIST."""
    return Redis.from_url(
        url,
        client_name=name,
        socket_connect_timeout=2.0,
        socket_keepalive=True,
        health_check_interval=15,
        decode_responses=False,
        # Every caller has its own retry loop with backoff and a health flag; redis-py's
        # default retries (with up to 10 s of backoff) would hide an outage from /readyz.
        retry=Retry(NoBackoff(), 0),
    )
