"""Operability (issue #5): metrics that move, health and readiness, graceful drains,
clean logs, and the shipped deploy files.

Everything runs real ``python -m gateway`` / ``python -m worker`` processes (the
dashboard check uses in-process apps: same code, faster), a real nginx in front of two
gateways, and the tools the deploy files are written for (``nginx -t``,
``docker-compose config``, ``promtool``). A missing tool skips its test with the reason,
except under ``CI=true``, where it fails: ``make test`` installs them first
(``deploy/local/prepare.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from deploy.local.prepare import TOOLS_BIN
from deploy.local.servers import free_port
from gateway.producer import StreamProducer
from shared.codec import STREAM_FIELD, StreamEntry, encode_stream_entry, token_digest
from shared.config import Settings
from shared.keys import CONSUMER_GROUP, Keys, partition_of
from shared.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    GatewayMetrics,
    LoopCounter,
    LoopHistogram,
    WorkerMetrics,
)
from tests.conftest import Servers
from tests.support import ROOT, Client, Relay, Seeder, Stack, mongo_store
from worker.auth import Authenticator
from worker.consumer import Consumer, RedisClock, clock_offset
from worker.partitions import (
    DEAD_AFTER,
    FREE_CHECK,
    ORPHAN_GRACE,
    PRESENCE_TRUST,
    PartitionManager,
    judge_absent,
)
from worker.processor import Counters, Item, Processor, entry_age_ms
from worker.store import Store

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chat-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "local.conf.template"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IN_CI = os.environ.get("CI", "").lower() == "true"


# -- helpers -------------------------------------------------------------------------


def tool(name: str) -> str:
    """Path of an installed command; skip (fail under CI=true) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=f"{TOOLS_BIN}:{SBIN_PATH}")
    if found:
        return found
    reason = f"`{name}` is not installed (deploy/local/prepare.py gets it from apt)"
    if IN_CI:
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
    pytest.skip(reason)


