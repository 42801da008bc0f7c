"""Where a request's time went inside our servers, from their own ``/metrics``.

The harness scrapes every gateway and worker of ``ours`` when a measured window starts
and when it ends. The differences of the histograms' sums and counts give mean times
over the window: how long a gateway held a request (frame received -> reply written),
how long new entries waited in their stream before a worker read them, how long a
worker's batch took (read -> published and acknowledged), and its MongoDB calls by
operation. What is left of the gateway's time is transit: the gateway's side of XADD,
Redis pub/sub and the event loops in between.

mongod's own account of the same window comes from its ``serverStatus``, read at the
same two moments: the mean time it spent on a read or a write command (``opLatencies``,
from receiving the command to sending its reply, write concern included) and the mean
time of a journal sync (WiredTiger's log syncs). Set beside the worker's time for the
same call, it separates mongod's work from the round trip around it: the socket writes,
the wake-ups of both processes and the decoding of the reply.

Means rather than percentiles: two scrapes give a mean exactly, where a quantile from
these buckets would only be interpolated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import MONGO_OPS

# (sample name, sorted label pairs) -> value, summed over processes.
Totals = dict[tuple[str, tuple[tuple[str, str], ...]], float]

REQUEST_EVENTS = ("send_message", "send_file", "get_history")
# mongod's op classes (serverStatus opLatencies): a history page is a read, an insert a write.
MONGOD_OPS = ("reads", "writes")
MONGOD_OP_OF = {"history": ("reads", "read"), "insert": ("writes", "write")}
_LOG_SYNCS = "log sync operations"
_LOG_SYNC_US = "log sync time duration (usecs)"


def parse(texts: list[str]) -> Totals:
    """Sum the samples of several processes' exposition texts."""
    totals: Totals = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def mongod_totals(status: Mapping[str, Any]) -> Totals:
    """The counters of one ``serverStatus`` reply that :func:`window` reads, as totals
    (microseconds and counts; absent when this mongod does not report them)."""
    totals: Totals = {}
    latencies = status.get("opLatencies") or {}
    for op in MONGOD_OPS:
        counter = latencies.get(op)
        if counter is not None:
            labels = (("op", op),)
            totals[("mongod_op_latency_microseconds_sum", labels)] = float(counter["latency"])
            totals[("mongod_op_latency_microseconds_count", labels)] = float(counter["ops"])
    log = (status.get("wiredTiger") or {}).get("log") or {}
    if _LOG_SYNCS in log and _LOG_SYNC_US in log:
        totals[("mongod_journal_sync_microseconds_sum", ())] = float(log[_LOG_SYNC_US])
        totals[("mongod_journal_sync_microseconds_count", ())] = float(log[_LOG_SYNCS])
    return totals


def _delta(before: Totals, after: Totals, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] == name and want <= set(key[1])
    )


def _mean_ms(
    before: Totals, after: Totals, base: str, per_unit: float = 1000.0, **labels: str
) -> tuple[float, float]:
    """(mean in ms or -1 when nothing was observed, how many observations); ``per_unit``:
    milliseconds per unit of the sums (seconds by default)."""
    count = _delta(before, after, base + "_count", **labels)
    if count <= 0:
        return -1.0, 0.0
    return round(_delta(before, after, base + "_sum", **labels) / count * per_unit, 3), count


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
    # Pages the gateways read from MongoDB themselves (GATEWAY_READS_HISTORY), and those
    # they forwarded to the workers.
    out["history_pages_per_s"] = (
        {
            by: round(_delta(before, after, "chat_gateway_history_reads_total", by=by) / seconds, 1)
            for by in ("gateway", "worker")
        }
        if seconds > 0
        else {}
    )
    mean, count = _mean_ms(before, after, "chat_gateway_history_read_seconds")
    out["gateway_read_ms"] = mean if count else None
    out["mongod_ms"] = {}
    for op in MONGOD_OPS:
        mean, count = _mean_ms(before, after, "mongod_op_latency_microseconds", 1e-3, op=op)
        if count:
            out["mongod_ms"][op] = mean
    mean, count = _mean_ms(before, after, "mongod_journal_sync_microseconds", 1e-3)
    out["journal_sync_ms"] = mean if count else None
    out["journal_syncs_per_s"] = round(count / seconds, 1) if count and seconds > 0 else None
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
    inside = ""
    if mongo is not None:
        inside = f" ({op} call {mongo:.2f} ms"
        kind, one = MONGOD_OP_OF[op]
        own = (times.get("mongod_ms") or {}).get(kind)
        if own is not None:
            inside += f", mongod's own time for a {one} {own:.2f}"
        sync = times.get("journal_sync_ms")
        if op == "insert" and sync is not None:
            inside += f", a journal sync {sync:.2f}"
        inside += ")"
    transit = max(0.0, held - wait - batch)
    pages = times.get("history_pages_per_s") or {}
    read_here = pages.get("gateway") or 0.0
    if event == "get_history" and read_here > 0:
        share = read_here / (read_here + (pages.get("worker") or 0.0))
        read = times.get("gateway_read_ms")
        return (
            f"time in the servers (means over the window, from their /metrics): a gateway "
            f"held a get_history {held:.2f} ms; {100 * share:.0f} % of the pages were read "
            f"by the gateways themselves"
            + (f" ({read:.2f} ms a MongoDB read)" if read is not None else "")
            + f", the rest through the stream ({wait:.2f} ms waiting) and the worker's "
            f"batch ({batch:.2f} ms)"
        )
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
