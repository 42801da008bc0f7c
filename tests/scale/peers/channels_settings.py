"""Minimal Django settings for the Channels peer: no database, no apps but channels."""

from __future__ import annotations

import os

SECRET_KEY = "scale-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["channels"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
ROOT_URLCONF = None
ASGI_APPLICATION = "tests.scale.peers.channels_peer.application"
LOGGING_CONFIG = None

_LAYER = os.environ.get("CHANNELS_LAYER", "core")
_REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# redis-py 8 changed two connection defaults that channels_redis 4.3.0 does not set:
# * a pool holds at most 100 connections: group_send under load then fails with
#   MaxConnectionsError ("Too many connections");
# * socket_timeout is 5 s: the layer's receive loop blocks in BZPOPMIN for up to 5 s, so
#   an idle consumer's read times out and the consumer dies (its socket is closed).
# Both are raised here, as a deployment of this stack would have to.
_HOST = {
    "address": _REDIS,
    "max_connections": int(os.environ.get("CHANNELS_MAX_CONNECTIONS", "1000")),
    "socket_timeout": float(os.environ.get("CHANNELS_SOCKET_TIMEOUT", "30")),
}
if _LAYER == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [_HOST]},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # capacity: per-channel queue bound (default 100); a room push beyond it is
            # dropped by channels_redis, which the harness would report as loss.
            "CONFIG": {
                "hosts": [_HOST],
                "capacity": int(os.environ.get("CHANNELS_CAPACITY", "1000")),
            },
        }
    }
