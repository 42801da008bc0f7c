"""Time in the servers from two scrapes: pure functions on real exposition text, and
mongod's own counters read from a real mongod."""

from __future__ import annotations

import uuid
from typing import Any

from prometheus_client import generate_latest
from pymongo import MongoClient, WriteConcern

from shared.metrics import GatewayMetrics, WorkerMetrics
from tests.conftest import Servers
from tests.scale import goals, server_time
from tests.scale.test_goals import _ours, _step


def _scrape(*registries: GatewayMetrics | WorkerMetrics) -> server_time.Totals:
    return server_time.parse([generate_latest(m.registry).decode() for m in registries])


def test_means_over_the_window_from_two_scrapes_of_several_processes() -> None:
    gw_a, gw_b, worker = GatewayMetrics(), GatewayMetrics(), WorkerMetrics()
    # Before the window: traffic that must not count.
    gw_a.request_seconds.labels("get_history").observe(1.0)
    worker.batch_seconds.observe(1.0)
    worker.batch_size.observe(100)
    before = _scrape(gw_a, gw_b, worker)

    # In the window: 4 reads held 3 ms each, over two gateways; 2 batches of 2 entries,
    # 2 ms each; entries waited 1 ms; the history query took 1.5 ms.
    for gw in (gw_a, gw_b):
        for _ in range(2):
            gw.request_seconds.labels("get_history").observe(0.003)
    for _ in range(2):
        worker.batch_seconds.observe(0.002)
        worker.batch_size.observe(2)
        worker.mongo_seconds.labels("history").observe(0.0015)
    for _ in range(4):
        worker.stream_wait_seconds.observe(0.001)
    after = _scrape(gw_a, gw_b, worker)

    times = server_time.window(before, after, 2.0)
    assert times["gateway_request_ms"] == {"get_history": 3.0}
    assert times["batch_ms"] == 2.0
    assert times["stream_wait_ms"] == 1.0
    assert times["mongo_ms"] == {"history": 1.5}
    assert times["mongo_calls_per_s"] == {"history": 1.0}
    assert times["batches_per_s"] == 1.0
    assert times["entries_per_batch"] == 2.0
    assert times["stored_to_pushed_ms"] is None  # nothing pushed
    assert times["worker_loop_busy"] == 0.002  # 4 ms of batches in 2 s

    text = server_time.describe(times, "get_history")
    assert "held a get_history 3.00 ms: 1.00 waiting in its stream, 2.00 in the worker's" in text
    assert "(history call 1.50 ms)" in text
    assert "0.00 in transit" in text
    assert "the worker's loop in a batch 0 % of the time" in text
    # An event that was not seen in the window has nothing to say.
    assert server_time.describe(times, "send_message") == ""
    assert times["history_pages_per_s"] == {"gateway": 0.0, "worker": 0.0}
    assert times["gateway_read_ms"] is None


def test_pages_the_gateways_read_themselves_are_told_apart() -> None:
    gw, worker = GatewayMetrics(), WorkerMetrics()
    before = _scrape(gw, worker)
    for _ in range(3):
        gw.history_reads.labels("gateway").inc()
        gw.history_read_seconds.observe(0.0008)
        gw.request_seconds.labels("get_history").observe(0.001)
    gw.history_reads.labels("worker").inc()
    gw.request_seconds.labels("get_history").observe(0.003)
    worker.batch_seconds.observe(0.002)
    worker.batch_size.observe(1)
    worker.stream_wait_seconds.observe(0.0005)
    after = _scrape(gw, worker)
    times = server_time.window(before, after, 1.0)
    assert times["history_pages_per_s"] == {"gateway": 3.0, "worker": 1.0}
    assert times["gateway_read_ms"] == 0.8
    text = server_time.describe(times, "get_history")
    assert "held a get_history 1.50 ms; 75 % of the pages were read by the gateways" in text
    assert "(0.80 ms a MongoDB read)" in text and "stream (0.50 ms waiting)" in text


