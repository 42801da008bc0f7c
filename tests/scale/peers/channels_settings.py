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
_MAX_CONNECTIONS = int(os.environ.get("CHANNELS_MAX_CONNECTIONS", "1000"))
if _LAYER == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [{"address": _REDIS, "max_connections": _MAX_CONNECTIONS}]},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # capacity: per-channel queue bound (default 100); a room push beyond it is
            # dropped by channels_redis, which the harness would report as loss.
            "CONFIG": {
                # redis-py 8 caps a pool at 100 connections by default; channels_redis
                # then fails group_send under load with MaxConnectionsError. Raise the cap.
                "hosts": [{"address": _REDIS, "max_connections": _MAX_CONNECTIONS}],
                "capacity": int(os.environ.get("CHANNELS_CAPACITY", "1000")),
            },
        }
    }
