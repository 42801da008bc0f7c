"""Time in the servers from two scrapes (pure functions on real exposition text)."""

from __future__ import annotations

from prometheus_client import generate_latest

from shared.metrics import GatewayMetrics, WorkerMetrics
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