@dataclass
class Metrics:
    """One scrape: sample name -> list of (labels, value)."""

    samples: dict[str, list[tuple[dict[str, str], float]]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(
            value
            for got, value in self.samples.get(name, [])
            if all(got.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value ``label`` takes on the samples of ``name``."""
        return {got[label] for got, _ in self.samples.get(name, []) if label in got}


async def scrape(stack: Stack, base_url: str) -> Metrics:
    """GET /metrics and parse it (checks the content type on the way)."""
    async with stack.session.get(base_url + "metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Metrics.parse(await resp.text())


async def readyz(stack: Stack, base_url: str) -> tuple[int, dict[str, Any]]:
    """(status, body) of /readyz; (0, {}) when nothing answers."""
    try:
        async with stack.session.get(
            base_url + "readyz", timeout=aiohttp.ClientTimeout(total=2)
        ) as resp:
            return resp.status, await resp.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0, {}


async def eventually(what: str, check: Any, timeout: float = 30.0, every: float = 0.05) -> Any:
    """Poll the async ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """Wait (without blocking the loop) for a child process to exit; its return code."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "process did not exit"
        await asyncio.sleep(0.02)
    return proc.returncode


def log_lines(log_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, parsed line) for every line every child process wrote."""
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                yield path.name, orjson.loads(line)  # every line must be one JSON object


def assert_logs_clean(log_dir: Path, secrets: list[str]) -> int:
    """Every line is a JSON object with a level; no secret occurs anywhere. Line count."""
    count = 0
    for _name, entry in log_lines(log_dir):
        assert isinstance(entry, dict) and entry.get("level") and entry.get("msg") is not None
        count += 1
    raw = "\n".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))
    for secret in secrets:
        assert secret not in raw, f"a secret leaked into the logs: {secret[:6]}..."
    return count


async def stalled_client(base_url: str, token: str, chat: str) -> asyncio.StreamWriter:
    """A raw WebSocket client that joins ``chat``, reads the reply, then never reads again.

    A small receive buffer and a small stream limit make the kernel and asyncio stop
    taking bytes early, so the gateway's transport and then its send queue fill up.
    """
    host, port = base_url.split("//")[1].strip("/").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    body = orjson.dumps(
        {"chat_id": chat, "token": token, "event_type": "get_history", "message": None}
    )
    assert len(body) < 126  # one short masked text frame
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
    writer.write(bytes([0x81, 0x80 | len(body)]) + mask + masked)
    first = await reader.readexactly(2)
    size = first[1] & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    assert b'"success"' in await reader.readexactly(size)  # joined: pushes will come
    return writer


def message_ids(frames: list[dict[str, Any]]) -> set[int]:
    """Ids of the chat messages carried by successful frames."""
    ids: set[int] = set()
    for frame in frames:
        if frame.get("type") == "success":
            for message in frame.get("messages") or []:
                ids.add(int(message["id"]))
    return ids


# -- 1. metrics move with traffic ----------------------------------------------------


async def test_metrics_move_with_traffic_and_logs_stay_clean(
    stack: Stack, seed: Seeder, log_dir: Path
) -> None:
    """N sends move every counter by N; gauges tell the truth; DEBUG logs leak nothing."""
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    carol, c_token = await seed.user("Carol")
    chat = await seed.chat(alice, bob, carol)
    # A short per-socket queue so a client that stops reading is cut off quickly.
    _, gw = stack.spawn("gateway", log_dir, log_level="DEBUG", send_queue_max_messages=5)
    # A long cache TTL so every send after the joins is a cache hit.
    _, wk = stack.spawn("worker", log_dir, log_level="DEBUG", auth_cache_ttl=60.0)
    await stack.wait_ready(gw)
    await stack.wait_ready(wk)
    a = await stack.client(gw, a_token)
    b = await stack.client(gw, b_token)
    await a.join(chat)
    await b.join(chat)
    g0, w0 = await scrape(stack, gw), await scrape(stack, wk)

    n = 12
    texts = [f"private words {uuid.uuid4().hex}" for _ in range(n)]
    for i, text in enumerate(texts):
        reply = await a.send_text(chat, text, client_msg_id=f"m{i}")
        assert reply["type"] == "success", stack.logs()
    for _ in range(n):
        assert (await b.push())["type"] == "success"
    await a.send_raw("this is not json")
    assert (await a.reply())["type"] == "bad_request"
    unknown = uuid.uuid4().hex
    assert (await a.request("get_history", chat, token=unknown))["type"] == (
        "token_validation_error"
    )
    g1, w1 = await scrape(stack, gw), await scrape(stack, wk)

    def dg(name: str, **labels: str) -> float:
        return g1.value(name, **labels) - g0.value(name, **labels)

    def dw(name: str, **labels: str) -> float:
        return w1.value(name, **labels) - w0.value(name, **labels)

    # Gateway: frames, replies, latency histograms, deliveries.
    assert dg("chat_gateway_frames_in_total", event="send_message") == n
    assert dg("chat_gateway_frames_in_total", event="invalid") == 1
    assert dg("chat_gateway_request_seconds_count", event="send_message") == n
    assert dg("chat_gateway_request_seconds_count", event="get_history") == 1
    assert dg("chat_gateway_replies_total", type="success") == n
    assert dg("chat_gateway_replies_total", type="bad_request") == 1
    assert dg("chat_gateway_replies_total", type="token_validation_error") == 1
    assert dg("chat_gateway_frames_out_total", kind="reply") == n + 2
    assert dg("chat_gateway_frames_out_total", kind="push") == n
    assert dg("chat_gateway_deliveries_total") == n
    assert dg("chat_gateway_delivery_seconds_count") == n
    assert dg("chat_gateway_request_seconds_sum", event="send_message") > 0
    assert g1.value("chat_gateway_sockets_open") == 2
    assert g1.value("chat_gateway_connections_opened_total") == 2
    assert g1.value("chat_gateway_chat_channels") == 1
    assert g1.value("chat_gateway_requests_in_flight") == 0
    assert g1.value("chat_ready") == 1
    assert g1.value("chat_gateway_send_queue_drops_total") == 0
    assert g1.value("chat_gateway_slow_consumer_disconnects_total") == 0
    assert g1.label_values("chat_redis_reconnects_total", "component") == {"gateway_pubsub"}

    # Worker: events by type and result, stores, batches, MongoDB latency, auth cache.
    assert dw("chat_worker_messages_stored_total") == n
    assert dw("chat_worker_events_total", event="send_message", result="success") == n
    assert dw("chat_worker_events_total", event="get_history", result="token_validation_error") == 1
    assert dw("chat_worker_batch_size_sum") == n + 1  # every stream entry is in one batch
    assert 1 <= dw("chat_worker_batch_size_count") <= n + 1
    # Each new entry's wait in its stream, each batch's time from read to ack.
    assert dw("chat_worker_stream_wait_seconds_count") == n + 1
    assert dw("chat_worker_batch_seconds_count") == dw("chat_worker_batch_size_count")
    assert dw("chat_worker_batch_seconds_sum") > 0
    assert 1 <= dw("chat_worker_mongo_seconds_count", op="insert") <= n
    assert dw("chat_worker_auth_cache_total", result="hit") >= n
    assert dw("chat_worker_auth_cache_total", result="miss") >= 1  # the unknown token
    assert w1.value("chat_worker_partitions_owned") == stack.settings.partitions
    # Known label values exist from start-up, at 0 until they happen; an operation or
    # cause the worker uses without priming it would show up here as an extra value.
    causes = {"already_stored", "stale_owner", "redis", "mongo"}
    assert w1.label_values("chat_worker_retries_total", "cause") == causes
    assert all(w1.value("chat_worker_retries_total", cause=c) == 0 for c in causes)
    assert w1.label_values("chat_worker_partitions_taken_total", "owner") == {"none", "dead"}
    assert w1.value("chat_worker_partitions_taken_total", owner="dead") == 0
    assert w1.label_values("chat_worker_mongo_seconds_count", "op") == {
        "auth", "last_seq", "find_existing", "insert", "history",
    }  # fmt: skip
    assert w1.value("chat_worker_mongo_wire_connections") >= 1  # inserts took the lean path
    assert w1.value("chat_ready") == 1
    # Stream gauges are read at scrape time: this partition's stream holds every
    # request so far (2 joins + n sends + 1 history), none of them unacknowledged.
    partition = str(partition_of(chat, stack.settings.partitions))
    assert w1.value("chat_worker_stream_length", partition=partition) >= n + 3
    assert w1.value("chat_worker_stream_pending", partition=partition) == 0
    assert w1.value("chat_worker_stream_lag", partition=partition) == 0  # every entry read
    assert w1.label_values("chat_worker_stream_length", "partition") == {
        str(p) for p in range(stack.settings.partitions)
    }
    assert w1.label_values("chat_redis_reconnects_total", "component") == {
        "worker_streams",
        "worker_leases",
    }

    # Closing a socket: counted by close code, the gauge goes down.
    await b.close()

    async def closed_counted() -> bool:
        g2 = await scrape(stack, gw)
        return (
            g2.value("chat_gateway_connections_closed_total", code="1000") == 1
            and g2.value("chat_gateway_sockets_open") == 1
        )

    await eventually("the close to be counted", closed_counted)

    # Labels of bounded cardinality: no chat id, user id or token anywhere in /metrics.
    for base in (gw, wk):
        async with stack.session.get(base + "metrics") as resp:
            exposition = await resp.text()
        for secret in (chat, alice, bob, a_token, b_token, unknown):
            assert f'"{secret}"' not in exposition

    # A client that stops reading: its queue overflows, it is cut off and counted.
    slow = await stalled_client(gw, c_token, chat)
    # 16 kB a message (4-byte characters); spread over three sockets, each well within
    # its rate limit.
    big = "\U0001f600" * 4000
    senders = [a, await stack.client(gw, a_token), await stack.client(gw, a_token)]
    for i in range(450):
        assert (await senders[i % 3].send_text(chat, big))["type"] == "success"
        if i % 20 == 19:
            g3 = await scrape(stack, gw)
            if g3.value("chat_gateway_slow_consumer_disconnects_total") >= 1:
                break
    assert g3.value("chat_gateway_slow_consumer_disconnects_total") == 1
    assert g3.value("chat_gateway_send_queue_drops_total") >= 1
    slow.close()

    # DEBUG logs, after all that traffic: JSON lines only, no token, no text.
    await a.close()
    tokens = [a_token, b_token, c_token, unknown]
    lines = assert_logs_clean(log_dir, [*tokens, *map(token_digest, tokens), *texts])
    assert lines > 0


# -- 2. the dashboard and the alerts only use exported metrics ------------------------


def dashboard_queries() -> list[str]:
    """Every PromQL expression in the Grafana dashboard (panels nested in rows too)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            expr = node.get("expr")
            if isinstance(expr, str):
                found.append(expr)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def alert_queries() -> list[str]:
    """Every ``expr`` of alerts.yml (single-line or block scalar), without a YAML parser."""
    exprs: list[str] = []
    lines = ALERTS.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not match:
            continue
        indent, rest = len(match.group(1)), match.group(2).strip()
        if rest not in ("|", ">", "|-", ">-"):
            exprs.append(rest)
            continue
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following.strip())
        exprs.append(" ".join(body))
    return exprs


def test_stream_wait_counts_from_the_middle_of_the_stamped_millisecond() -> None:
    """An entry id holds the millisecond it was added in, truncated. Measured from the
    start of that millisecond, every wait came out 0.5 ms long on average: the mean over
    adds spread evenly across a millisecond must come out right."""
    adds = [1_000.0 + k / 100 for k in range(100)]  # true add times within ms 1000
    waits = [entry_age_ms(f"{int(t)}-0", t + 2.0) for t in adds]  # each read 2 ms later
    assert sum(waits) / len(waits) == pytest.approx(2.0, abs=0.01)
    assert entry_age_ms("1000-7", 1_000.2) == 0.0  # never negative
    assert entry_age_ms("1000-0", 1_003.5) == 3.0


async def test_a_push_is_stamped_stored_when_the_insert_is_acknowledged(
    settings: Settings, seed: Seeder
) -> None:
    """``chat_gateway_delivery_seconds`` runs from a push's ``stored_at`` to its write to
    the sockets. The stamp is taken once MongoDB acknowledged the insert, so the
    histogram does not count the insert itself (a clock that moves only while the
    insert runs tells the two apart)."""
    user, token = await seed.user("Alice")
    chat = await seed.chat(user)
    clock = [1_000.0]

    class SlowStore(Store):
        async def insert_messages(self, docs: list[dict[str, Any]]) -> None:
            await super().insert_messages(docs)
            clock[0] += 60.0  # the insert took a minute on this clock

    client, store = await mongo_store(settings)
    try:
        slow = SlowStore(store.db, store.wire)
        metrics = WorkerMetrics()
        processor = Processor(
            slow, Authenticator(slow, 1.0, metrics), Counters(slow), metrics, clock=lambda: clock[0]
        )
        entry = StreamEntry(
            "gw", 1, 1, "r1", chat, token_digest(token), "send_message",
            {"type": "text", "text": "hi"}, 1_000.0, 5.0, True,
        )  # fmt: skip
        outcome = await processor.process([Item("s", "1-0", 0, entry)], suspect=False)
    finally:
        await client.close()
    (push,) = outcome.pushes
    assert push.stored_at == 1_060.0


def test_loop_metrics_are_exposed_as_prometheus_client_would() -> None:
    """The per-message series are plain numbers behind a collector (no lock per
    increment); /metrics must show them exactly as prometheus_client's own Counter and
    Histogram would, values, labels, bucket bounds and all."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    pairs: list[tuple[Any, Any]] = [
        (
            LoopCounter("t_plain", "A plain counter.", registry=ours),
            Counter("t_plain", "A plain counter.", registry=theirs),
        ),
        (
            LoopCounter("t_by", "By kind and code.", ["kind", "code"], registry=ours),
            Counter("t_by", "By kind and code.", ["kind", "code"], registry=theirs),
        ),
        (
            LoopHistogram("t_seconds", "Latency.", buckets=LATENCY_BUCKETS, registry=ours),
            Histogram("t_seconds", "Latency.", buckets=LATENCY_BUCKETS, registry=theirs),
        ),
        (
            LoopHistogram("t_size", "By op.", ["op"], buckets=BATCH_BUCKETS, registry=ours),
            Histogram("t_size", "By op.", ["op"], buckets=BATCH_BUCKETS, registry=theirs),
        ),
    ]
    observed = [0.0, 0.00025, 0.0003, 0.003, 0.0099, 10.0, 11.0, 1e9, -1.0, 1, 2, 1000, 2001]
    for metric in pairs[0]:
        metric.inc()
        metric.inc(2.5)
        with pytest.raises(ValueError):
            metric.inc(-1)
    for metric in pairs[1]:
        metric.labels("a", "1").inc(3)
        metric.labels("b", 2)  # a series at 0; label values are strings
        with pytest.raises(ValueError):
            metric.labels("a")
    for metric in pairs[2]:
        for value in observed:
            metric.observe(value)
    for metric in pairs[3]:
        metric.labels("insert")  # empty
        for value in observed:
            metric.labels("find").observe(value)
    assert generate_latest(ours).decode() == generate_latest(theirs).decode()
    assert ours.get_sample_value("t_by_total", {"kind": "a", "code": "1"}) == 3


def test_bound_children_are_the_labelled_series() -> None:
    """The batch path's bound series are the metric's own: what they count is what
    /metrics shows under those labels, and each is bound once."""
    metrics = WorkerMetrics()
    metrics.event("get_history", "success").inc()
    metrics.event("get_history", "success").inc(2)
    metrics.event("send_message", "chat_not_exists").inc()
    metrics.mongo_seconds.labels("history").observe(0.002)
    metrics.auth_result("hit").inc(5)
    metrics.retry("redis")
    assert metrics.event("get_history", "success") is metrics.events.labels(
        "get_history", "success"
    )
    page = Metrics.parse(generate_latest(metrics.registry).decode())
    assert page.value("chat_worker_events_total", event="get_history", result="success") == 3
    assert (
        page.value("chat_worker_events_total", event="send_message", result="chat_not_exists") == 1
    )
    assert page.value("chat_worker_mongo_seconds_count", op="history") == 1
    assert page.value("chat_worker_mongo_seconds_sum", op="history") == pytest.approx(0.002)
    assert page.value("chat_worker_auth_cache_total", result="hit") == 5
    assert page.value("chat_worker_retries_total", cause="redis") == 1


