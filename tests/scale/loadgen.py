"""Open-loop WebSocket load generator: one process, the clients of one plan file.

Run by the harness as ``python -m tests.scale.loadgen PLAN.json`` (one process per core
it is given). Protocol with the harness, one line each on stdout/stdin:

* it prints ``READY {...}`` once every client is connected and has joined its chats
  (a ``get_history`` per chat, so the socket is authorised and receives pushes);
* it waits for ``GO <monotonic_ns>`` on stdin: the start of the measured window;
* every second it prints ``PROGRESS {...}``; at the end it writes the results file named
  in the plan and prints ``DONE``.

Open loop: every send has a place on a fixed timetable (``start + phase + n / rate``) and
is written when its time comes whether or not earlier sends were answered. Latencies are
measured from the *scheduled* time, so a stalled server or a stalled load generator shows
up in the numbers instead of silently lowering the offered rate (no coordinated
omission). ``send_lag`` records how late the generator itself was in writing each send.

Clocks: ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process of a Linux
machine), so a delivery measured in another load generator process is comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import json
import os
import random
import resource
import sys
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import orjson

from shared.runtime import settle_gc
from tests.scale import wsclient
from tests.scale.common import (
    LatencyLog,
    encode_hist,
    make_text,
    msg_key,
    new_hist,
    parse_text,
    raise_nofile,
    record,
)
from tests.scale.wsclient import WsClient

HIST_NAMES = ("send_reply", "delivery", "history_reply", "join_reply", "send_lag")
# Messages shorter than this are decoded every time: engine.io pings ("2") are answered
# by the decoder itself, and short frames cost little to decode.
DECODE_CACHE_MIN = 64
# Key under which on_frame keeps what a pushed message says (chat, scheduled ns, id, key).
_SAID = "\x00said"


class GcPauses:
    """The collector's pauses in this process while installed: how many, the longest,
    and their sum (ms). A generator that stops for a collection sends late and reads
    late, and both show as latency; these say how much of it was its own."""

    def __init__(self) -> None:
        self.collections = 0
        self.max_ms = 0.0
        self.total_ms = 0.0
        self._started = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter_ns()
            return
        pause = (time.perf_counter_ns() - self._started) / 1e6
        self.collections += 1
        self.total_ms += pause
        self.max_ms = max(self.max_ms, pause)

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self)

    def summary(self) -> dict[str, float]:
        return {
            "collections": self.collections,
            "pause_ms_max": round(self.max_ms, 3),
            "pause_ms_total": round(self.total_ms, 3),
        }


class Stats:
    """Everything one process measures."""

    def __init__(self) -> None:
        self.hist = {name: new_hist() for name in HIST_NAMES}
        # The per-delivery latency, the hot path: folded into hist["delivery"] at the end.
        self.delivery = LatencyLog(self.hist["delivery"])
        # The same for each timed request's reply, and for how late it was written.
        self.send_reply = LatencyLog(self.hist["send_reply"])
        self.history_reply = LatencyLog(self.hist["history_reply"])
        self.send_lag = LatencyLog(self.hist["send_lag"])
        # Deliveries per whole second of the window, kept apart from ``timeline`` (a
        # Counter per second) because this one is bumped tens of thousands of times a
        # second; merged into it by :meth:`settle`.
        self.delivery_seconds: defaultdict[int, int] = defaultdict(int)
        # The slowest delivery of each second (µs): when in a long run the tail happened.
        self.delivery_max: defaultdict[int, int] = defaultdict(int)
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        # Per-second counters of the measured window (index: whole seconds since GO).
        self.timeline: dict[int, Counter[str]] = {}
        self.start_ns = 0
        self.end_ns = 0
        self.gc = GcPauses()

    def tick(self, name: str, now_ns: int) -> None:
        if self.start_ns:
            second = (now_ns - self.start_ns) // 1_000_000_000
            bucket = self.timeline.get(second)
            if bucket is None:
                bucket = self.timeline[second] = Counter()
            bucket[name] += 1

    def settle(self) -> None:
        """Fold the hot-path tallies into the histograms and the timeline."""
        for log in (self.delivery, self.send_reply, self.history_reply, self.send_lag):
            log.fold()
        for second, count in self.delivery_seconds.items():
            bucket = self.timeline.get(second)
            if bucket is None:
                bucket = self.timeline[second] = Counter()
            bucket["deliveries"] += count
        for second, micros in self.delivery_max.items():
            bucket = self.timeline.setdefault(second, Counter())
            bucket["delivery_max_us"] = max(bucket["delivery_max_us"], micros)
        self.delivery_seconds.clear()
        self.delivery_max.clear()


# --------------------------------------------------------------------------- adapters


class OursAdapter:
    """The gateway's JSON frames over a plain WebSocket (also the aiohttp/Channels peers)."""

    name = "ours"

    def __init__(self, local_addr: str = "") -> None:
        self.local_addr = local_addr

    async def connect(self, url: str) -> WsClient:
        return await wsclient.connect(url, local_addr=self.local_addr)

    async def handshake(self, ws: WsClient) -> None:
        return None

    def send(self, ws: WsClient, frame: dict[str, Any], rid: int) -> None:
        ws.send_text(orjson.dumps(frame))

    def decode(self, ws: WsClient, data: bytes) -> list[dict[str, Any]]:
        frame = orjson.loads(data)
        return [frame] if isinstance(frame, dict) else []


