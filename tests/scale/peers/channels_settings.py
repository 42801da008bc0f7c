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
if _LAYER == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [_REDIS]},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # capacity: per-channel queue bound (default 100); a room push beyond it is
            # dropped by channels_redis, which the harness would report as loss.
            "CONFIG": {"hosts": [_REDIS], "capacity": int(os.environ.get("CHANNELS_CAPACITY", "1000"))},
        }
    }
