"""One request at a time through the servers: the floor each kind of request stands on.

After a target's load, one socket sends requests in turn, a fixed gap apart, and times
each reply. Each kind goes one stage further into the system than the one before:

* ``gateway``: an unknown event type, answered by the gateway itself (``event_not_found``);
* ``worker``: ``get_history`` of a chat that does not exist, answered by the worker from
  its cache (``chat_not_exists``): XADD, the stream read, PUBLISH, and no MongoDB call;
* ``get_history``: the latest page of 50 of a chat of :data:`PROBE_MESSAGES`, one MongoDB
  ``find``: by the gateway itself in ours (its sockets are authorised by their first
  page, which a worker reads; GATEWAY_READS_HISTORY), by the worker in ``chain``;
* ``send_message``: a message stored with the worker's write concern (a journal sync by
  default) and acknowledged; ``push`` is the same send timed to its arrival at another
  member's socket, which is what a chat's delivery latency measures.

Nothing else is asked of the servers meanwhile, so these medians are what the chain
costs on this machine without queueing: the part of a latency goal that only fewer hops,
less work per hop or a faster machine can lower. The gap keeps the processes from going
idle between requests; on a virtual machine a process woken after idling answers slower.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from tests.scale import wsclient

PROBE_USER = "u-probe"
PROBE_CHAT = "probe"
ABSENT_CHAT = "probe-absent"
PROBE_MESSAGES = 60
PAGE = 50
# The kinds in the order they are sent, each with the reply type it must get.
KINDS = (
    ("gateway", "event_not_found"),
    ("worker", "chat_not_exists"),
    ("get_history", "success"),
    ("send_message", "success"),
)
WARMUP = 10  # rounds not timed: the worker's first look-ups of the absent chat miss
# Each kind's requests go round this many sockets of its own, each then well under the
# gateway's default per-socket rate limit (RATE_LIMIT_PER_SECOND 50) at the probe's pace,
# so the servers run as configured. The history and send sockets are in the probe chat,
# as is one that only listens: a send is pushed to six sockets.
SOCKETS_PER_KIND = 3


def _request(kind: str, token: str, request_id: str) -> bytes:
    body: dict[str, Any] = {"chat_id": PROBE_CHAT, "token": token, "request_id": request_id}
    if kind == "gateway":
        body["event_type"] = "probe_unknown_event"
    elif kind == "worker":
        body.update(chat_id=ABSENT_CHAT, event_type="get_history", message={"limit": PAGE})
    elif kind == "get_history":
        body.update(event_type="get_history", message={"limit": PAGE})
    else:
        body.update(event_type="send_message", message={"type": "text", "text": request_id})
    return orjson.dumps(body)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 3)}


class _Listener:
    """The listening member's handler: notes when the push carrying the awaited marker
    arrives (in ``data_received``, not when it is read)."""

    def __init__(self) -> None:
        self.marker = b""
        self.arrived = 0.0
        self.event = asyncio.Event()

    def expect(self, marker: bytes) -> None:
        self.marker = marker
        self.event.clear()

    def __call__(self, data: bytes) -> None:
        if self.marker and self.marker in data:
            self.arrived = time.perf_counter()
            self.event.set()


async def _reply(client: wsclient.WsClient, request_id: str, timeout: float) -> dict[str, Any]:
    """The reply to ``request_id`` (pushes and other frames before it are skipped)."""
    while True:
        reply: dict[str, Any] = orjson.loads(await client.receive(timeout))
        if reply.get("request_id") == request_id:
            return reply


async def probe(
    url: str, token: str, rounds: int, gap_s: float = 0.002, timeout: float = 10.0
) -> dict[str, Any]:
    """``rounds`` requests of each kind, interleaved, ``gap_s`` apart, one in flight at a
    time; per kind the reply latency percentiles (ms) of the timed ones, and replies of a
    wrong type by type; ``push``: each send to its push at the listening member."""
    clients = [
        [await wsclient.connect(url, timeout=timeout) for _ in range(SOCKETS_PER_KIND)]
        for _ in KINDS
    ]
    listener = await wsclient.connect(url, timeout=timeout)
    names = [kind for kind, _ in KINDS] + ["push"]
    times: dict[str, list[float]] = {kind: [] for kind in names}
    wrong: dict[str, dict[str, int]] = {kind: {} for kind in names}

    def count(kind: str, got: str) -> None:
        wrong[kind][got] = wrong[kind].get(got, 0) + 1

    try:
        # Its first get_history authorises the listener for the chat's pushes.
        listener.send_text(_request("get_history", token, "probe-listen"))
        await _reply(listener, "probe-listen", timeout)
        watch = _Listener()
        listener.listen(watch)
        for i in range(WARMUP + rounds):
            for (kind, expected), own in zip(KINDS, clients, strict=True):
                client = own[i % SOCKETS_PER_KIND]
                await asyncio.sleep(gap_s)
                request_id = f"probe-{kind}-{i}"
                watch.expect(orjson.dumps(request_id))  # the text of the push, quoted
                started = time.perf_counter()
                client.send_text(_request(kind, token, request_id))
                reply = await _reply(client, request_id, timeout)
                elapsed_ms = (time.perf_counter() - started) * 1000.0
                got = str(reply.get("type"))
                if kind == "get_history" and got == expected:
                    got = expected if len(reply.get("messages") or []) == PAGE else "short_page"
                if got != expected:
                    count(kind, got)
                    continue
                if i >= WARMUP:
                    times[kind].append(elapsed_ms)
                if kind == "send_message":
                    if wrong["push"]:  # one went missing: the rest are not waited for
                        count("push", "not_awaited")
                        continue
                    try:
                        await asyncio.wait_for(watch.event.wait(), timeout)
                    except TimeoutError:
                        count("push", "missing")
                        continue
                    if i >= WARMUP:
                        times["push"].append((watch.arrived - started) * 1000.0)
    finally:
        for client in (listener, *(c for own in clients for c in own)):
            await client.close()
    out: dict[str, Any] = {"rounds": rounds, "gap_ms": gap_s * 1000.0, "kinds": {}}
    for kind in names:
        entry: dict[str, Any] = {"n": len(times[kind]), "wrong_replies": wrong[kind]}
        if times[kind]:
            entry.update(_percentiles(times[kind]))
        out["kinds"][kind] = entry
    return out


def describe(result: dict[str, Any] | None, event: str) -> str:
    """One clause for a goal not met: what one ``event`` costs alone, and its stages."""
    if not result:
        return ""
    kinds = result.get("kinds") or {}
    # A chat's goal is on delivery: a send is timed to its push at another member.
    alone = (kinds.get("push" if event == "send_message" else event) or {}).get("p50")
    gateway = (kinds.get("gateway") or {}).get("p50")
    worker = (kinds.get("worker") or {}).get("p50")
    if alone is None or gateway is None or worker is None:
        return ""
    what = (
        f"a get_history of {PAGE} (the latest page)"
        if event == "get_history"
        else "a send_message (to its push at another member)"
    )
    return (
        f"one request at a time after the load ({result['gap_ms']:g} ms apart), {what} "
        f"took {alone:.2f} ms at the median: the gateway alone answers in {gateway:.2f}, "
        f"through Redis and the worker without MongoDB in {worker:.2f}"
    )


def markdown(result: dict[str, Any]) -> list[str]:
    """The probe's lines for report.md."""
    if "error" in result:
        return [f"One request at a time after the load: the probe failed ({result['error']})."]
    lines = [
        f"One request at a time after the load, {result['gap_ms']:g} ms apart, "
        f"{result['rounds']} of each kind (ms; tests/scale/probe.py says what each kind "
        "goes through):",
        "",
        "| kind | answered by | p50 | p90 | p99 | max | wrong replies |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {
        "gateway": "the gateway",
        "worker": "the worker, from its cache",
        "get_history": f"a page of {PAGE} from MongoDB, read by the gateway (ours) or the worker",
        "send_message": "the worker, stored in MongoDB",
        "push": "the same sends, to their push at another member",
    }
    for kind in by:
        k = result["kinds"].get(kind) or {}
        cells = [str(k.get(q, "-")) for q in ("p50", "p90", "p99", "max")]
        wrong = ", ".join(f"{t} {n}" for t, n in sorted(k.get("wrong_replies", {}).items()))
        lines.append(f"| {kind} | {by[kind]} | {' | '.join(cells)} | {wrong or 'none'} |")
    return lines


def summary(result: dict[str, Any]) -> str:
    """One line for the terminal: each kind's median alone."""
    if "error" in result:
        return f"one request at a time: the probe failed ({result['error']})"
    kinds = result["kinds"]
    medians = ", ".join(
        f"{kind} {kinds[kind]['p50']:g}" for kind in kinds if kinds[kind].get("p50") is not None
    )
    wrong = sum(sum(k["wrong_replies"].values()) for k in kinds.values())
    return f"one request at a time, {result['gap_ms']:g} ms apart, p50 ms: {medians}" + (
        f" | {wrong} wrong replies" if wrong else ""
    )