class SocketIOAdapter:
    """engine.io v4 / socket.io v5 over one WebSocket, written by hand.

    ``0{...}`` open -> send ``40`` -> wait ``40{...}``; ping ``2`` -> pong ``3``;
    requests are ``42<ack>["<event_type>", frame]``, replies ``43<ack>[reply]``,
    pushes ``42["message", push]``. The frames inside are the same as ``ours``.
    """

    name = "socketio"

    def __init__(self, local_addr: str = "") -> None:
        self.local_addr = local_addr

    async def connect(self, url: str) -> WsClient:
        base = url.rstrip("/")
        if base.endswith("/ws"):
            base = base[: -len("/ws")]
        return await wsclient.connect(
            base + "/socket.io/?EIO=4&transport=websocket", local_addr=self.local_addr
        )

    async def handshake(self, ws: WsClient) -> None:
        first = await ws.receive(timeout=15)
        if not first.startswith(b"0"):
            raise ConnectionError(f"engine.io: expected open packet, got {first!r:.80}")
        ws.send_text(b"40")
        while True:
            data = await ws.receive(timeout=15)
            if data == b"2":
                ws.send_text(b"3")
                continue
            if data.startswith(b"40"):
                return
            if data.startswith(b"44"):
                raise ConnectionError(f"socket.io: connect refused {data[:120]!r}")

    def send(self, ws: WsClient, frame: dict[str, Any], rid: int) -> None:
        payload = orjson.dumps([frame["event_type"], frame])
        ws.send_text(b"42" + str(rid).encode() + payload)

    def decode(self, ws: WsClient, data: bytes) -> list[dict[str, Any]]:
        if data == b"2":  # engine.io ping
            ws.send_text(b"3")
            return []
        if data.startswith(b"43"):
            i = 2
            while i < len(data) and 48 <= data[i] <= 57:
                i += 1
            args = orjson.loads(data[i:])
            reply = args[0] if args else {}
            if isinstance(reply, dict):
                reply["request_id"] = data[2:i].decode()
                return [reply]
            return []
        if data.startswith(b"42"):
            args = orjson.loads(data[2:])
            if len(args) >= 2 and isinstance(args[1], dict):
                return [args[1]]
        return []


# ``plainws``: the Channels and bare aiohttp peers speak the gateway's frames, so the same
# adapter serves them under its own name.
ADAPTERS = {"ours": OursAdapter, "plainws": OursAdapter, "socketio": SocketIOAdapter}


# --------------------------------------------------------------------------- clients