def test_an_unmet_latency_goal_says_where_the_time_went() -> None:
    step = _step(100, history=(500.0, 2.7, 8.4), cores=(0.96, 0.12))
    step["server_time"] = {
        "gateway_request_ms": {"get_history": 2.9},
        "stream_wait_ms": 0.6,
        "batch_ms": 1.6,
        "mongo_ms": {"history": 1.03},
        "mongo_calls_per_s": {"history": 500.0},
        "batches_per_s": 300.0,
        "entries_per_batch": 2.0,
        "stored_to_pushed_ms": 1.1,
        "worker_loop_busy": 0.48,
    }
    verdict = goals.evaluate("history", {"history_prefill": 1_000_000}, [_ours(step)], 2, 1)[0]
    assert verdict["status"] == goals.NOT_MET
    assert "not CPU-saturated" in verdict["bound"]
    assert (
        "0.60 waiting in its stream, 1.60 in the worker's batch (history call 1.03 ms)"
        in (verdict["bound"])
    )
    assert "0.70 in transit" in verdict["bound"]
    assert "in a batch 48 % of the time" in verdict["bound"]
    # A peer's step (no server_time) keeps the load text alone.
    del step["server_time"]
    verdict = goals.evaluate("history", {"history_prefill": 1_000_000}, [_ours(step)], 2, 1)[0]
    assert "time in the servers" not in verdict["bound"]


def test_mongods_own_account_of_the_window(servers: Servers) -> None:
    """Counters read from a real mongod's serverStatus, around journaled inserts and
    finds: mongod's mean time per read and per write, and per journal sync."""
    with MongoClient(servers.mongo.url, serverSelectionTimeoutMS=10_000) as client:
        messages = client.get_database(f"t_{uuid.uuid4().hex[:8]}").get_collection(
            "messages", write_concern=WriteConcern(w=1, j=True)
        )
        try:
            before = server_time.mongod_totals(client.admin.command("serverStatus"))
            for n in range(20):
                messages.insert_one({"chat_id": "c", "seq": n})
                messages.find_one({"seq": n})
            after = server_time.mongod_totals(client.admin.command("serverStatus"))
        finally:
            client.drop_database(messages.database.name)

    assert len(before) == len(after) == 6  # every counter the window reads is there
    times = server_time.window(before, after, 2.0)
    assert set(times["mongod_ms"]) == {"reads", "writes"}
    assert times["mongod_ms"]["reads"] > 0
    # A journaled write waits for its sync: mongod's time for it includes the sync's.
    assert times["mongod_ms"]["writes"] > 0
    assert times["journal_sync_ms"] is not None and times["journal_sync_ms"] > 0
    # Each of the 20 inserts, one after the other, waited for a sync of its own (others'
    # writes may add a few): at least 10 a second over the 2 s given to window().
    assert times["journal_syncs_per_s"] is not None and times["journal_syncs_per_s"] >= 10


def test_mongods_time_is_set_beside_the_workers() -> None:
    def status(
        reads_us: int, reads: int, writes_us: int, writes: int, sync_us: int, syncs: int
    ) -> dict[str, Any]:
        return {
            "opLatencies": {
                "reads": {"latency": reads_us, "ops": reads},
                "writes": {"latency": writes_us, "ops": writes},
                "commands": {"latency": 999, "ops": 9},
            },
            "wiredTiger": {
                "log": {"log sync operations": syncs, "log sync time duration (usecs)": sync_us}
            },
        }

    worker = WorkerMetrics()
    gateway = GatewayMetrics()
    before = _scrape(gateway, worker)
    before.update(server_time.mongod_totals(status(1000, 10, 5000, 5, 3000, 5)))
    for _ in range(4):
        gateway.request_seconds.labels("send_message").observe(0.004)
        worker.stream_wait_seconds.observe(0.001)
    for _ in range(2):
        worker.batch_seconds.observe(0.0015)
        worker.batch_size.observe(2)
        worker.mongo_seconds.labels("insert").observe(0.001)
    after = _scrape(gateway, worker)
    # In the window: 2 inserts of 750 µs in mongod, 2 journal syncs of 330 µs, 4 reads of 200.
    after.update(server_time.mongod_totals(status(1800, 14, 6500, 7, 3660, 7)))

    times = server_time.window(before, after, 2.0)
    assert times["mongod_ms"] == {"reads": 0.2, "writes": 0.75}
    assert times["journal_sync_ms"] == 0.33
    assert times["journal_syncs_per_s"] == 1.0
    text = server_time.describe(times, "send_message")
    assert "(insert call 1.00 ms, mongod's own time for a write 0.75, a journal sync 0.33)" in text

    # A mongod that did not answer leaves the servers' account as it was.
    times = server_time.window(_scrape(gateway, worker), _scrape(gateway, worker), 2.0)
    assert times["mongod_ms"] == {}
    assert times["journal_sync_ms"] is None
    assert "mongod" not in server_time.describe(
        {**times, "gateway_request_ms": {"get_history": 2.0}, "stream_wait_ms": 0.5,
         "batch_ms": 1.0, "mongo_ms": {"history": 0.5}, "batches_per_s": 1.0,
         "entries_per_batch": 1.0},
        "get_history",
    )  # fmt: skip