def test_redis_clock_believes_the_shortest_round_trip() -> None:
    """One stretched round trip would put every stream wait of the next 30 s off by half
    of it: the offset comes from the reading with the least uncertainty, not from the
    first, the last or their mean."""
    readings = [
        (100.0, 110.0030, 100.0040),  # round trip 4 ms: offset 10.0010
        (101.0, 111.0001, 101.0002),  # 0.2 ms: offset 10.0000
        (102.0, 112.0010, 102.0060),  # 6 ms: offset 9.9980
    ]
    assert clock_offset(readings) == pytest.approx(10.0, abs=1e-9)
    assert clock_offset(readings[:1]) == pytest.approx(10.001, abs=1e-9)


async def _time_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_time", {}).get("calls", 0))


async def test_redis_clock_reads_redis_time_on_first_use_only(redis: Redis) -> None:
    clock = RedisClock(refresh=30.0, samples=5)
    calls = await _time_calls(redis)
    now = await clock.now_ms(redis)
    assert await _time_calls(redis) - calls == 5
    # The same machine's clock: the estimate is the local time (a unit slip is 1,000x off).
    assert abs(now - time.time() * 1000.0) < 100.0
    await clock.now_ms(redis)  # later reads are local: no batch waits for TIME
    assert await _time_calls(redis) - calls == 5


async def test_redis_clock_is_read_again_in_the_background(redis: Redis) -> None:
    clock = RedisClock(refresh=0.05, samples=5)
    await clock.now_ms(redis)
    calls = await _time_calls(redis)
    task = asyncio.create_task(clock.run(redis))
    await asyncio.sleep(0.4)
    assert await _time_calls(redis) - calls >= 10  # two refreshes at least, 5 readings each
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_redis_clock_keeps_its_offset_while_redis_is_unreachable(redis: Redis) -> None:
    clock = RedisClock(refresh=0.05, samples=5)
    before = await clock.now_ms(redis) - time.time() * 1000.0
    gone = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    try:
        task = asyncio.create_task(clock.run(gone))
        await asyncio.sleep(0.4)
        assert not task.done()  # failed reads are retried, not fatal
        after = await clock.now_ms(gone) - time.time() * 1000.0  # no TIME: it would fail
        assert abs(after - before) < 5.0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await gone.aclose()