class Client:
    """One socket: its identity, chats, send timetables and what it received."""

    __slots__ = (
        "acked",
        "chats",
        "gid",
        "history",
        "joined",
        "next_rid",
        "pending",
        "recv_ids",
        "recv_keys",
        "sends",
        "token",
        "url",
        "user_id",
        "ws",
    )

    def __init__(self, spec: dict[str, Any], urls: list[str]) -> None:
        self.gid: int = spec["gid"]
        self.user_id: str = spec["user_id"]
        self.token: str = spec["token"]
        self.url = urls[spec["url"] % len(urls)]
        self.chats: list[str] = spec["chats"]
        self.sends: list[list[Any]] = spec.get("sends", [])  # [chat, rate, phase_s]
        self.history: list[list[Any]] = spec.get("history", [])  # [chat, rate, phase_s, max_id]
        self.ws: WsClient | None = None
        self.next_rid = 0
        # request id -> (scheduled ns, kind, chat, key)
        self.pending: dict[str, tuple[int, str, str, int]] = {}
        # Machine integers, not lists of int objects: a ten-minute run logs millions, and
        # as objects they cost 36 bytes each, and the generator CPU as its heap grows.
        self.recv_ids: dict[str, array[int]] = {c: array("q") for c in self.chats}
        self.recv_keys: dict[str, array[int]] = {c: array("q") for c in self.chats}
        # (chat, id, client_msg_id, key): tuples of plain values, which the collector stops
        # tracking, so millions of them do not lengthen its full collections.
        self.acked: list[tuple[str, int | None, str | None, int]] = []
        self.joined: dict[str, asyncio.Future[bool]] = {}

    def rid(self) -> int:
        self.next_rid += 1
        return self.next_rid


class LoadGen:
    """One process's clients, their reader and sender tasks, and the results file."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.tag: str = plan["run_tag"]
        self.stats = Stats()
        self.clients = [Client(spec, plan["urls"]) for spec in plan["clients"]]
        self.pad = max(0, int(plan.get("text_bytes", 64)) - 40)
        self.history_limit = int(plan.get("history_limit", 50))
        self.last_frame_ns = 0
        self.measuring = False
        self.stopping = False
        self.adapter: Any = None
        self.adapters: list[Any] = []
        # The last large message decoded, and what it decoded to (shared by all sockets).
        self._last_decoded: list[Any] = [b"", []]

    # ---- frames in

    def on_frame(self, client: Client, frame: dict[str, Any], now: int) -> None:
        stats = self.stats
        self.last_frame_ns = now
        rid = frame.get("request_id")
        if rid is not None:
            pending = client.pending.pop(str(rid), None)
            if pending is None:
                stats.counts["unexpected_reply"] += 1
                return
            sched, kind, chat, key = pending
            ok = frame.get("type") == "success"
            if kind == "join":
                fut = client.joined.get(chat)
                if ok:
                    record(stats.hist["join_reply"], (now - sched) // 1000)
                else:
                    # Setup phase, not the measured window: counted apart from errors.
                    stats.counts["setup_join_" + str(frame.get("type"))] += 1
                if fut is not None and not fut.done():
                    fut.set_result(ok)
                return
            if not ok:
                stats.errors[f"{kind}:{frame.get('type')}"] += 1
                stats.tick("error", now)
                return
            if kind == "send":
                stats.send_reply.append((now - sched) // 1000)
                stats.counts["acked"] += 1
                stats.tick("acked", now)
                messages = frame.get("messages") or []
                if messages:
                    m = messages[0]
                    mid = _int_id(m.get("id"))
                    client.acked.append((chat, mid, m.get("client_msg_id"), key))
                else:
                    client.acked.append((chat, None, None, key))
            elif kind == "history":
                stats.history_reply.append((now - sched) // 1000)
                stats.counts["history_ok"] += 1
                stats.tick("history_ok", now)
                messages = frame.get("messages") or []
                ids = sorted(_int_id(m.get("id")) or 0 for m in messages)
                want = list(range(key - self.history_limit, key))
                if ids != want:
                    stats.counts["history_wrong"] += 1
            return
        # A push: no request id.
        counts = stats.counts
        if frame.get("type") != "success":
            stats.errors["push:" + str(frame.get("type"))] += 1
            return
        for m in frame.get("messages") or ():
            # What the message says is the same for every member that gets these bytes
            # (decoded once, see attach): worked out by the first, kept in the message.
            said = m.get(_SAID)
            if said is None:
                chat = m.get("chat_id")
                parsed = parse_text(m.get("text") or "")
                said = m[_SAID] = (
                    str(chat) if chat is not None else "",
                    parsed[0] if parsed else None,
                    _int_id(m.get("id")) or -1,
                    msg_key(parsed[1], parsed[2]) if parsed else 0,
                )
            chat, sched, mid, key = said
            if sched is None:
                stats.counts["push_unparsed"] += 1
                continue
            micros = (now - sched) // 1000
            stats.delivery.append(micros)
            counts["deliveries"] += 1
            if stats.start_ns:
                second = (now - stats.start_ns) // 1_000_000_000
                stats.delivery_seconds[second] += 1
                if micros > stats.delivery_max[second]:
                    stats.delivery_max[second] = micros
                if now > stats.end_ns:
                    counts["deliveries_after_window"] += 1
            ids = client.recv_ids.get(chat)
            if ids is None:
                stats.counts["push_foreign_chat"] += 1
                continue
            ids.append(mid)
            client.recv_keys[chat].append(key)

    def attach(self, client: Client, ws: WsClient) -> None:
        """Hand every later message of ``ws`` to :meth:`on_frame` as it is parsed."""
        decode = self.adapter.decode
        on_frame = self.on_frame
        counts = self.stats.counts
        last = self._last_decoded

        def on_message(data: bytes) -> None:
            now = time.monotonic_ns()
            if data == last[0]:
                # A room's push reaches every member as the same bytes, one after the
                # other: decoded once, not once per member (on_frame only adds its _SAID).
                frames = last[1]
            else:
                try:
                    frames = decode(ws, data)
                except (ValueError, IndexError):
                    counts["undecodable_frame"] += 1
                    return
                if len(data) >= DECODE_CACHE_MIN:
                    last[0], last[1] = data, frames
            for frame in frames:
                on_frame(client, frame, now)

        def on_close() -> None:
            if not self.stopping:
                counts["disconnects"] += 1
                for fut in client.joined.values():
                    if not fut.done():
                        fut.set_result(False)

        ws.on_close = on_close
        ws.listen(on_message)
        if ws.closed:
            on_close()

    # ---- frames out

    def frame(self, client: Client, kind: str, chat: str, rid: int, **extra: Any) -> dict[str, Any]:
        event = "send_message" if kind == "send" else "get_history"
        frame: dict[str, Any] = {
            "chat_id": chat,
            "token": client.token,
            "event_type": event,
            "message": None,
            "request_id": str(rid),
        }
        frame.update(extra)
        return frame

    def write(self, client: Client, frame: dict[str, Any], rid: int) -> bool:
        ws = client.ws
        if ws is None or ws.closed:
            self.stats.errors["send_on_closed_socket"] += 1
            return False
        try:
            self.adapter.send(ws, frame, rid)
        except (ConnectionError, RuntimeError):
            self.stats.errors["send_failed"] += 1
            return False
        return True

    async def join(self, client: Client, timeout: float, attempts: int = 4) -> bool:
        """``get_history`` on each chat until it succeeds (a few tries, with backoff)."""
        for chat in client.chats:
            for attempt in range(attempts):
                if attempt:
                    self.stats.counts["join_retries"] += 1
                    await asyncio.sleep(0.5 * attempt + random.random())
                rid = client.rid()
                fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                client.joined[chat] = fut
                client.pending[str(rid)] = (time.monotonic_ns(), "join", chat, 0)
                frame = self.frame(client, "join", chat, rid)
                if not self.write(client, frame, rid):
                    return False
                try:
                    if await asyncio.wait_for(fut, timeout):
                        break
                except TimeoutError:
                    client.pending.pop(str(rid), None)
                    self.stats.counts["setup_join_timeout"] += 1
                if client.ws is None or client.ws.closed:
                    return False
            else:
                return False
        return True

    async def drive(self, jobs: list[tuple[float, float, Callable[[int, int, int], bool]]]) -> None:
        """Every timed request of this process, from one task.

        ``jobs`` holds ``(rate, phase, fire)`` per sender: its n-th request (n = 1, 2,
        ...) is due at ``start + phase + (n - 1) / rate`` and is made by ``fire(n,
        scheduled ns, reference ns)``, which returns False when that sender must stop.
        One timer for the earliest due request instead of a sleeping task per sender:
        a task's wake-up, its timer and its future cost the generator ~10 µs a request,
        CPU it takes from the servers it measures on the same cores.

        Event loop timers have millisecond resolution and fire up to 1 ms late, which
        would add up to 1 ms to every measured latency. So it wakes up to 1 ms early and
        measures from ``min(scheduled, actual)``: a late request is still measured from
        its scheduled time (no coordinated omission), an early one from when it was
        written.
        """
        start, end = self.stats.start_ns, self.stats.end_ns
        intervals = [1e9 / rate for rate, _, _ in jobs]
        offsets = [phase * 1e9 for _, phase, _ in jobs]
        due = [(start + int(offsets[i]), i, 0) for i in range(len(jobs))]
        heapq.heapify(due)
        while due and not self.stopping:
            sched, i, n = due[0]
            if sched >= end:
                break  # the earliest is past the window: every sender is done
            now = time.monotonic_ns()
            if sched - now > 1_000_000:
                # Once, then it is written: checking again would spin the loop through
                # the timers' rounding (a timer under 1 ms fires at once).
                await asyncio.sleep((sched - now - 1_000_000) / 1e9)
                if self.stopping:
                    break
                now = time.monotonic_ns()  # due[0] is still this request: only we change it
            if jobs[i][2](n + 1, sched, now if now < sched else sched):
                n += 1
                heapq.heapreplace(due, (start + int(offsets[i] + n * intervals[i]), i, n))
            else:
                heapq.heappop(due)

    def _issue(
        self, client: Client, frame: dict[str, Any], rid: int, pending: tuple[int, str, str, int]
    ) -> bool:
        """Write a timed request; False (and forgotten) when the socket cannot take it."""
        client.pending[str(rid)] = pending
        if self.write(client, frame, rid):
            return True
        client.pending.pop(str(rid), None)
        return False

    def sender(self, client: Client, chat: str) -> Callable[[int, int, int], bool]:
        """The ``fire`` of one socket's sends to one chat (see :meth:`drive`)."""
        stats = self.stats
        tag = self.tag
        counts = stats.counts
        lag = stats.send_lag
        pad = self.pad

        def fire(n: int, sched: int, ref: int) -> bool:
            rid = client.rid()
            message = {
                "type": "text",
                "text": make_text(ref, client.gid, n, pad),
                "client_msg_id": f"{tag}-{client.gid}-{n}",
            }
            frame = self.frame(client, "send", chat, rid, message=message)
            lag.append((time.monotonic_ns() - sched) // 1000)
            counts["sent"] += 1
            stats.tick("sent", sched)
            return self._issue(client, frame, rid, (ref, "send", chat, msg_key(client.gid, n)))

        return fire

    def history_reader(
        self, client: Client, chat: str, max_id: int
    ) -> Callable[[int, int, int], bool]:
        """The ``fire`` of one socket's timed ``get_history`` requests (see :meth:`drive`)."""
        stats = self.stats
        rng = random.Random(client.gid)
        low = self.history_limit + 1

        def fire(n: int, sched: int, ref: int) -> bool:
            rid = client.rid()
            before = rng.randint(low, max_id + 1) if max_id + 1 >= low else max_id + 1
            frame = self.frame(
                client,
                "history",
                chat,
                rid,
                message={"limit": self.history_limit, "before_id": str(before)},
            )
            stats.counts["history_sent"] += 1
            stats.tick("history_sent", sched)
            return self._issue(client, frame, rid, (ref, "history", chat, before))

        return fire

    # ---- phases

    async def connect_all(self) -> None:
        plan = self.plan
        limit = asyncio.Semaphore(int(plan.get("connect_concurrency", 64)))
        join_timeout = float(plan.get("join_timeout", 30))
        # Joins in flight at once: a connect storm of get_history would otherwise outrun
        # the server's request timeout (that is a separate experiment).
        joins = asyncio.Semaphore(int(plan.get("join_concurrency", 128)))

        per_url: Counter[str] = Counter()
        adapter_of: dict[int, Any] = {}
        for client in self.clients:
            adapter_of[client.gid] = self.adapters[per_url[client.url] % len(self.adapters)]
            per_url[client.url] += 1

        async def one(client: Client) -> None:
            adapter = adapter_of[client.gid]
            async with limit:
                for attempt in range(3):
                    try:
                        ws = await adapter.connect(client.url)
                        await adapter.handshake(ws)
                        client.ws = ws
                        break
                    except (TimeoutError, ConnectionError, OSError) as exc:
                        self.stats.counts["connect_retries"] += 1
                        reason = f"connect:{type(exc).__name__}"
                        if isinstance(exc, wsclient.HandshakeError):
                            reason += f":{exc.status}"
                        if self.stats.errors[reason] == 0:
                            print(f"loadgen: {client.url}: {exc!r}", file=sys.stderr)
                        self.stats.errors[reason] += 1
                        await asyncio.sleep(0.2 * (attempt + 1))
                if client.ws is None:
                    self.stats.counts["connect_failed"] += 1
                    return
                self.attach(client, client.ws)
            if client.chats and plan.get("join", True):
                async with joins:
                    ok = await self.join(client, join_timeout)
                if ok:
                    self.stats.counts["joined"] += 1
                else:
                    self.stats.counts["join_failed"] += 1

        await asyncio.gather(*(one(c) for c in self.clients))
        self.stats.counts["connected"] = sum(1 for c in self.clients if c.ws is not None)

    async def progress(self) -> None:
        last = Counter(self.stats.counts)
        while True:
            await asyncio.sleep(1.0)
            counts = self.stats.counts
            errors = sum(self.stats.errors.values())
            line = {
                "sent": counts["sent"],
                "acked": counts["acked"],
                "deliveries": counts["deliveries"],
                "history_ok": counts["history_ok"],
                "errors": errors,
                "disconnects": counts["disconnects"],
                "pending": sum(len(c.pending) for c in self.clients),
                "sent_per_s": counts["sent"] - last["sent"],
                "deliveries_per_s": counts["deliveries"] - last["deliveries"],
            }
            last = Counter(counts)
            _say("PROGRESS", line)

    async def run(self) -> None:
        plan = self.plan
        # One adapter per loopback source address: one address gives at most ~28k
        # sockets to one server port (the ephemeral port range), several give more.
        self.adapters = [
            ADAPTERS[plan["adapter"]](addr) for addr in plan.get("source_addrs") or [""]
        ]
        self.adapter = self.adapters[0]
        try:
            t0 = time.monotonic()
            rss_start = _rss_kb()
            await self.connect_all()
            ready = {
                "connected": self.stats.counts["connected"],
                "connect_failed": self.stats.counts["connect_failed"],
                "joined": self.stats.counts["joined"],
                "join_failed": self.stats.counts["join_failed"],
                "setup_s": round(time.monotonic() - t0, 2),
                "rss_kb": _rss_kb(),
                "rss_kb_start": rss_start,
            }
            # As the servers do (shared.runtime.settle_gc): what setup made is frozen out
            # of the collector's sight, and young collections come less often.
            settle_gc()
            _say("READY", ready)
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            if not line.startswith("GO"):
                raise SystemExit("loadgen: harness went away before GO")
            stats = self.stats
            stats.start_ns = int(line.split()[1])
            stats.end_ns = stats.start_ns + int(float(plan["duration"]) * 1e9)
            cpu0 = os.times()
            stats.gc.install()
            # Nor does the collector run in the window and its drain: its pauses would be
            # the generator's latency counted as the servers' (at 15,000 sockets, 5
            # collections of up to 39 ms in 25 s). Only cyclic garbage waits, for as long
            # as the window and the drain last.
            gc.disable()
            progress = asyncio.create_task(self.progress())
            jobs: list[tuple[float, float, Callable[[int, int, int], bool]]] = []
            for client in self.clients:
                if client.ws is None:
                    continue
                for chat, rate, phase in client.sends:
                    jobs.append((rate, phase, self.sender(client, chat)))
                for chat, rate, phase, max_id in client.history:
                    jobs.append((rate, phase, self.history_reader(client, chat, max_id)))
            driver = asyncio.create_task(self.drive(jobs))
            now = time.monotonic_ns()
            if stats.end_ns > now:
                await asyncio.sleep((stats.end_ns - now) / 1e9)
            await driver
            cpu1 = os.times()
            stats.gc.remove()
            # Drain: wait for outstanding replies and for the pushes to stop arriving.
            drain_deadline = time.monotonic() + float(plan.get("drain", 10))
            quiet_ns = int(float(plan.get("quiet", 1.5)) * 1e9)
            while time.monotonic() < drain_deadline:
                pending = sum(len(c.pending) for c in self.clients)
                if pending == 0 and time.monotonic_ns() - self.last_frame_ns > quiet_ns:
                    break
                await asyncio.sleep(0.1)
            # Only now: the first collection walks all the window left (~40 ms at 15,000
            # sockets), which would hold up the deliveries still on their way.
            gc.enable()
            progress.cancel()
            self.stopping = True
            self.write_results(cpu0, cpu1)
        finally:
            self.stopping = True
            for client in self.clients:
                if client.ws is not None:
                    with contextlib.suppress(Exception):
                        await client.ws.close()

    def write_results(self, cpu0: os.times_result, cpu1: os.times_result) -> None:
        stats = self.stats
        stats.settle()
        unanswered: Counter[str] = Counter()
        for client in self.clients:
            for _sched, kind, _chat, _key in client.pending.values():
                if kind != "join":
                    unanswered[kind] += 1
        counts = dict(stats.counts)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result = {
            "proc": self.plan["proc"],
            "adapter": self.plan["adapter"],
            "run_tag": self.tag,
            "duration": self.plan["duration"],
            "counts": counts,
            "unanswered": dict(unanswered),
            "errors": dict(stats.errors),
            "hist": {name: encode_hist(h) for name, h in stats.hist.items()},
            "timeline": {str(k): dict(v) for k, v in sorted(stats.timeline.items())},
            "cpu_window_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 3),
            "gc": stats.gc.summary(),
            "cpu_total_s": round(usage.ru_utime + usage.ru_stime, 3),
            "maxrss_kb": usage.ru_maxrss,
            "clients": [
                {
                    "gid": c.gid,
                    "user_id": c.user_id,
                    "connected": c.ws is not None,
                    "chats": c.chats,
                    "recv_ids": {chat: ids.tolist() for chat, ids in c.recv_ids.items()},
                    "recv_keys": {chat: keys.tolist() for chat, keys in c.recv_keys.items()},
                    "acked": c.acked,
                }
                for c in self.clients
            ],
        }
        out = self.plan["out"]
        tmp = out + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(result))
        os.replace(tmp, out)


def _int_id(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _rss_kb() -> int:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    return 0


def _say(tag: str, payload: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.scale.loadgen PLAN.json", file=sys.stderr)
        return 2
    with open(args[0], "rb") as fh:
        plan = orjson.loads(fh.read())
    raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    gen = LoadGen(plan)
    # Hard bound on this process's life, whatever happens to the harness.
    max_seconds = float(plan.get("max_seconds", 600))

    async def bounded() -> None:
        await asyncio.wait_for(gen.run(), max_seconds)

    try:
        asyncio.run(bounded())
    except TimeoutError:
        print(f"loadgen {plan['proc']}: hit its {max_seconds:.0f}s limit", file=sys.stderr)
        return 3
    _say("DONE", {"out": plan["out"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
