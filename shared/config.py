"""Settings for every process, read from the environment in one place.

Every variable is documented in ``example.env`` with its default. Nothing else in the
code base reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A variable is set to something that cannot be used."""


def _default_node_id() -> str:
    # Unique per process so two gateways on one host never share a reply channel.
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Csv(tuple[str, ...]):
    """A list setting; ``str()`` is its environment form, so settings written back into
    an environment (for a child process) parse to the same value."""

    __slots__ = ()

    def __str__(self) -> str:
        return ",".join(self)


def _csv(value: str) -> Csv:
    return Csv(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class Settings:
    """Immutable configuration shared by the gateway, the worker and the admin CLI."""

    # Where things are.
    redis_url: str = "redis://127.0.0.1:6379/0"
    mongo_url: str = "mongodb://127.0.0.1:27017/chat"
    redis_prefix: str = "chat"
    partitions: int = 16
    node_id: str = field(default_factory=_default_node_id)

    # Gateway.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    request_timeout: float = 5.0
    max_frame_bytes: int = 65_536
    max_text_length: int = 4_096
    send_queue_max_messages: int = 1_000
    send_queue_max_bytes: int = 1_048_576
    heartbeat_seconds: float = 30.0
    websocket_compression: bool = False
    xadd_batch: int = 256
    gateway_reads_history: bool = True
    # Graceful drain on SIGTERM: the whole drain is bounded by drain_timeout; sockets are
    # closed drain_batch_size at a time, drain_batch_interval apart, so their clients do
    # not all reconnect to the other gateways in the same instant.
    drain_timeout: float = 10.0
    drain_batch_size: int = 100
    drain_batch_interval: float = 0.1

    # Worker.
    worker_http_host: str = "127.0.0.1"
    worker_http_port: int = 9100
    lease_seconds: float = 5.0
    worker_batch: int = 500
    worker_block_ms: int = 200
    auth_cache_ttl: float = 5.0
    auth_cache_keep: float = 60.0
    stream_maxlen: int = 1_000_000
    retry_backoff_max: float = 2.0
    mongo_wire: bool = True

    # Abuse limits (gateway); docs/security.md explains each one.
    rate_limit_per_second: float = 50.0  # 0: no rate limit
    rate_limit_burst: int = 200
    rate_limit_close_after: int = 100
    max_connections_per_ip: int = 1_000  # 0: no limit
    trusted_proxies: tuple[str, ...] = ()  # IPs or CIDRs whose X-Forwarded-For is believed
    allowed_origins: tuple[str, ...] = ()  # empty: browsers only from the gateway's own host
    file_url_prefixes: tuple[str, ...] = ("/",)  # also applies to avatars set by the admin CLI

    # Both.
    log_level: str = "INFO"
    use_uvloop: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); ``overrides`` win."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = _ENV_NAMES[f.name]
            raw = source.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(name, raw, _TYPES[f.name])
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Reject values that would make a process misbehave rather than fail fast."""
        if self.partitions < 1:
            raise ConfigError("PARTITIONS must be at least 1")
        if not 1 <= self.gateway_port <= 65535:
            raise ConfigError("GATEWAY_PORT must be a TCP port")
        if not 0 <= self.worker_http_port <= 65535:
            raise ConfigError("WORKER_HTTP_PORT must be a TCP port or 0")
        if self.request_timeout <= 0 or self.lease_seconds <= 0:
            raise ConfigError("timeouts must be positive")
        if self.send_queue_max_messages < 1 or self.send_queue_max_bytes < 1:
            raise ConfigError("send queue bounds must be positive")
        if self.auth_cache_ttl <= 0 or self.auth_cache_keep < 0:
            raise ConfigError(
                "AUTH_CACHE_TTL_SECONDS must be positive, AUTH_CACHE_KEEP_SECONDS not negative"
            )
        if self.worker_batch < 1 or self.xadd_batch < 1:
            raise ConfigError("batch sizes must be positive")
        if self.drain_timeout < 0 or self.drain_batch_size < 1 or self.drain_batch_interval < 0:
            raise ConfigError(
                "DRAIN_TIMEOUT_SECONDS and DRAIN_BATCH_INTERVAL_SECONDS must not be negative, "
                "DRAIN_BATCH_SIZE must be positive"
            )
        if not self.node_id or any(c in self.node_id for c in " {}"):
            raise ConfigError("NODE_ID must be non-empty without spaces or braces")
        if self.rate_limit_per_second < 0:
            raise ConfigError("RATE_LIMIT_PER_SECOND must not be negative (0 turns it off)")
        if self.rate_limit_burst < 1 or self.rate_limit_close_after < 1:
            raise ConfigError("RATE_LIMIT_BURST and RATE_LIMIT_CLOSE_AFTER must be positive")
        if self.max_connections_per_ip < 0:
            raise ConfigError("MAX_CONNECTIONS_PER_IP must not be negative (0 turns it off)")
        # TRUSTED_PROXIES, ALLOWED_ORIGINS and FILE_URL_PREFIXES are parsed (and refused
        # with their names) by the code that uses them: gateway/limits.py, shared/protocol.py.

    def __post_init__(self) -> None:
        # List settings given as plain tuples (overrides, dataclasses.replace) become Csv,
        # so str() renders them the way the environment variable is written.
        for name in _LIST_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Csv):
                object.__setattr__(
                    self, name, _csv(value) if isinstance(value, str) else Csv(value)
                )

    @property
    def mongo_database(self) -> str:
        """The database named in ``MONGO_URL``'s path (``chat`` when it names none)."""
        from pymongo.uri_parser import parse_uri

        return parse_uri(self.mongo_url).get("database") or "chat"


