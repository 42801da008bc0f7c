"""Where a request's time went inside our servers, from their own ``/metrics``.

The harness scrapes every gateway and worker of ``ours`` when a measured window starts
and when it ends. The differences of the histograms' sums and counts give mean times
over the window: how long a gateway held a request (frame received -> reply written),
how long new entries waited in their stream before a worker read them, how long a
worker's batch took (read -> published and acknowledged), and its MongoDB calls by
operation. What is left of the gateway's time is transit: the gateway's side of XADD,
Redis pub/sub and the event loops in between.

Means rather than percentiles: two scrapes give a mean exactly, where a quantile from
these buckets would only be interpolated.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# (sample name, sorted label pairs) -> value, summed over processes.
Totals = dict[tuple[str, tuple[tuple[str, str], ...]], float]

REQUEST_EVENTS = ("send_message", "send_file", "get_history")
MONGO_OPS = ("auth", "last_seq", "find_existing", "insert", "history")


def parse(texts: list[str]) -> Totals:
    """Sum the samples of several processes' exposition texts."""
    totals: Totals = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _delta(before: Totals, after: Totals, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] == name and want <= set(key[1])
    )


def _mean_ms(before: Totals, after: Totals, base: str, **labels: str) -> tuple[float, float]:
    """(mean in ms or -1 when nothing was observed, how many observations)."""
    count = _delta(before, after, base + "_count", **labels)
    if count <= 0:
        return -1.0, 0.0
    return round(_delta(before, after, base + "_sum", **labels) / count * 1000.0, 3), count


def window(before: Totals, after: Totals, seconds: float, workers: int = 1) -> dict[str, Any]:
    """Mean times and rates between two scrapes ``seconds`` apart, of ``workers`` workers."""
    out: dict[str, Any] = {"gateway_request_ms": {}, "mongo_ms": {}, "mongo_calls_per_s": {}}
    for event in REQUEST_EVENTS:
        mean, count = _mean_ms(before, after, "chat_gateway_request_seconds", event=event)
        if count:
            out["gateway_request_ms"][event] = mean
    for op in MONGO_OPS:
        mean, count = _mean_ms(before, after, "chat_worker_mongo_seconds", op=op)
        if count:
            out["mongo_ms"][op] = mean
            out["mongo_calls_per_s"][op] = round(count / seconds, 1)
    for key, base in (
        ("stream_wait_ms", "chat_worker_stream_wait_seconds"),
        ("batch_ms", "chat_worker_batch_seconds"),
        ("stored_to_pushed_ms", "chat_gateway_delivery_seconds"),
    ):
        mean, count = _mean_ms(before, after, base)
        out[key] = mean if count else None
    batches = _delta(before, after, "chat_worker_batch_size_count")
    entries = _delta(before, after, "chat_worker_batch_size_sum")
    out["batches_per_s"] = round(batches / seconds, 1) if seconds > 0 else None
    out["entries_per_batch"] = round(entries / batches, 1) if batches > 0 else None
    # A worker handles one batch at a time: the share of the window its loop spent in
    # one is what makes new entries wait in their stream (queueing in front of it).
    busy = _delta(before, after, "chat_worker_batch_seconds_sum")
    out["worker_loop_busy"] = round(busy / (seconds * max(1, workers)), 3) if seconds > 0 else None
    return out


def describe(times: dict[str, Any] | None, event: str) -> str:
    """One sentence: where a request of ``event`` spent its time in the servers."""
    if not times:
        return ""
    held = times["gateway_request_ms"].get(event)
    wait, batch = times.get("stream_wait_ms"), times.get("batch_ms")
    if held is None or wait is None or batch is None:
        return ""
    op = "history" if event == "get_history" else "insert"
    mongo = times["mongo_ms"].get(op)
    inside = f" ({op} call {mongo:.2f} ms)" if mongo is not None else ""
    transit = max(0.0, held - wait - batch)
    text = (
        f"time in the servers (means over the window, from their /metrics): a gateway "
        f"held a {event} {held:.2f} ms: {wait:.2f} waiting in its stream, {batch:.2f} in "
        f"the worker's batch{inside}, {transit:.2f} in transit (XADD, pub/sub, event "
        f"loops); {times['batches_per_s']:g} batches/s of {times['entries_per_batch']:g} entries"
    )
    if times.get("worker_loop_busy") is not None:
        text += (
            f", the worker's loop in a batch {100 * times['worker_loop_busy']:.0f} % of the time"
        )
    if event != "get_history" and times.get("stored_to_pushed_ms") is not None:
        text += f"; stored -> pushed {times['stored_to_pushed_ms']:.2f} ms"
    return text