SELECTOR = re.compile(r"\b(chat_[a-z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
# Added by Prometheus to every series of a scrape target, not exported by the processes.
TARGET_LABELS = {"job", "instance"}
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


async def test_dashboard_and_alerts_use_only_exported_metrics(
    stack: Stack, seed: Seeder, log_dir: Path
) -> None:
    """Parse the dashboard and alerts.yml; every chat_ series, label and matched value
    they use exists in what a gateway and a worker export after a little traffic."""
    queries = dashboard_queries()
    assert len(queries) >= 20
    joined = " ".join(queries)
    # The panels the issue asks for are there.
    for needle in (
        "chat_gateway_sockets_open",
        'chat_gateway_frames_in_total{event=~"send_message|send_file"}',
        "chat_gateway_deliveries_total",
        "histogram_quantile(0.5, sum by (le, event) (rate(chat_gateway_request_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, event) (rate(chat_gateway_request_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(chat_gateway_delivery_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(chat_gateway_delivery_seconds_bucket",
        "sum by (type) (rate(chat_gateway_replies_total",
        "chat_worker_stream_pending",
        "chat_worker_stream_lag",
        "sum by (instance) (chat_worker_partitions_owned)",
    ):
        assert needle in joined, f"dashboard lacks {needle}"
    # Grafana keys a panel's queries by refId: a repeated one hides a query.
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in [p for top in panels for p in (top, *top.get("panels", []))]:
        ref_ids = [t["refId"] for t in panel.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), (panel["title"], ref_ids)

    alice, token = await seed.user("Alice")
    chat = await seed.chat(alice)
    _, gw = stack.spawn("gateway", log_dir)
    _, wk = stack.spawn("worker", log_dir)
    await stack.wait_ready(gw)
    await stack.wait_ready(wk)
    client = await stack.client(gw, token)
    await client.join(chat)
    assert (await client.send_text(chat, "hello"))["type"] == "success"
    exported = await scrape(stack, gw)
    worker_metrics = await scrape(stack, wk)
    samples = {**exported.samples, **worker_metrics.samples}
    merged = Metrics(samples)

    problems: list[str] = []
    for source, exprs in (("dashboard", queries), ("alerts.yml", alert_queries())):
        for expr in exprs:
            names = set()
            for name, matchers in SELECTOR.findall(expr):
                names.add(name)
                if name not in samples:
                    problems.append(f"{source}: {name} is not exported ({expr})")
                    continue
                for label, op, value in MATCHER.findall(matchers or ""):
                    if label in TARGET_LABELS:
                        continue
                    have = merged.label_values(name, label)
                    if not have:
                        problems.append(f"{source}: {name} has no label {label}")
                    elif op == "=" and value not in have:
                        problems.append(f"{source}: {name}{{{label}={value!r}}} never exported")
                    elif op == "=~" and not any(re.fullmatch(value, v) for v in have):
                        problems.append(f"{source}: {name}{{{label}=~{value!r}}} matches nothing")
            for group in GROUPING.findall(expr):
                for label in (part.strip() for part in group.split(",")):
                    if not label or label == "le" or label in TARGET_LABELS:
                        continue  # le: histogram buckets
                    if not any(merged.label_values(name, label) for name in names):
                        problems.append(f"{source}: grouping by {label} matches no label")
    assert problems == []
    # And the other way: every chat_ series a process exports is on the dashboard, so an
    # operator sees what the code counts (a take-over, a retry, a refused handshake).
    shown = {_family(name) for name, _ in SELECTOR.findall(joined)}
    exported_families = {_family(name) for name in samples if name.startswith("chat_")}
    assert exported_families - shown == set()


def _family(sample: str) -> str:
    """A metric family's name from one of its sample names (counter, histogram)."""
    return re.sub(r"_(total|created|bucket|sum|count)$", "", sample)


# -- 3. Redis outage: readiness flips, reconnects are counted ------------------------


async def test_a_send_answered_while_its_gateway_was_not_listening_is_answered_from_mongodb(
    stack: Stack, seed: Seeder, log_dir: Path, redis: Redis
) -> None:
    """A send is written; its gateway's pub/sub connection is dropped (here: its Redis
    user loses its channels, which closes the connection and refuses a resubscription);
    the worker stores the message and publishes the reply to nobody. Once the gateway
    hears its channels again it finds the send stored by its entry id and answers it as
    the worker did, instead of server_error at the request's timeout."""
    user = f"gw{uuid.uuid4().hex[:6]}"
    await redis.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all")
    url = stack.settings.redis_url.replace("redis://", f"redis://{user}:pw@", 1)
    client_db, store = await mongo_store(stack.settings)
    try:
        alice, token = await seed.user("Alice")
        chat = await seed.chat(alice)
        worker, wk = stack.spawn("worker", log_dir)
        _, gw = stack.spawn("gateway", log_dir, redis_url=url, request_timeout=30.0)
        await stack.wait_ready(wk)
        await stack.wait_ready(gw)
        client = await stack.client(gw, token)
        await client.join(chat)
        first = await client.send_text(chat, "heard")
        assert first["type"] == "success"
        stream = Keys(stack.settings.redis_prefix).stream(
            partition_of(chat, stack.settings.partitions)
        )
        written = await redis.xlen(stream)

        async def stored() -> bool:
            return await store.messages.count_documents({"chat_id": chat}) == 2

        os.kill(worker.pid, signal.SIGSTOP)
        try:
            await client.queue_text(chat, "answered unheard", "unheard")

            async def in_stream() -> bool:
                return await redis.xlen(stream) > written

            await eventually("the send written", in_stream)
            await redis.execute_command("ACL", "SETUSER", user, "resetchannels")

            async def not_listening() -> bool:
                return (await readyz(stack, gw))[0] == 503

            await eventually("the gateway to stop hearing its channels", not_listening)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        await eventually("the message stored", stored)
        await asyncio.sleep(0.3)  # and its reply published, to nobody
        await redis.execute_command("ACL", "SETUSER", user, "&*")
        reply = await client.reply(timeout=10.0)  # the request's timeout is 30 s
        assert (reply["request_id"], reply["type"]) == ("unheard", "success"), reply
        [message] = reply["messages"]
        assert message["text"] == "answered unheard" and message["is_my"] is True
        assert int(message["id"]) == int(first["messages"][0]["id"]) + 1
        # The reply stood for the message's push on this socket, in id order, as a
        # worker's reply with its grant does: the chat's gap fill does not push it again.
        await client.no_push(1.0)
        recovered = await scrape(stack, gw)
        assert recovered.value("chat_gateway_replies_recovered_total") == 1
        # The socket keeps its grant: the chat's next message reaches it as before.
        assert (await client.send_text(chat, "after"))["type"] == "success"
    finally:
        await client_db.close()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_an_xadd_whose_answer_was_lost_is_not_written_again(
    settings: Settings, servers: Servers, redis: Redis, cleanup: None
) -> None:
    """Redis takes a pipeline of XADDs, and its answer is lost with the connection. The
    producer cannot tell whether the entries were written: it finds them in their
    streams before writing again, so each request is in its stream once (a send written
    twice would be stored twice) and its entry id is still reported."""
    relay = Relay(servers.redis.port)
    await relay.start()
    db = urllib.parse.urlsplit(settings.redis_url).path or "/0"
    url = f"redis://127.0.0.1:{relay.port}{db}"
    producer = StreamProducer(
        url, name="test-xadd", batch=10, max_buffered=100, maxlen=1000,
        expire_after=30.0, backoff_cap=0.05,
    )  # fmt: skip
    reported: list[tuple[int, bytes]] = []
    producer.on_written = lambda key, entry_id: reported.append((key, entry_id))
    keys = Keys(settings.redis_prefix)
    task = asyncio.create_task(producer.run())
    try:
        relay.lose_answer_to(b"XADD")
        assert producer.submit(keys.stream(0), b"first", 1)
        assert producer.submit(keys.stream(1), b"second", 2)

        async def both_reported() -> bool:
            return len(reported) == 2

        await eventually("both entries reported written", both_reported)
        assert relay.answers_lost == 1
        first = [(i, f[STREAM_FIELD]) for i, f in await redis.xrange(keys.stream(0))]
        second = [(i, f[STREAM_FIELD]) for i, f in await redis.xrange(keys.stream(1))]
        assert [p for _, p in first] == [b"first"] and [p for _, p in second] == [b"second"]
        assert sorted(reported) == [(1, first[0][0]), (2, second[0][0])]
        # And on: the next entry is written once, on the connection opened again.
        assert producer.submit(keys.stream(0), b"third", 3)
        await eventually("the third reported", lambda: _has(reported, 3))
        assert [f[STREAM_FIELD] for _, f in await redis.xrange(keys.stream(0))] == [
            b"first", b"third"
        ]  # fmt: skip
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay.close()


async def _has(reported: list[tuple[int, bytes]], key: int) -> bool:
    return any(k == key for k, _ in reported)


async def test_requests_are_written_only_while_the_gateway_hears_replies(
    settings: Settings, redis: Redis, cleanup: None
) -> None:
    """While the gateway's pub/sub is down (a Redis restart), a worker would answer into
    a channel nobody listens to and the client would wait for its timeout: the producer
    holds requests until pub/sub is back, and drops those whose clients were already
    answered (older than the request timeout)."""
    listening = asyncio.Event()
    producer = StreamProducer(
        settings.redis_url, name="test-xadd", batch=10, max_buffered=100, maxlen=1000,
        expire_after=0.5, listening=listening,
    )  # fmt: skip
    stream = Keys(settings.redis_prefix).stream(0)
    task = asyncio.create_task(producer.run())
    try:
        assert producer.submit(stream, b"answered by its timeout meanwhile")
        await asyncio.sleep(0.6)
        assert producer.submit(stream, b"still awaited")
        await asyncio.sleep(0.2)
        assert await redis.xlen(stream) == 0 and producer.buffered == 2
        listening.set()

        async def written() -> list[bytes]:
            return [fields[STREAM_FIELD] for _, fields in await redis.xrange(stream)]

        assert await eventually("the request written", written) == [b"still awaited"]
        assert producer.buffered == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def _owning_consumer(
    settings: Settings, redis: Redis, metrics: WorkerMetrics
) -> AsyncIterator[tuple[Consumer, PartitionManager, Keys]]:
    """A consumer whose worker holds every partition, with no read loop running."""
    keys = Keys(settings.redis_prefix)
    leases = PartitionManager(
        redis, keys, settings.node_id, settings.partitions, settings.lease_seconds, metrics
    )
    client, store = await mongo_store(settings)
    counters = Counters(store)
    processor = Processor(store, Authenticator(store, 1.0, metrics), counters, metrics)
    consumer = Consumer(
        redis, keys, settings.node_id, leases, processor, counters, metrics,
        batch=10, block_ms=100, backoff_cap=0.5, redis_url=settings.redis_url,
    )  # fmt: skip
    try:
        await leases.tick()
        yield consumer, leases, keys
    finally:
        await leases.release_all()
        await client.close()


async def test_an_entry_left_pending_by_another_consumer_is_claimed_and_handled(
    settings: Settings, redis: Redis, seed: Seeder
) -> None:
    """A send read by a worker that then lost its partition, after the new owner had
    claimed that partition's pending entries, stays pending under the old one: the
    owner claims it once it has been idle for STUCK_AFTER_LEASES leases, and stores
    and acknowledges it (before, it stayed pending for good, and held back the trim)."""
    user, token = await seed.user("Alice")
    chat = await seed.chat(user)
    metrics = WorkerMetrics()
    async with _owning_consumer(settings, redis, metrics) as (consumer, leases, keys):
        stream = keys.stream(partition_of(chat, settings.partitions))
        entry = StreamEntry(
            "gw", 1, 1, "left", chat, token_digest(token), "send_message",
            {"type": "text", "text": "left behind"}, time.time(), 5.0, True,
        )  # fmt: skip
        run = asyncio.gather(consumer.run(), leases.run())
        try:
            # Once the consumer has taken its partitions (and claimed what was pending),
            # another consumer reads the entry as it is added (atomically: the running
            # loop must not read it first), as if that was long ago.
            async def taken() -> bool:
                return not leases._fresh and stream in consumer._groups

            await eventually("the partitions taken", taken)
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xadd(stream, {STREAM_FIELD: encode_stream_entry(entry)})
                pipe.xreadgroup(CONSUMER_GROUP, "gone-worker", {stream: ">"})
                entry_id, _ = await pipe.execute()
            idle = int(3 * settings.lease_seconds * 1000)
            await redis.xclaim(stream, CONSUMER_GROUP, "gone-worker", 0, [entry_id], idle=idle)

            async def stored() -> bool:
                pending = await redis.xpending(stream, CONSUMER_GROUP)
                found = await seed.store.messages.count_documents({"chat_id": chat})
                return pending["pending"] == 0 and found == 1

            await eventually("the stuck entry to be handled", stored, timeout=10)
        finally:
            consumer.stopping = True
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        doc = await seed.store.messages.find_one({"chat_id": chat})
        assert doc is not None and doc["text"] == "left behind" and doc["seq"] == 1


async def test_stream_gauges_tell_backlog_from_pending(
    settings: Settings, redis: Redis, cleanup: None
) -> None:
    """``stream_lag`` counts entries no worker has read yet, ``stream_pending`` those
    read and not yet acknowledged: a worker that falls behind shows as lag."""
    metrics = WorkerMetrics()
    async with _owning_consumer(settings, redis, metrics) as (consumer, leases, keys):
        stream = keys.stream(1)
        await redis.xadd(stream, {"x": "1"})

        def gauges() -> tuple[float, ...]:
            """(length, lag, pending) of partition 1 as /metrics would show them."""
            parsed = Metrics.parse(generate_latest(metrics.registry).decode())
            return tuple(
                parsed.value(f"chat_worker_stream_{name}", partition="1")
                for name in ("length", "lag", "pending")
            )

        # No group yet: nothing has been read.
        await consumer.sample_streams()
        assert gauges() == (1, 1, 0)
        await redis.xgroup_create(stream, CONSUMER_GROUP, id="0")
        for n in range(4):
            await redis.xadd(stream, {"x": str(n)})
        await consumer.sample_streams()
        assert gauges() == (5, 5, 0)
        # A worker reads three: they are pending, two are still waiting.
        await redis.xreadgroup(CONSUMER_GROUP, "w", {stream: ">"}, count=3)
        await consumer.sample_streams()
        assert gauges() == (5, 2, 3)
        read = await redis.xreadgroup(CONSUMER_GROUP, "w", {stream: ">"}, count=10)
        await redis.xack(stream, CONSUMER_GROUP, *[i for i, _ in read[0][1]])
        await consumer.sample_streams()
        assert gauges() == (5, 0, 3)
        # Another worker takes the partition over: this one stops reporting it.
        await leases.release(1)
        await consumer.sample_streams()
        assert "1" not in Metrics.parse(generate_latest(metrics.registry).decode()).label_values(
            "chat_worker_stream_lag", "partition"
        )


async def test_trim_removes_only_what_every_worker_is_done_with(
    settings: Settings, redis: Redis, cleanup: None
) -> None:
    """Acknowledged entries leave an owned stream; pending and unread ones stay, and a
    stream the worker does not own is left alone."""
    async with _owning_consumer(settings, redis, WorkerMetrics()) as (consumer, leases, keys):
        stream = keys.stream(2)
        await redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(1000):
                pipe.xadd(stream, {"n": str(n)})
            ids = await pipe.execute()
        read = await redis.xreadgroup(CONSUMER_GROUP, "w", {stream: ">"}, count=800)
        delivered = [i for i, _ in read[0][1]]
        await redis.xack(stream, CONSUMER_GROUP, *delivered[:550])
        removed = await consumer.trim_streams()
        left = [i for i, _ in await redis.xrange(stream)]
        # Pending (550-799) and unread (800-999) all stay; whole nodes of acked go (a
        # node holds up to 100 entries at Redis's defaults).
        assert left[-450:] == ids[550:]
        assert removed == 1000 - len(left) and removed >= 400

        # All read and acknowledged, trimmed in the background: what stays is the node
        # of the last entry delivered.
        await redis.xack(stream, CONSUMER_GROUP, *delivered[550:])
        rest = await redis.xreadgroup(CONSUMER_GROUP, "w", {stream: ">"}, count=1000)
        await redis.xack(stream, CONSUMER_GROUP, *[i for i, _ in rest[0][1]])
        task = asyncio.create_task(consumer.run_trim(every=0.05))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await redis.xlen(stream) <= 100
        assert (await redis.xrange(stream))[-1][0] == ids[-1]

        # Another worker's partition: not this one's to trim.
        await leases.release(2)
        before = await redis.xlen(stream)
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(300):
                pipe.xadd(stream, {"n": str(n)})
            await pipe.execute()
        more = await redis.xreadgroup(CONSUMER_GROUP, "w", {stream: ">"}, count=300)
        await redis.xack(stream, CONSUMER_GROUP, *[i for i, _ in more[0][1]])
        assert await consumer.trim_streams() == 0
        assert await redis.xlen(stream) == before + 300


async def test_redis_outage_flips_readiness_and_counts_reconnects(
    stack: Stack, seed: Seeder, log_dir: Path, servers: Servers
) -> None:
    """Stop Redis: both /readyz answer 503 (and /healthz 200), and sends beyond the
    gateway's XADD buffer are refused at once and counted; start it: both ready again,
    each counted one Redis reconnect, and a send works."""
    alice, token = await seed.user("Alice")
    chat = await seed.chat(alice)
    _, gw = stack.spawn("gateway", log_dir, xadd_batch=1)  # an XADD buffer of 64
    _, wk = stack.spawn("worker", log_dir, log_level="INFO")
    await stack.wait_ready(gw)
    await stack.wait_ready(wk)
    client = await stack.client(gw, token)
    await client.join(chat)

    async def both(status: int) -> bool:
        statuses = [(await readyz(stack, url))[0] for url in (gw, wk)]
        return statuses == [status, status]

    servers.redis.stop()
    try:
        await eventually("both to turn unready", lambda: both(503))
        for url in (gw, wk):
            async with stack.session.get(url + "healthz") as resp:
                assert resp.status == 200  # alive, just not ready
        _, body = await readyz(stack, gw)
        assert body["checks"]["pubsub"] is False
        _, body = await readyz(stack, wk)
        assert body["checks"]["redis"] is False
        gm, wm = await scrape(stack, gw), await scrape(stack, wk)
        assert gm.value("chat_ready") == 0 and wm.value("chat_ready") == 0

        # Sends keep coming: the XADD buffer fills to its bound (XADD_BATCH x 64, one
        # more may be in the failing pipeline), and the rest are refused at once.
        flood = await stack.client(gw, token)
        bound = 64
        for i in range(bound + 11):
            frame = {"chat_id": chat, "token": token, "event_type": "send_message",
                     "message": {"type": "text", "text": f"f{i}"}, "request_id": f"f{i}"}  # fmt: skip
            await flood.ws.send_str(orjson.dumps(frame).decode())
        refused = []
        with contextlib.suppress(TimeoutError):
            while True:
                refused.append(await flood.reply(timeout=1.0))
        assert {(r["type"], r["detail"]) for r in refused} == {
            ("server_error", "Server is overloaded, retry later")
        }
        assert len(refused) in (10, 11), refused
        gm2 = await scrape(stack, gw)
        assert gm2.value("chat_gateway_stream_buffer") == bound
        assert gm2.value("chat_gateway_overload_refusals_total") - gm.value(
            "chat_gateway_overload_refusals_total"
        ) == len(refused)
        await flood.close()
    finally:
        if not servers.redis.running:
            servers.redis.start()
    await eventually("both to be ready again", lambda: both(200))

    async def reconnects_counted() -> bool:
        gm, wm = await scrape(stack, gw), await scrape(stack, wk)
        return (
            gm.value("chat_redis_reconnects_total", component="gateway_pubsub") >= 1
            and wm.value("chat_redis_reconnects_total") >= 1
            and gm.value("chat_ready") == 1
            and wm.value("chat_ready") == 1
        )

    await eventually("both to count a Redis reconnect", reconnects_counted)
    assert (await client.send_text(chat, "after the outage"))["type"] == "success"


# -- 4. worker drain: leases handed over at once ---------------------------------------


async def test_a_worker_below_its_share_sees_released_partitions_between_rounds(
    settings: Settings, redis: Redis, cleanup: None
) -> None:
    """What makes a hand-over quick: between lease rounds, a worker looks for released
    partitions: at once when it holds less than its fair share, after a grace when the
    partition is an orphan (real Redis, lease managers driven round by round, no loops)."""
    keys = Keys(settings.redis_prefix)
    a, b = (
        PartitionManager(
            redis, keys, node, settings.partitions, settings.lease_seconds, WorkerMetrics()
        )
        for node in (f"{settings.node_id}-a", f"{settings.node_id}-b")
    )
    try:
        await a.tick()
        assert a.owned == settings.partitions
        assert not await a.free_for_me()  # nothing free
        await b.tick()  # joins: its share is half, but nothing is free yet
        assert b.owned == 0
        assert not await b.free_for_me()
        await a.tick()  # sees two live workers: marks its surplus
        await a.hand_back_surplus()
        assert a.owned == settings.partitions // 2
        assert await b.free_for_me()  # free, and below its share
        assert not await a.free_for_me()  # free too, but a holds its share
        await b.tick()
        assert b.owned == settings.partitions // 2
        assert not await b.free_for_me()
        await a.release_all()  # a drains: b's share is now every partition
        assert await b.free_for_me()
        await b.tick()
        assert b.owned == settings.partitions
        # An orphan (its owner died, its lease expired): b already holds its share, so
        # it waits ORPHAN_GRACE for a worker below its share, then takes it anyway.
        c = PartitionManager(
            redis, keys, f"{settings.node_id}-c", settings.partitions, 0.2, WorkerMetrics()
        )
        await c.tick()  # short leases, never renewed: c "dies" holding nothing yet
        await b.tick()  # sees two live workers: hands half back
        await b.hand_back_surplus()
        await c.tick()  # takes them, then dies
        assert c.owned == settings.partitions // 2
        await asyncio.sleep(0.3)  # c's leases expire
        assert not await b.free_for_me()  # free, but b holds its share: not yet
        await asyncio.sleep(ORPHAN_GRACE)
        assert await b.free_for_me()
        await b.tick()
        assert b.owned == settings.partitions
    finally:
        await a.release_all()
        await b.release_all()


def test_a_worker_is_dead_once_its_registered_connection_has_been_gone_long_enough() -> None:
    memory: dict[str, tuple[str, float]] = {}
    dead, memory = judge_absent({"a": "7", "b": "9"}, memory, now=10.0, after=1.0)
    assert dead == set() and memory == {"a": ("7", 10.0), "b": ("9", 10.0)}
    # a reconnected (a new id, also not seen yet): its count starts again; b was seen
    # present (not absent any more): forgotten.
    dead, memory = judge_absent({"a": "12"}, memory, now=10.6, after=1.0)
    assert dead == set() and memory == {"a": ("12", 10.6)}
    dead, memory = judge_absent({"a": "12", "b": "9"}, memory, now=11.6, after=1.0)
    assert dead == {"a"} and memory == {"a": ("12", 10.6), "b": ("9", 11.6)}


async def test_a_live_worker_that_loses_its_presence_connection_keeps_its_partitions(
    settings: Settings, redis: Redis, cleanup: None
) -> None:
    """Its presence connection killed (as a Redis restart would), a worker registers a
    new one well within DEAD_AFTER, so another worker looking all along never takes it
    for dead; it trusts its leases again only once renewed after that registration.
    Once its presence stops for good, it stops trusting them within PRESENCE_TRUST,
    before the other takes it for dead and takes them; then it gives them up."""
    keys = Keys(settings.redis_prefix)
    a, b = (
        PartitionManager(
            redis,
            keys,
            node,
            settings.partitions,
            60.0,
            WorkerMetrics(),
            redis_url=settings.redis_url,
        )
        for node in (f"{settings.node_id}-a", f"{settings.node_id}-b")
    )
    presence = asyncio.create_task(a.run_presence())
    try:

        async def registered() -> bytes | None:
            return await redis.hget(keys.worker_connections, a.node_id)

        first = await eventually("a to register its presence", registered)
        await a.tick()
        await b.tick()
        assert a.owned == settings.partitions and b.owned == 0
        await redis.execute_command("CLIENT", "KILL", "ID", first)
        looked_until = time.monotonic() + 3 * DEAD_AFTER
        while time.monotonic() < looked_until:
            assert not await b.free_for_me()
            await asyncio.sleep(FREE_CHECK)
        assert await registered() not in (None, first)  # a new connection, registered
        # Unsure until renewed (a's lease loop is driven by hand here): a batch waits.
        assert a.unsure(0) and not a.holds(0) and a.readable() == []
        waiting = asyncio.create_task(a.settle({0}, timeout=30))
        await asyncio.sleep(FREE_CHECK)
        assert not waiting.done()
        await a.tick()
        await asyncio.wait_for(waiting, 5)
        assert a.holds(0) and a.owned == settings.partitions

        presence.cancel()  # a's process "dies", or is cut off: its presence connection closes
        await asyncio.gather(presence, return_exceptions=True)
        await asyncio.sleep(PRESENCE_TRUST + FREE_CHECK)
        assert a.unsure(0) and a.readable() == []  # a writes nothing any more
        await eventually("b to see a dead", b.free_for_me, timeout=10 * DEAD_AFTER)
        await b.tick()
        assert b.owned == settings.partitions
        holders = {await redis.get(keys.lease(p)) for p in range(settings.partitions)}
        assert holders == {b.node_id.encode()}
        await a.free_for_me()  # a's next look sees its leases taken, and gives them up
        assert a.owned == 0 and not a.unsure(0)
    finally:
        presence.cancel()
        await asyncio.gather(presence, return_exceptions=True)
        await a.release_all()
        await b.release_all()


async def test_a_worker_whose_presence_redis_refuses_trusts_its_leases_alone(
    settings: Settings, redis: Redis, cleanup: None
) -> None:
    """An ACL without CLIENT: the presence gives up at once (no retries, no registration),
    and the worker's leases count as leases alone, not as unconfirmed."""
    user = f"nopresence{uuid.uuid4().hex[:6]}"
    await redis.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-client")
    url = settings.redis_url.replace("redis://", f"redis://{user}:pw@", 1)
    keys = Keys(settings.redis_prefix)
    a = PartitionManager(
        redis, keys, settings.node_id, settings.partitions, 60.0, WorkerMetrics(), redis_url=url
    )
    try:
        await asyncio.wait_for(a.run_presence(), 5)  # returns: refused, not retried
        assert await redis.hget(keys.worker_connections, a.node_id) is None
        await a.tick()
        await asyncio.sleep(PRESENCE_TRUST + FREE_CHECK)
        assert a.holds(0) and not a.unsure(0)
    finally:
        await a.release_all()
        await redis.execute_command("ACL", "DELUSER", user)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_a_stopped_workers_partitions_are_taken_over_at_once(
    stack: Stack, seed: Seeder, log_dir: Path, redis: Redis, how: signal.Signals
) -> None:
    """Stop one of two workers mid-traffic; the other takes all its partitions long
    before their leases could expire, no request fails and every message is stored once
    with nothing left pending. SIGTERM: it finishes its batch, acks and releases every
    lease. SIGKILL: its leases stay, naming it; Redis dropping its presence connection
    tells the other it is dead, which takes them over."""
    # Expiry would take the lease; a release is taken at the next look (0.2 s), a dead
    # worker's leases after DEAD_AFTER (1 s). Long leases make expiry impossible in time.
    lease = 6.0 if how == signal.SIGTERM else 60.0
    alice, token = await seed.user("Alice")
    chats = [await seed.chat(alice) for _ in range(8)]
    proc_1, wk_1 = stack.spawn("worker", log_dir, lease_seconds=lease, log_level="INFO")
    _, wk_2 = stack.spawn("worker", log_dir, lease_seconds=lease)
    gw = await stack.gateway()
    await stack.wait_ready(wk_1)
    await stack.wait_ready(wk_2)
    partitions = stack.settings.partitions

    async def balanced() -> Any:
        owned = [(await readyz(stack, url))[1].get("partitions") or [] for url in (wk_1, wk_2)]
        every = sorted(p for parts in owned for p in parts)
        return owned if all(owned) and every == list(range(partitions)) else None

    owned_1, _ = await eventually("both workers to hold partitions", balanced)
    node_1 = (await readyz(stack, wk_1))[1]["node"]
    node_2 = (await readyz(stack, wk_2))[1]["node"]
    client = await stack.client(gw, token)
    for chat in chats:
        await client.join(chat)

    stop = asyncio.Event()
    replies: list[dict[str, Any]] = []

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            chat = chats[i % len(chats)]
            replies.append(await client.send_text(chat, f"m{i}", client_msg_id=f"c{i}"))
            i += 1
            await asyncio.sleep(0.02)  # under the gateway's per-socket rate limit

    sender = asyncio.create_task(traffic())
    await asyncio.sleep(0.5)
    sent_before = len(replies)
    proc_1.send_signal(how)
    signalled = time.monotonic()
    assert await wait_exit(proc_1) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    exited = time.monotonic()
    keys = Keys(stack.settings.redis_prefix)
    holders = [await redis.get(keys.lease(p)) for p in range(partitions)]
    if how == signal.SIGTERM:
        # Released, not left to expire: no lease names the stopped worker any more.
        assert node_1.encode() not in holders, holders

    async def all_on_2() -> bool:
        return (await readyz(stack, wk_2))[1].get("partitions") == list(range(partitions))

    await eventually(
        "the other worker to take every partition", all_on_2, timeout=lease / 4, every=0.02
    )
    taken = time.monotonic()
    await asyncio.sleep(0.5)  # and traffic keeps flowing through it
    stop.set()
    await sender
    assert len(replies) > sent_before
    failed = [r for r in replies if r["type"] != "success"]
    assert failed == [], stack.logs()
    holders = [await redis.get(keys.lease(p)) for p in range(partitions)]
    assert holders == [node_2.encode()] * partitions

    # Stored exactly once each; nothing read and left unacknowledged.
    client_db, store = await mongo_store(stack.settings)
    try:
        stored = await store.messages.count_documents({})
    finally:
        await client_db.close()
    assert stored == len(replies)
    for p in range(partitions):
        pending = await redis.xpending(keys.stream(p), CONSUMER_GROUP)
        assert pending["pending"] == 0, (p, pending)
    drained = [e for name, e in log_lines(log_dir) if e.get("msg") == "drained"]
    if how == signal.SIGTERM:
        assert [e["partitions"] for e in drained] == [len(owned_1)]
    else:
        assert drained == []
        on_2 = await scrape(stack, wk_2)
        assert on_2.value("chat_worker_partitions_taken_total", owner="dead") == len(owned_1)
        # The dead worker is forgotten: out of the live set and the registry.
        assert await redis.zscore(keys.workers, node_1) is None
        assert await redis.hget(keys.worker_connections, node_1) is None
    print(
        f"\nworker {how.name}: exit {exited - signalled:.2f}s, "
        f"other worker owns all {partitions} partitions {taken - signalled:.2f}s "
        f"after the signal (LEASE_SECONDS={lease:g}); {len(replies)} sends, none failed"
    )


async def test_a_worker_restarted_under_its_stable_node_id_takes_its_leases_back_at_once(
    stack: Stack, seed: Seeder, log_dir: Path, redis: Redis
) -> None:
    """A worker with a stable NODE_ID (a StatefulSet's pod name) is SIGKILLed and started
    again under the same name. Its leases still name it and its new presence is alive, so
    no other worker could take them; it takes them back at once instead of leaving its
    partitions unserved until they expire, and its chats continue from their last ids."""
    lease = 60.0  # expiry would take a minute: what the test must not wait for
    alice, token = await seed.user("Alice")
    chat = await seed.chat(alice)
    node = f"wk-stable-{uuid.uuid4().hex[:6]}"
    proc, wk = stack.spawn("worker", log_dir, lease_seconds=lease, node_id=node)
    gw = await stack.gateway()
    await stack.wait_ready(wk)
    partitions = list(range(stack.settings.partitions))

    async def owns_all(url: str) -> bool:
        return (await readyz(stack, url))[1].get("partitions") == partitions

    await eventually("the worker to hold every partition", lambda: owns_all(wk))
    assert (await readyz(stack, wk))[1]["node"] == node
    client = await stack.client(gw, token)
    await client.join(chat)
    first = await client.send_text(chat, "before", client_msg_id="a")
    assert first["type"] == "success"

    proc.send_signal(signal.SIGKILL)
    assert await wait_exit(proc) == -signal.SIGKILL
    keys = Keys(stack.settings.redis_prefix)
    assert {await redis.get(keys.lease(p)) for p in partitions} == {node.encode()}
    started = time.monotonic()
    _, wk_again = stack.spawn("worker", log_dir, lease_seconds=lease, node_id=node)
    await eventually(
        "the restarted worker to hold every partition",
        lambda: owns_all(wk_again),
        timeout=lease / 4,
        every=0.02,
    )
    back = time.monotonic() - started
    second = await client.send_text(chat, "after", client_msg_id="b")
    assert second["type"] == "success"
    assert int(second["messages"][0]["id"]) == int(first["messages"][0]["id"]) + 1
    again = await scrape(stack, wk_again)
    assert again.value("chat_worker_partitions_taken_total", owner="dead") == len(partitions)
    print(f"\nrestarted under its NODE_ID: every partition back {back:.2f}s after the start")


async def test_a_second_live_process_under_the_same_node_id_takes_no_lease(
    stack: Stack, log_dir: Path
) -> None:
    """NODE_ID must be unique per process; when two share one by mistake, the second
    finds the first's presence alive and leaves the leases naming that id alone (they
    are not its predecessor's), and says so in its log."""
    node = f"wk-twice-{uuid.uuid4().hex[:6]}"
    _, first = stack.spawn("worker", log_dir, lease_seconds=60.0, node_id=node)
    await stack.wait_ready(first)
    partitions = list(range(stack.settings.partitions))

    async def owned(url: str) -> Any:
        return (await readyz(stack, url))[1].get("partitions")

    async def first_owns_all() -> bool:
        return await owned(first) == partitions

    await eventually("the first to hold every partition", first_owns_all)
    _, second = stack.spawn("worker", log_dir, lease_seconds=60.0, node_id=node)

    async def warned() -> bool:
        return any(
            "another process is connected under this NODE_ID" in str(e.get("msg"))
            for _, e in log_lines(log_dir)
        )

    await eventually("the second process's warning", warned)
    await asyncio.sleep(1.0)  # several of its looks for free partitions
    assert await owned(second) == []
    assert await owned(first) == partitions


# -- 5. gateway drain behind a real nginx ---------------------------------------------


@dataclass
class Chatter:
    """One user sending numbered messages through nginx; on a close it reconnects
    through nginx, catches up with ``after_id`` and retries its unacknowledged send
    with the same ``client_msg_id``."""

    stack: Stack
    url: str
    token: str
    chat: str
    name: str
    clients: list[Client] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)  # client_msg_id -> message id
    closes: list[int | None] = field(default_factory=list)
    reconnects: int = 0

    @property
    def client(self) -> Client:
        return self.clients[-1]

    def seen(self) -> set[int]:
        return set().union(*(message_ids(c.frames) for c in self.clients))

    async def connect(self) -> None:
        """Connect through nginx (retrying while it has no live gateway) and catch up."""
        deadline = time.monotonic() + 30
        while True:
            try:
                client = await self.stack.client(self.url, self.token)
                break
            except aiohttp.ClientError:
                assert time.monotonic() < deadline, "could not reconnect through nginx"
                await asyncio.sleep(0.1)
        last = max(self.seen(), default=0)
        self.clients.append(client)
        query = {"after_id": str(last), "limit": 200} if last else None
        reply = await client.request("get_history", self.chat, query)
        assert reply["type"] == "success", reply

    async def request(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Send and wait for the reply; None when the socket closed first."""
        client = self.client
        try:
            await client.ws.send_str(orjson.dumps(body).decode())
        except Exception:
            return None
        get = asyncio.ensure_future(client.replies.get())
        ended = reader_of(client)
        done, _ = await asyncio.wait({get, ended}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        assert ended in done, "no reply and no close within 20 s"
        return None

    async def run(self, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            cmid = f"{self.name}-{i}"
            body = {
                "chat_id": self.chat,
                "token": self.token,
                "event_type": "send_message",
                "message": {"type": "text", "text": f"{self.name} says {i}", "client_msg_id": cmid},
                "request_id": cmid,
            }
            reply = await self.request(body)
            if reply is None:  # closed under us: reconnect, catch up, retry the same id
                await asyncio.wait({reader_of(self.client)}, timeout=20)
                self.closes.append(self.client.ws.close_code)
                self.reconnects += 1
                await self.connect()
                continue
            assert reply["type"] == "success", reply
            self.acked[cmid] = int(reply["messages"][0]["id"])
            i += 1
            await asyncio.sleep(0.05)


def reader_of(client: Client) -> asyncio.Task[None]:
    """The task reading a client's socket: it ends when the socket closes.

    (``Client.closed`` is not used: its reader's cleanup reads ``ws.extra``, which
    aiohttp's client WebSocket does not have, so that future is never resolved.)
    """
    return client._reader


class Nginx:
    """nginx from apt, rendered from deploy/nginx/local.conf.template, in the foreground."""

    def __init__(self, binary: str, workdir: Path, gateway_ports: tuple[int, int]) -> None:
        self.binary = binary
        self.dir = workdir
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        text = string.Template(NGINX_TEMPLATE.read_text()).substitute(
            GATEWAY_A_PORT=gateway_ports[0],
            GATEWAY_B_PORT=gateway_ports[1],
            LISTEN_PORT=self.port,
            PID_FILE=workdir / "nginx.pid",
            TEMP_DIR=workdir,
        )
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, *extra: str) -> list[str]:
        return [
            self.binary, "-p", str(self.dir), "-e", str(self.dir / "error.log"),
            "-c", str(self.conf), *extra,
        ]  # fmt: skip

    def test_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv("-t"), capture_output=True, text=True, timeout=30)

    def launch(self) -> None:
        """Start nginx in the foreground as a child process."""
        with (self.dir / "stdout.log").open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv("-g", "daemon off;"), stdout=log, stderr=subprocess.STDOUT
            )

    async def wait_ready(self, session: aiohttp.ClientSession) -> str:
        """Wait until nginx answers its own health check; its base URL."""
        url = f"http://127.0.0.1:{self.port}/"

        async def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.error_log()
            try:
                async with session.get(url + "nginx-healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await eventually("nginx to answer", answers)
        return url

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no error log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown: open WebSockets are cut
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def test_gateway_sigterm_behind_nginx_drains_without_losing_anything(
    stack: Stack, seed: Seeder, log_dir: Path, tmp_path: Path
) -> None:
    """Two gateways behind nginx, clients chatting through it. SIGTERM one gateway:
    its /readyz turns 503 at once and it refuses upgrades with 503; its clients get
    1001 "going away" in batches, reconnect through nginx to the other gateway, catch up
    with after_id, and every acknowledged message reaches every client exactly once."""
    nginx_bin = tool("nginx")
    users = [await seed.user(f"U{i}") for i in range(6)]
    chat = await seed.chat(*(user_id for user_id, _ in users))
    batch_size = 1
    proc_a, gw_a = stack.spawn(
        "gateway",
        log_dir,
        log_level="DEBUG",
        drain_batch_size=batch_size,
        drain_batch_interval=0.3,
        drain_timeout=10.0,
    )
    _, gw_b = stack.spawn("gateway", log_dir, log_level="DEBUG")
    _, wk = stack.spawn("worker", log_dir, log_level="DEBUG")
    for url in (gw_a, gw_b, wk):
        await stack.wait_ready(url)
    ports = (int(gw_a.rsplit(":", 1)[1].strip("/")), int(gw_b.rsplit(":", 1)[1].strip("/")))
    nginx = Nginx(nginx_bin, tmp_path / "nginx", ports)
    checked = nginx.test_config()
    assert checked.returncode == 0, checked.stderr
    nginx.launch()
    try:
        entry = await nginx.wait_ready(stack.session)
        chatters = [
            Chatter(stack, entry, token, chat, f"u{i}") for i, (_, token) in enumerate(users)
        ]
        for chatter in chatters:
            await chatter.connect()
        on_a = int((await scrape(stack, gw_a)).value("chat_gateway_sockets_open"))
        on_b = int((await scrape(stack, gw_b)).value("chat_gateway_sockets_open"))
        assert on_a + on_b == len(chatters) and on_a >= 1 and on_b >= 1, (on_a, on_b)

        stop = asyncio.Event()
        runs = [asyncio.create_task(c.run(stop)) for c in chatters]
        await asyncio.sleep(1.0)
        proc_a.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Unready at once, while it still answers HTTP; upgrades refused with 503.
        status, body = await eventually(
            "gateway A to report draining", lambda: _draining(stack, gw_a), every=0.01
        )
        assert status == 503 and body["checks"]["not_draining"] is False
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await stack.session.ws_connect(gw_a + "ws")
        assert refused.value.status == 503
        assert await wait_exit(proc_a) == 0
        drained_in = time.monotonic() - signalled
        await asyncio.sleep(1.0)  # everyone keeps chatting through gateway B
        stop.set()
        await asyncio.gather(*runs)

        # A's clients, and only they, were told 1001 and came back through nginx (to B:
        # A is gone), once each.
        moved = [c for c in chatters if c.closes]
        assert len(moved) == on_a
        assert all(c.closes == [1001] and c.reconnects == 1 for c in moved), [
            (c.name, c.closes) for c in moved
        ]
        metrics_b = await scrape(stack, gw_b)
        assert metrics_b.value("chat_gateway_sockets_open") == len(chatters)
        assert metrics_b.value("chat_gateway_connections_opened_total") == on_b + on_a

        # Nothing acknowledged is missing, for anyone, and nothing is doubled.
        acked = {mid for c in chatters for mid in c.acked.values()}
        assert sum(len(c.acked) for c in chatters) == len(acked)

        async def everyone_has_everything() -> bool:
            return all(acked <= c.seen() for c in chatters)

        await eventually("every client to hold every acknowledged message", everyone_has_everything)
        client_db, store = await mongo_store(stack.settings)
        try:
            docs = await store.messages.find({"chat_id": chat}).to_list(None)
        finally:
            await client_db.close()
        by_cmid = {d["client_msg_id"]: d["seq"] for d in docs}
        assert len(by_cmid) == len(docs)  # one document per client_msg_id
        for chatter in chatters:
            for cmid, mid in chatter.acked.items():
                assert by_cmid[cmid] == mid

        # The drain, from A's own log: batches of DRAIN_BATCH_SIZE, every socket closed.
        a_log = [e for name, e in log_lines(log_dir) if name == f"gateway-{ports[0]}.log"]
        batches = [e for e in a_log if e.get("msg") == "drain batch"]
        drained = [e for e in a_log if e.get("msg") == "drained"]
        assert len(drained) == 1 and drained[0]["closed"] == on_a
        assert len(batches) == math.ceil(on_a / batch_size)
        assert all(e["sockets"] <= batch_size for e in batches)
        for chatter in chatters:
            for client in chatter.clients[:-1]:
                assert client.ws.close_code == 1001
        secrets = [token for _, token in users] + [token_digest(token) for _, token in users]
        texts = [f"u{i} says " for i in range(len(users))]
        assert_logs_clean(log_dir, secrets + texts)
        print(
            f"\ngateway drain: {on_a} sockets on A, SIGTERM -> exit {drained_in:.2f}s "
            f"({drained[0]['batches']} batches, drain itself {drained[0]['seconds']}s); "
            f"{len(acked)} messages acknowledged, none missing"
        )
    finally:
        nginx.stop()


async def test_gateway_drain_answers_requests_in_flight_before_closing(
    stack: Stack, seed: Seeder, log_dir: Path
) -> None:
    """A request is in flight (its worker paused) when the gateway gets SIGTERM: the
    gateway stays unready and refuses upgrades while it waits, delivers the reply once
    the worker answers, and only then closes the socket with 1001."""
    alice, token = await seed.user("Alice")
    chat = await seed.chat(alice)
    proc_gw, gw = stack.spawn("gateway", log_dir, log_level="INFO")
    # A long lease, so pausing the worker does not cost it its partitions.
    proc_wk, wk = stack.spawn("worker", log_dir, lease_seconds=30.0)
    await stack.wait_ready(gw)
    await stack.wait_ready(wk)
    client = await stack.client(gw, token)
    await client.join(chat)
    os.kill(proc_wk.pid, signal.SIGSTOP)
    try:
        body = {
            "chat_id": chat,
            "token": token,
            "event_type": "send_message",
            "message": {"type": "text", "text": "in flight", "client_msg_id": "f1"},
            "request_id": "in-flight",
        }
        await client.ws.send_str(orjson.dumps(body).decode())

        async def in_flight() -> bool:
            metrics = await scrape(stack, gw)
            return metrics.value("chat_gateway_requests_in_flight") == 1

        await eventually("the request to be in flight", in_flight)
        proc_gw.send_signal(signal.SIGTERM)
        _, body = await eventually("the gateway to report draining", lambda: _draining(stack, gw))
        assert body["checks"]["not_draining"] is False
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await stack.session.ws_connect(gw + "ws")
        assert refused.value.status == 503
        assert (await scrape(stack, gw)).value("chat_ready") == 0
        assert not reader_of(client).done(), "closed while a reply was still owed"
    finally:
        os.kill(proc_wk.pid, signal.SIGCONT)
    reply = await client.reply()
    assert reply["request_id"] == "in-flight" and reply["type"] == "success"
    await asyncio.wait({reader_of(client)}, timeout=30)
    assert client.ws.close_code == 1001  # after the reply: the reader saw them in order
    assert await wait_exit(proc_gw) == 0
    drained = [e for _, e in log_lines(log_dir) if e.get("msg") == "drained"]
    assert drained[0]["closed"] == 1 and drained[0]["unanswered"] == 0


async def _draining(stack: Stack, url: str) -> tuple[int, dict[str, Any]] | None:
    status, body = await readyz(stack, url)
    return (status, body) if status == 503 else None


def test_operations_doc_lists_every_metric() -> None:
    """docs/operations.md has a line for every metric family either process registers."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [
        family.name
        for metrics in (GatewayMetrics(), WorkerMetrics())
        for family in metrics.registry.collect()
        if f"`{family.name}" not in doc
    ]
    assert missing == []


# -- 6. the shipped deploy files validate ---------------------------------------------


def test_compose_file_validates() -> None:
    """``docker-compose config`` accepts docker-compose.yml and sees the whole stack."""
    compose = tool("docker-compose")
    run = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    services = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert set(services.stdout.split()) == {
        "redis", "mongo", "gateway", "worker", "nginx", "prometheus", "grafana",
    }  # fmt: skip
    rendered = run.stdout
    assert "appendonly" in rendered  # Redis AOF on
    assert re.search(r"replicas: 3", rendered) and re.search(r"replicas: 2", rendered)
    # nginx is the only entry published on all interfaces; the tools bind to loopback.
    ports = published_ports(rendered)
    assert sorted(ports) == [("", "8080"), ("127.0.0.1", "3000"), ("127.0.0.1", "9090")], ports


def published_ports(rendered: str) -> list[tuple[str, str]]:
    """(host ip or "", host port) of every ``ports:`` entry in ``config`` output, in the
    short form (docker-compose 1.29: ``127.0.0.1:9090:9090/tcp``) or the long one
    (``published: 8080`` with an optional ``host_ip``), without a YAML parser."""
    lines = rendered.splitlines()
    found: list[tuple[str, str]] = []
    for i, line in enumerate(lines):
        if line.strip() != "ports:":
            continue
        indent = len(line) - len(line.lstrip())
        items: list[list[str]] = []
        for following in lines[i + 1 :]:
            depth = len(following) - len(following.lstrip())
            text = following.strip()
            if depth < indent or (depth == indent and not text.startswith("- ")):
                break
            if text.startswith("- "):
                items.append([text[2:]])
            elif items:
                items[-1].append(text)
        for item in items:
            short = re.fullmatch(r"['\"]?(?:([\d.]+):)?(\d+):\d+(?:/\w+)?['\"]?", item[0])
            if short:
                found.append((short.group(1) or "", short.group(2)))
                continue
            fields = dict(part.split(": ", 1) for part in item if ": " in part)
            found.append((fields.get("host_ip", "").strip("'\""), fields["published"].strip("'\"")))
    return found


def test_nginx_configs_validate(tmp_path: Path) -> None:
    """``nginx -t`` on the shipped nginx.conf (paths and the compose service name
    swapped for local ones) and on the rendered local template."""
    nginx_bin = tool("nginx")
    text = NGINX_CONF.read_text()
    swaps = {
        "pid /var/run/nginx.pid;": f"pid {tmp_path}/nginx.pid;",
        "error_log /var/log/nginx/error.log notice;": f"error_log {tmp_path}/error.log notice;",
        "access_log /var/log/nginx/access.log main;": f"access_log {tmp_path}/access.log main;",
        # Only Docker's DNS knows the compose service name.
        "server gateway:8080 ": "server 127.0.0.1:8080 ",
    }
    for old, new in swaps.items():
        assert text.count(old) == 1, f"nginx.conf changed shape: {old!r}"
        text = text.replace(old, new)
    # Temp paths under the test's dir, so `nginx -t` also passes for a non-root user.
    temp_paths = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    assert text.count("http {\n") == 1
    text = text.replace("http {\n", "http {\n" + temp_paths)
    if not Path("/etc/nginx/mime.types").exists():
        (tmp_path / "mime.types").write_text("types { text/html html; }\n")
        text = text.replace("include /etc/nginx/mime.types;", f"include {tmp_path}/mime.types;")
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    run = subprocess.run(
        [nginx_bin, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    # The WebSocket essentials the issue asks for.
    for needle in (
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "least_conn;",
    ):
        assert needle in text
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1))  # type: ignore[union-attr]
    assert read_timeout > 30  # above HEARTBEAT_SECONDS's default
    local = Nginx(nginx_bin, tmp_path / "local", (free_port(), free_port()))
    checked = local.test_config()
    assert checked.returncode == 0, checked.stderr


def test_prometheus_config_and_alert_rules() -> None:
    """``promtool check config`` (with alerts.yml) and the alert unit tests."""
    promtool = tool("promtool")
    prom_dir = ROOT / "deploy" / "prometheus"
    for argv in (
        [promtool, "check", "config", "prometheus.yml"],
        [promtool, "test", "rules", "alerts.test.yml"],
    ):
        run = subprocess.run(argv, capture_output=True, text=True, cwd=prom_dir, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
    text = (prom_dir / "prometheus.yml").read_text()
    # Every replica of both roles is found through Docker's DNS.
    for job in ("gateway", "worker"):
        assert re.search(rf"job_name: {job}\n(?:.*\n)*?\s+dns_sd_configs:", text)
