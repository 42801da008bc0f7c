"""The one way both process kinds open Redis connections."""

from __future__ import annotations

from redis.asyncio import Redis


def create_redis(url: str, *, name: str) -> Redis:
    """A client for ``url`` (hiredis parser when installed); ``name`` shows in CLIENT LIST."""
    return Redis.from_url(
        url,
        client_name=name,
        socket_connect_timeout=2.0,
        socket_keepalive=True,
        health_check_interval=15,
        decode_responses=False,
    )
