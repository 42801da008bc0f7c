"""Prometheus metrics of both process kinds (names prefixed ``chat_``).

Labels are of bounded cardinality by construction: event and reply types from the
protocol's fixed sets, close codes, partition numbers (< PARTITIONS), component names.
Never a chat id, a user id or a token.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from bisect import bisect_left
from collections.abc import Awaitable, Iterator, Sequence
from typing import Generic, Literal, TypeVar, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from shared import protocol

_T = TypeVar("_T")

# No `*_created` series next to every counter and histogram: they double the series
# count, and nothing here (dashboard, alerts) reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Latency buckets from 0.25 ms to 10 s: request and delivery latencies on a LAN sit
# in the low milliseconds, timeouts at seconds.
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

CONTENT_TYPE = CONTENT_TYPE_LATEST


# Why a socket's grant to a chat ended without a request of its own.
GRANT_END_REASONS = ("member_removed", "token_revoked", "token_expired")


# -- metrics counted on the event loop, per message --------------------------------
#
# prometheus_client takes a lock on every increment and observation (a Counter.inc
# 0.44 µs, a Histogram.observe 1.1 µs, against 0.06 µs for adding to an attribute).
# The series below are counted several times per message, always on the event loop's
# one thread, and read by /metrics on that same thread: a lock guards against nothing
# there. So they are plain numbers, exposed by a collector exactly as prometheus_client
# would expose the same Counter or Histogram (tests/test_operations.py compares the two
# texts). Everything counted rarely stays a prometheus_client metric.


class LoopCounterSeries:
    """One series of a :class:`LoopCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (not negative)."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class LoopHistogramSeries:
    """One series of a :class:`LoopHistogram`."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count one observation of ``amount``."""
        self.sum += amount
        # The first bucket whose bound is >= amount, as prometheus_client's own scan.
        self.counts[bisect_left(self._bounds, amount)] += 1


_S = TypeVar("_S", LoopCounterSeries, LoopHistogramSeries)


class _LoopMetric(Collector, Generic[_S]):
    """A metric's name, help, label names and series; registered as a collector."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], _S] = {}
        if not self._labelnames:
            self._series[()] = self._new()
        registry.register(self)

    @abstractmethod
    def _new(self) -> _S:
        """A new series at zero."""

    def labels(self, *values: str) -> _S:
        """The series of these label values (made on first use, as prometheus_client's).

        A series already made is found by its values as given, with no check or
        conversion: the hot paths ask for the same few series many times a batch.
        """
        series = self._series.get(values)
        if series is not None:
            return series
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new()
        return series

    def _only(self) -> _S:
        if self._labelnames:
            raise ValueError(f"{self._name} has labels {self._labelnames}: use labels()")
        return self._series[()]

    def describe(self) -> Iterator[Metric]:
        """The metric's name, for the registry's duplicate check."""
        return self._families(with_values=False)

    def collect(self) -> Iterator[Metric]:
        """The metric with every series, for /metrics."""
        return self._families(with_values=True)

    @abstractmethod
    def _families(self, with_values: bool) -> Iterator[Metric]:
        """The metric's family, with its series' values when ``with_values``."""


class LoopCounter(_LoopMetric[LoopCounterSeries]):
    """A counter exposed as prometheus_client's ``Counter`` (``<name>_total``)."""

    def _new(self) -> LoopCounterSeries:
        return LoopCounterSeries()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to the counter (one without labels)."""
        self._only().inc(amount)

    def _families(self, with_values: bool) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        if with_values:
            for key, series in self._series.items():
                family.add_metric(key, series.value)
        yield family


class LoopHistogram(_LoopMetric[LoopHistogramSeries]):
    """A histogram exposed as prometheus_client's ``Histogram``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._bounds = [float(b) for b in buckets]
        if self._bounds[-1] != float("inf"):
            self._bounds.append(float("inf"))
        self._le = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new(self) -> LoopHistogramSeries:
        return LoopHistogramSeries(self._bounds)

    def observe(self, amount: float) -> None:
        """Count one observation (a histogram without labels)."""
        self._only().observe(amount)

    def _families(self, with_values: bool) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        if with_values:
            for key, series in self._series.items():
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for le, count in zip(self._le, series.counts, strict=True):
                    cumulative += count
                    buckets.append((le, cumulative))
                family.add_metric(key, buckets, series.sum)
        yield family


class GatewayMetrics:
    """Metrics of one gateway process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sockets_open = Gauge(
            "chat_gateway_sockets_open", "Open WebSocket connections.", registry=r
        )
        self.connections_opened = Counter(
            "chat_gateway_connections_opened", "WebSocket connections accepted.", registry=r
        )
        self.connections_closed = Counter(
            "chat_gateway_connections_closed",
            "WebSocket connections closed, by close code.",
            ["code"],
            registry=r,
        )
        self.frames_in = LoopCounter(
            "chat_gateway_frames_in", "Frames received, by event type.", ["event"], registry=r
        )
        self.frames_out = LoopCounter(
            "chat_gateway_frames_out", "Frames sent, by kind (reply|push).", ["kind"], registry=r
        )
        self.replies = LoopCounter(
            "chat_gateway_replies", "Replies sent, by reply type.", ["type"], registry=r
        )
        self.request_seconds = LoopHistogram(
            "chat_gateway_request_seconds",
            "Frame received to reply sent, by event type.",
            ["event"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = LoopHistogram(
            "chat_gateway_delivery_seconds",
            "Message stored (worker clock) to push written to a socket.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.deliveries = LoopCounter(
            "chat_gateway_deliveries", "Pushes written to sockets.", registry=r
        )
        self.send_queue_drops = Counter(
            "chat_gateway_send_queue_drops",
            "Frames dropped because a socket's send queue was full.",
            registry=r,
        )
        self.slow_consumer_disconnects = Counter(
            "chat_gateway_slow_consumer_disconnects",
            "Sockets closed because they did not read their pushes.",
            registry=r,
        )
        self.grants_revoked = Counter(
            "chat_gateway_grants_revoked",
            "Sockets' grants to a chat's pushes ended by a revocation or a token's expiry.",
            ["reason"],
            registry=r,
        )
        self.chat_channels = Gauge(
            "chat_gateway_chat_channels", "Chat channels this node is subscribed to.", registry=r
        )
        self.requests_in_flight = Gauge(
            "chat_gateway_requests_in_flight", "Requests waiting for a worker's reply.", registry=r
        )
        self.request_timeouts = Counter(
            "chat_gateway_request_timeouts", "Requests answered with a timeout.", registry=r
        )
        self.gaps_filled = Counter(
            "chat_gateway_gaps_filled",
            "Missed pushes detected by sequence id and delivered from history.",
            registry=r,
        )
        self.gap_fills = Counter(
            "chat_gateway_gap_fills",
            "History fetches started to fill a chat's gap (after a reconnect or a jump in ids).",
            registry=r,
        )
        self.gaps_unfilled = Counter(
            "chat_gateway_gaps_unfilled",
            "Gap fills given up after repeated timeouts (sockets may have missed messages).",
            registry=r,
        )
        self.replies_recovered = Counter(
            "chat_gateway_replies_recovered",
            "Sends answered from MongoDB after this node's pub/sub reconnected: stored, "
            "their reply published while it was not listening.",
            registry=r,
        )
        self.stream_buffer = Gauge(
            "chat_gateway_stream_buffer",
            "Requests waiting for their XADD to a partition stream (bounded).",
            registry=r,
        )
        self.overload_refusals = Counter(
            "chat_gateway_overload_refusals",
            "Requests answered server_error at once because the XADD buffer was full "
            "(Redis slow or unreachable).",
            registry=r,
        )
        self.rate_limited = Counter(
            "chat_gateway_rate_limited",
            "Frames refused with rate_limited (over the per-socket rate).",
            registry=r,
        )
        self.history_reads = LoopCounter(
            "chat_gateway_history_reads",
            "get_history requests by who read the page: this gateway from MongoDB "
            "(by=gateway) or a worker (by=worker).",
            ["by"],
            registry=r,
        )
        self.grant_renewals = Counter(
            "chat_gateway_grant_renewals",
            "get_history requests of sockets whose grant was older than "
            "AUTH_CACHE_TTL_SECONDS: a worker checked token and chat again and renewed the "
            "grant without reading the page, which this gateway then read itself.",
            registry=r,
        )
        self.history_read_errors = Counter(
            "chat_gateway_history_read_errors",
            "History pages this gateway failed to read from MongoDB (workers answered them, "
            "and the next ones for a few seconds).",
            registry=r,
        )
        self.history_read_seconds = LoopHistogram(
            "chat_gateway_history_read_seconds",
            "This gateway's reads of a history page from MongoDB.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connections_rejected = Counter(
            "chat_gateway_connections_rejected",
            "WebSocket handshakes refused, by reason (origin|per_ip).",
            ["reason"],
            registry=r,
        )
        for reason in ("origin", "per_ip"):
            self.connections_rejected.labels(reason)
        self.redis_reconnects = redis_reconnects(r)
        self.ready = ready_gauge(r)
        # Counted once per frame received.
        self.frame_in = self.frames_in.labels


class WorkerMetrics:
    """Metrics of one worker process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = LoopCounter(
            "chat_worker_events",
            "Requests handled, by event type and result (a reply type).",
            ["event", "result"],
            registry=r,
        )
        self.messages_stored = LoopCounter(
            "chat_worker_messages_stored", "Messages inserted into MongoDB.", registry=r
        )
        self.batch_size = LoopHistogram(
            "chat_worker_batch_size",
            "Stream entries handled per batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.stream_wait_seconds = LoopHistogram(
            "chat_worker_stream_wait_seconds",
            "How long new stream entries waited before a worker read them (Redis's clock).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = LoopHistogram(
            "chat_worker_batch_seconds",
            "Time from reading a batch to its replies published and its entries "
            "acknowledged (retries included).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.mongo_seconds = LoopHistogram(
            "chat_worker_mongo_seconds",
            "MongoDB operation latency, by operation.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_length = Gauge(
            "chat_worker_stream_length",
            "Entries in a partition's stream (sampled by its owner).",
            ["partition"],
            registry=r,
        )
        self.stream_pending = Gauge(
            "chat_worker_stream_pending",
            "Entries read but not yet acknowledged in a partition (sampled by its owner).",
            ["partition"],
            registry=r,
        )
        self.stream_lag = Gauge(
            "chat_worker_stream_lag",
            "Entries of a partition's stream not yet read by any worker: the backlog "
            "(sampled by its owner).",
            ["partition"],
            registry=r,
        )
        self.partitions_owned = Gauge(
            "chat_worker_partitions_owned", "Partitions this worker holds a lease on.", registry=r
        )
        self.partitions_taken = Counter(
            "chat_worker_partitions_taken",
            "Partition leases this worker took, by whom they were taken from: none (free: "
            "released, or expired) or dead (a worker whose presence connection was gone).",
            ["owner"],
            registry=r,
        )
        self.mongo_wire_connections = Gauge(
            "chat_worker_mongo_wire_connections",
            "Lean MongoDB connections open for inserts and history pages (MONGO_WIRE); "
            "0 while PyMongo makes those calls too.",
            registry=r,
        )
        self.auth_cache = LoopCounter(
            "chat_worker_auth_cache",
            "Token and membership cache look-ups, by result (hit|miss), and entries read "
            "again before they expired (refreshed).",
            ["result"],
            registry=r,
        )
        self.expired = Counter(
            "chat_worker_expired_reads",
            "get_history requests skipped unanswered because their gateway would have "
            "stopped waiting before the reply (the backlog of a join storm).",
            registry=r,
        )
        self.retries = Counter(
            "chat_worker_retries",
            "Batches retried after an error, by cause.",
            ["cause"],
            registry=r,
        )
        self.redis_reconnects = redis_reconnects(r)
        self.ready = ready_gauge(r)
        # The series the batch path counts and times.
        self.event = self.events.labels
        self._mongo_op = self.mongo_seconds.labels
        self._auth_result = self.auth_cache.labels

    # Typed views of the series whose label values are fixed here: a misspelt value fails
    # the type check instead of starting a series no dashboard or priming knows.
    async def mongo_call(self, op: MongoOp, call: Awaitable[_T]) -> _T:
        """Await ``call``, a MongoDB operation, timed as ``chat_worker_mongo_seconds{op}``
        (failures too: a timeout is the slowest call of all)."""
        started = time.perf_counter()
        try:
            return await call
        finally:
            self._mongo_op(op).observe(time.perf_counter() - started)

    def auth_result(self, result: AuthCacheResult) -> LoopCounterSeries:
        """``chat_worker_auth_cache_total{result}``."""
        return self._auth_result(result)

    def retry(self, cause: RetryCause) -> None:
        """Count one batch retried for ``cause``."""
        self.retries.labels(cause).inc()

    def partition_taken(self, owner: TakenFrom) -> None:
        """Count one partition lease taken (``chat_worker_partitions_taken_total``)."""
        self.partitions_taken.labels(owner).inc()


def redis_reconnects(registry: CollectorRegistry) -> Counter:
    """``chat_redis_reconnects_total{component}``: connections re-established after a loss."""
    return Counter(
        "chat_redis_reconnects",
        "Redis connections re-established after a loss, by component.",
        ["component"],
        registry=registry,
    )


def ready_gauge(registry: CollectorRegistry) -> Gauge:
    """``chat_ready``: 1 while /readyz answers 200."""
    return Gauge("chat_ready", "1 while the process is ready to do its job.", registry=registry)


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(registry)


# Label values known in advance. Their series are created at start-up with value 0, so
# a dashboard or an alert on them shows 0 rather than nothing before the first event
# (rate() of an absent series is absent, which reads as "no data", not as "none").
CLOSE_CODES = ("1000", "1001", "1006", "1008", "1009", "1011")
REDIS_COMPONENT_GATEWAY = "gateway_pubsub"
REDIS_COMPONENT_STREAMS = "worker_streams"
REDIS_COMPONENT_LEASES = "worker_leases"
# The worker's MongoDB operations (chat_worker_mongo_seconds{op}).
MongoOp = Literal["auth", "last_seq", "find_existing", "insert", "history"]
MONGO_OPS: tuple[MongoOp, ...] = get_args(MongoOp)
# Why a worker batch was retried (chat_worker_retries_total{cause}).
RetryCause = Literal["already_stored", "stale_owner", "redis", "mongo"]
RETRY_CAUSES: tuple[RetryCause, ...] = get_args(RetryCause)
# Whom a worker took a partition from (chat_worker_partitions_taken_total{owner}).
TakenFrom = Literal["none", "dead"]
TAKEN_FROM: tuple[TakenFrom, ...] = get_args(TakenFrom)
AuthCacheResult = Literal["hit", "miss", "refreshed"]
AUTH_CACHE_RESULTS: tuple[AuthCacheResult, ...] = get_args(AuthCacheResult)


def prime_gateway(metrics: GatewayMetrics) -> None:
    """Create the gateway's labelled series with their known label values."""
    for code in CLOSE_CODES:
        metrics.connections_closed.labels(code)
    for event in (*sorted(protocol.EVENTS), "invalid", "binary"):
        metrics.frames_in.labels(event)
    for event in sorted(protocol.EVENTS):
        metrics.request_seconds.labels(event)
    for kind in ("reply", "push"):
        metrics.frames_out.labels(kind)
    for reply_type in protocol.REPLY_TYPES:
        metrics.replies.labels(reply_type)
    metrics.redis_reconnects.labels(REDIS_COMPONENT_GATEWAY)
    for reason in GRANT_END_REASONS:
        metrics.grants_revoked.labels(reason)
    for by in ("gateway", "worker"):
        metrics.history_reads.labels(by)


def prime_worker(metrics: WorkerMetrics) -> None:
    """Create the worker's labelled counters with their known label values."""
    for event in sorted(protocol.EVENTS):
        for result in protocol.REPLY_TYPES:
            metrics.events.labels(event, result)
    for result in AUTH_CACHE_RESULTS:
        metrics.auth_cache.labels(result)
    for cause in RETRY_CAUSES:
        metrics.retries.labels(cause)
    for owner in TAKEN_FROM:
        metrics.partitions_taken.labels(owner)
    for op in MONGO_OPS:
        metrics.mongo_seconds.labels(op)
    metrics.redis_reconnects.labels(REDIS_COMPONENT_STREAMS)
    metrics.redis_reconnects.labels(REDIS_COMPONENT_LEASES)