_ENV_NAMES: dict[str, str] = {
    "redis_url": "REDIS_URL",
    "mongo_url": "MONGO_URL",
    "redis_prefix": "REDIS_PREFIX",
    "partitions": "PARTITIONS",
    "node_id": "NODE_ID",
    "gateway_host": "GATEWAY_HOST",
    "gateway_port": "GATEWAY_PORT",
    "request_timeout": "REQUEST_TIMEOUT_SECONDS",
    "max_frame_bytes": "MAX_FRAME_BYTES",
    "max_text_length": "MAX_TEXT_LENGTH",
    "send_queue_max_messages": "SEND_QUEUE_MAX_MESSAGES",
    "send_queue_max_bytes": "SEND_QUEUE_MAX_BYTES",
    "heartbeat_seconds": "HEARTBEAT_SECONDS",
    "websocket_compression": "WEBSOCKET_COMPRESSION",
    "xadd_batch": "XADD_BATCH",
    "gateway_reads_history": "GATEWAY_READS_HISTORY",
    "drain_timeout": "DRAIN_TIMEOUT_SECONDS",
    "drain_batch_size": "DRAIN_BATCH_SIZE",
    "drain_batch_interval": "DRAIN_BATCH_INTERVAL_SECONDS",
    "worker_http_host": "WORKER_HTTP_HOST",
    "worker_http_port": "WORKER_HTTP_PORT",
    "lease_seconds": "LEASE_SECONDS",
    "worker_batch": "WORKER_BATCH_SIZE",
    "worker_block_ms": "WORKER_BLOCK_MS",
    "auth_cache_ttl": "AUTH_CACHE_TTL_SECONDS",
    "auth_cache_keep": "AUTH_CACHE_KEEP_SECONDS",
    "stream_maxlen": "STREAM_MAXLEN",
    "retry_backoff_max": "RETRY_BACKOFF_MAX_SECONDS",
    "mongo_wire": "MONGO_WIRE",
    "rate_limit_per_second": "RATE_LIMIT_PER_SECOND",
    "rate_limit_burst": "RATE_LIMIT_BURST",
    "rate_limit_close_after": "RATE_LIMIT_CLOSE_AFTER",
    "max_connections_per_ip": "MAX_CONNECTIONS_PER_IP",
    "trusted_proxies": "TRUSTED_PROXIES",
    "allowed_origins": "ALLOWED_ORIGINS",
    "file_url_prefixes": "FILE_URL_PREFIXES",
    "log_level": "LOG_LEVEL",
    "use_uvloop": "USE_UVLOOP",
}

_TYPES: dict[str, type] = {
    f.name: type(f.default) if not callable(f.default_factory) else str for f in fields(Settings)
}


# Settings that hold a comma-separated list.
_LIST_FIELDS: tuple[str, ...] = tuple(name for name, kind in _TYPES.items() if kind is tuple)


def env_names() -> dict[str, str]:
    """Field name -> environment variable name (used by tests that check example.env)."""
    return dict(_ENV_NAMES)


def _convert(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw.replace("_", ""))
        if kind is float:
            return float(raw)
        if kind is tuple:
            return _csv(raw)
        return raw.strip()
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc
