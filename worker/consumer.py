"""The worker's read loop: owned partition streams in, replies and pushes out.

For each batch: process (store), then PUBLISH every reply and push in stream order,
and only then XACK. A failure anywhere before the ack leaves the entries pending: the
batch is retried here with backoff (``suspect`` processing finds what was already
stored), or, if this worker dies, claimed by the partition's next owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared.backoff import Backoff, run_every
from shared.codec import decode_stream_entry, encode_push, encode_reply_envelope, entry_payload
from shared.keys import CONSUMER_GROUP, Keys
from shared.logs import describe_error
from shared.metrics import WorkerMetrics
from shared.protocol import GET_HISTORY
from shared.resp import RespConnection, RespError

from .partitions import PartitionManager
from .processor import (
    AlreadyStored,
    Counters,
    Item,
    Outcome,
    Processor,
    StaleOwner,
    entry_age_ms,
)

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0
# Beyond its BLOCK time, how long a stream read may take before the connection is dropped.
READ_TIMEOUT = 5.0

# Weight of the newest batch in the running average of the time per read.
COST_SMOOTHING = 0.2

# How often the entries every worker is done with are trimmed from the owned streams,
# and at most how many XTRIM calls a stream gets per round (each removes at most
# 100 nodes' worth with "~", 10,000 entries at Redis's defaults, so no call is long).
TRIM_EVERY = 5.0
TRIM_CALLS = 10
# An entry of an owned partition pending this many leases without being handled was
# left behind: read by a worker that then lost the partition (after the new owner had
# claimed its pending entries), or dropped by this one while it could not vouch for its
# lease. Looked for once a lease, between batches, and handled again.
STUCK_AFTER_LEASES = 2.0


class RedisClock:
    """Redis's clock, which stamps stream entry ids, estimated from the local one.

    An entry's age is measured on the clock that stamped it, so skew between the
    gateway's, Redis's and this worker's machines does not matter. The offset is taken
    from Redis ``TIME`` as the best of ``samples`` round trips (see :func:`clock_offset`):
    on first use, then every ``refresh`` s by :meth:`run`, off the batch path, so no
    batch waits for those round trips.
    """

    def __init__(self, refresh: float = 30.0, samples: int = 5) -> None:
        self.refresh = refresh
        self.samples = samples
        self._offset = 0.0
        self._taken = False

    async def now_ms(self, redis: Redis) -> float:
        """Redis's current time in milliseconds (``TIME`` is read only on first use)."""
        if not self._taken:
            await self.take_offset(redis)
        return (time.time() + self._offset) * 1000.0

    async def take_offset(self, redis: Redis) -> None:
        """Measure the offset now."""
        readings = []
        for _ in range(self.samples):
            before = time.time()
            seconds, micros = await redis.time()
            readings.append((before, seconds + micros / 1e6, time.time()))
        self._offset = clock_offset(readings)
        self._taken = True

    async def run(self, redis: Redis) -> None:
        """Measure the offset again every ``refresh`` s until cancelled. A failed
        measurement keeps the last offset (clocks drift by far less than a millisecond
        in a minute) and is retried sooner, with a bounded backoff."""
        await run_every(
            self.refresh,
            lambda: self.take_offset(redis),
            log,
            "redis clock not read; retrying",
            base=1.0,
        )


def clock_offset(readings: list[tuple[float, float, float]]) -> float:
    """Remote minus local clock, in seconds, from ``(sent, remote time, received)``
    readings (local Unix seconds around each remote one).

    A reading is off by at most half its round trip. One round trip can be stretched to
    a millisecond or more on a busy machine (the event loop runs other callbacks before
    resuming the caller, or the process is preempted), and a single such reading would
    shift every stream wait of the next ``refresh`` seconds by half of it. So the
    shortest round trip is the one believed, as NTP does.
    """
    sent, remote, received = min(readings, key=lambda r: r[2] - r[0])
    return remote - (sent + received) / 2


class Consumer:
    """Reads owned partitions in batches and hands them to the processor."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        node_id: str,
        partitions: PartitionManager,
        processor: Processor,
        counters: Counters,
        metrics: WorkerMetrics,
        *,
        batch: int,
        block_ms: int,
        backoff_cap: float,
        redis_url: str,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.node_id = node_id
        self.partitions = partitions
        self.processor = processor
        self.counters = counters
        self.metrics = metrics
        self.batch = batch
        self.block_ms = block_ms
        self.backoff_cap = backoff_cap
        self.stopping = False
        self.redis_ok = True
        self.mongo_ok = True
        self._groups: set[str] = set()
        self._sampled: set[str] = set()
        self._reclaim = False
        self._next_sweep = time.monotonic() + partitions.lease
        # PUBLISH and XACK go through a lean connection of their own (shared/resp.py):
        # one command per reply and push is the worker's hottest Redis path.
        self._redis_url = redis_url
        self._out: RespConnection | None = None
        # XREADGROUP too: one blocking read per batch, on a lean connection of its own.
        self._in: RespConnection | None = None
        self.clock = RedisClock()
        # The XREADGROUP of new entries for the partitions it was built for.
        self._new_reads: tuple[tuple[int, ...], list[Any]] | None = None
        # Recent batch time (read to replies published) per history read in the batch.
        self.read_cost_ms = 0.0

    async def run(self) -> None:
        """Read and handle batches until cancelled or :attr:`stopping`."""
        try:
            await self._loop()
        finally:
            if self._out is not None:
                self._out.close()
                self._out = None
            if self._in is not None:
                self._in.close()
                self._in = None

    async def _loop(self) -> None:
        backoff = Backoff(cap=self.backoff_cap)
        while not self.stopping:
            try:
                await self.partitions.hand_back_surplus()
                fresh = self.partitions.take_fresh()
                if self._reclaim:
                    # After a Redis failure an XACK may have been lost (a crash loses up to
                    # a second of AOF): re-read our own pending entries, not only new ones.
                    fresh = sorted(set(fresh) | set(self.partitions.readable()))
                    self._reclaim = False
                if fresh:
                    # New owner: counters may be stale, and the old owner's pending
                    # entries come first.
                    self.counters.forget()
                    for partition in fresh:
                        await self._recover(partition)
                owned = self.partitions.readable()
                if not owned:
                    await self.partitions.wait_changed(0.5)
                    continue
                if time.monotonic() >= self._next_sweep:
                    self._next_sweep = time.monotonic() + self.partitions.lease
                    if await self._claim_stuck(owned):
                        self._reclaim = True  # handled as after a recovery, first
                        continue
                items = await self._read(owned, ">")
                self.redis_ok = True
                await self._handle_read(items, suspect=False)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, RespError) as exc:
                self.redis_ok = False
                self._reclaim = True
                log.warning("stream read failed", extra={"error": describe_error(exc)})
                await backoff.sleep()
            except Exception:
                log.exception("consumer loop failed; retrying")
                await backoff.sleep()

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            # From the start: entries added before any worker existed are not skipped.
            await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def _recover(self, partition: int) -> None:
        """Claim every pending entry of the partition and handle them before new ones."""
        stream = self.keys.stream(partition)
        await self._ensure_group(stream)
        await self._claim(stream, 0)
        last = "0"
        while self.partitions.holds(partition):
            items = await self._read([partition], last)
            if not items:
                break
            last = items[-1].entry_id if items else last
            log.info("recovering pending entries", extra={"partition": partition, "n": len(items)})
            await self._handle_read(items, suspect=True)

    async def _claim_stuck(self, partitions: list[int]) -> int:
        """Claim the entries of ``partitions`` pending for ``STUCK_AFTER_LEASES`` leases
        or more, whoever holds them; returns how many."""
        idle_ms = int(STUCK_AFTER_LEASES * self.partitions.lease * 1000)
        claimed = 0
        for partition in partitions:
            stream = self.keys.stream(partition)
            if stream in self._groups:  # else never read here: claimed on taking it
                claimed += await self._claim(stream, idle_ms)
        if claimed:
            log.warning("claimed entries left pending", extra={"n": claimed})
        return claimed

    async def _claim(self, stream: str, min_idle_ms: int) -> int:
        """Make this worker the consumer of every entry of ``stream`` pending for at
        least ``min_idle_ms``, whoever holds it; returns how many."""
        claimed = 0
        cursor = "0-0"
        while True:
            result = await self.redis.xautoclaim(
                stream, CONSUMER_GROUP, self.node_id, min_idle_time=min_idle_ms,
                start_id=cursor, count=self.batch,
            )  # fmt: skip
            # Reply: [next cursor, claimed entries, ids deleted while pending (Redis 7)].
            claimed += len(result[1])
            cursor = _text(result[0])
            if cursor == "0-0":
                return claimed

    def _read_command(self, partitions: list[int], start: str, block: int | None) -> list[Any]:
        command: list[Any] = ["XREADGROUP", "GROUP", CONSUMER_GROUP, self.node_id]
        command += ["COUNT", self.batch]
        if block is not None:
            command += ["BLOCK", block]
        streams = [self.keys.stream(p) for p in partitions]
        command += ["STREAMS", *streams, *([start] * len(streams))]
        return command

    async def _read(self, partitions: list[int], start: str) -> list[Item]:
        owned = tuple(partitions)
        block = self.block_ms if start == ">" else None
        if start == ">" and self._new_reads is not None and self._new_reads[0] == owned:
            # The same partitions as last time (nearly always): the same command, and
            # their groups are known to exist.
            command = self._new_reads[1]
        else:
            command = self._read_command(partitions, start, block)
            for partition in partitions:
                stream = self.keys.stream(partition)
                if stream not in self._groups:
                    await self._ensure_group(stream)
            if start == ">":
                self._new_reads = (owned, command)
        if self._in is None or self._in.closed:
            self._in = await RespConnection.open(self._redis_url, name=f"worker-in:{self.node_id}")
        try:
            (response,) = await self._in.execute([command], (block or 0) / 1000 + READ_TIMEOUT)
        except RespError as exc:
            if "NOGROUP" in str(exc):
                # Redis lost the group (restarted without its data): create it again.
                self._groups.clear()
                self._new_reads = None
                return []
            raise
        items: list[Item] = []
        dead: dict[str, list[str]] = defaultdict(list)
        # RESP2: [[stream, [[id, [field, value, ...] or nil], ...]], ...], or nil.
        rows = cast(list[Any], response or [])
        for stream_name, entries in rows:
            stream = stream_name.decode()
            partition = self.keys.stream_partition(stream)
            for raw_id, fields in entries:
                entry_id = raw_id.decode()
                payload = entry_payload(fields)
                if payload is None:
                    dead[stream].append(entry_id)  # trimmed away while pending
                    continue
                try:
                    entry = decode_stream_entry(payload)
                except (ValueError, KeyError, TypeError):
                    log.error("dropping corrupt stream entry", extra={"entry": entry_id})
                    dead[stream].append(entry_id)
                    continue
                items.append(Item(stream, entry_id, partition, entry))
        for stream, ids in dead.items():
            await self.redis.xack(stream, CONSUMER_GROUP, *ids)
        if start == ">" and items:
            # Queueing in front of the worker, on the clock that stamped the ids.
            now_ms = await self.clock.now_ms(self.redis)
            observe = self.metrics.stream_wait_seconds.observe
            for item in items:
                observe(entry_age_ms(item.entry_id, now_ms) / 1000.0)
        return items

    async def _handle_read(self, items: list[Item], *, suspect: bool) -> None:
        # XREADGROUP's COUNT is per stream: one read can bring a batch from every owned
        # partition. Handled (and answered) a batch at a time, so replies do not wait
        # for the whole read.
        read_at = time.monotonic()
        for start in range(0, len(items), self.batch):
            await self._handle(items[start : start + self.batch], suspect=suspect, read_at=read_at)

    async def _handle(self, items: list[Item], *, suspect: bool, read_at: float) -> None:
        """Process, publish, ack; retry with backoff until done or the partitions are lost."""
        backoff = Backoff(cap=self.backoff_cap)
        started = time.monotonic()
        reads = any(i.entry.timeout and i.entry.event_type == GET_HISTORY for i in items)
        self.metrics.batch_size.observe(len(items))
        outcome: Outcome | None = None
        while True:
            # Never write for a partition whose lease this worker can no longer vouch for;
            # wait while it is unsure (its presence or lease not yet confirmed again).
            await self.partitions.settle({i.partition for i in items}, self.partitions.lease)
            items = [i for i in items if self.partitions.holds(i.partition)]
            if not items:
                return
            try:
                if outcome is None:
                    now_ms = None
                    if reads:
                        now_ms = await self.clock.now_ms(self.redis)
                    outcome = await self.processor.process(
                        items, suspect=suspect, now_ms=now_ms, read_cost_ms=self.read_cost_ms
                    )
                    self.mongo_ok = True
                await self._publish_and_ack(items, outcome)
                self.redis_ok = True
                self.metrics.batch_seconds.observe(time.monotonic() - read_at)
                if outcome.reads:
                    cost = (time.monotonic() - started) * 1000.0 / outcome.reads
                    self.read_cost_ms += COST_SMOOTHING * (cost - self.read_cost_ms)
                return
            except asyncio.CancelledError:
                raise
            except AlreadyStored as exc:
                # Not an error: a retry among fresh entries. Look it up and answer it.
                self.metrics.retry("already_stored")
                log.debug("duplicate among fresh entries", extra={"index": str(exc)})
                suspect = True
            except StaleOwner as exc:
                self.metrics.retry("stale_owner")
                log.warning("sequence conflict; reloading", extra={"error": str(exc)})
                suspect = True
                await self.partitions.tick()
            except (RedisError, OSError, RespError) as exc:
                self.redis_ok = False
                self.metrics.retry("redis")
                log.warning("publish failed; retrying", extra={"error": describe_error(exc)})
                await backoff.sleep()
            except Exception as exc:
                # MongoDB unavailable (or any other failure): nothing is acked, retry.
                self.mongo_ok = _is_mongo_up(exc)
                self.metrics.retry("mongo")
                log.warning("batch failed; retrying", extra={"error": describe_error(exc)})
                suspect = True
                await backoff.sleep()

    async def _publish_and_ack(self, items: list[Item], outcome: Outcome) -> None:
        acks: dict[str, list[str]] = defaultdict(list)
        for item in items:
            acks[item.stream].append(item.entry_id)
        commands: list[tuple[Any, ...]] = []
        for kind, index in outcome.order:
            if kind == "r":
                node, reply = outcome.replies[index]
                commands.append(
                    ("PUBLISH", self.keys.node_channel(node), encode_reply_envelope(reply))
                )
            else:
                push = outcome.pushes[index]
                commands.append(
                    ("PUBLISH", self.keys.chat_channel(push.chat_id), encode_push(push))
                )
        for stream, ids in acks.items():
            commands.append(("XACK", stream, CONSUMER_GROUP, *ids))
        if self._out is None or self._out.closed:
            self._out = await RespConnection.open(
                self._redis_url, name=f"worker-out:{self.node_id}"
            )
        await self._out.execute(commands, PUBLISH_TIMEOUT)

    async def trim_streams(self) -> int:
        """Remove what every worker is done with from each owned partition's stream: the
        entries older than the oldest pending one, or with none pending, than the last
        one delivered. Returns how many were removed.

        Without this an acknowledged entry stays until ``STREAM_MAXLEN`` pushes it out,
        so Redis would hold that many entries per partition for good (~350 bytes each in
        the chat workload). ``STREAM_MAXLEN`` remains the bound of a backlog that no
        worker reads. Pending and unread entries are never removed, whoever owns the
        partition: the group's state is read in one MULTI, and an entry only ever
        becomes pending after it was delivered, with an id above the last delivered.
        """
        removed = 0
        for partition in self.partitions.readable():
            stream = self.keys.stream(partition)
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.xinfo_groups(stream)
                    pipe.xpending(stream, CONSUMER_GROUP)
                    groups, pending = await pipe.execute()
            except ResponseError:
                continue  # no stream or no group yet: nothing was read
            ours = _workers_group(groups)
            if ours is None:
                continue
            if pending.get("pending"):
                oldest = _text(pending["min"])
            else:
                oldest = _text(ours.get("last-delivered-id"))
            if oldest == "0-0":
                continue
            for _ in range(TRIM_CALLS):
                n = int(await self.redis.xtrim(stream, minid=oldest, approximate=True))
                removed += n
                if n == 0:
                    break
        if removed:
            log.debug("streams trimmed", extra={"n": removed})
        return removed

    async def run_trim(self, every: float = TRIM_EVERY) -> None:
        """:meth:`trim_streams` every ``every`` s until cancelled; a failed round is
        logged and the next one comes sooner, with a bounded backoff."""
        await run_every(every, self.trim_streams, log, "stream trim failed; retrying")

    async def sample_streams(self) -> None:
        """Length, backlog (entries not yet read) and pending count (read, not yet
        acknowledged) of each owned partition's stream, for /metrics."""
        m = self.metrics
        owned = {str(p) for p in self.partitions.readable()}
        for label in self._sampled - owned:
            # Another worker reports it now; a stale series here would double count.
            for gauge in (m.stream_length, m.stream_pending, m.stream_lag):
                with contextlib.suppress(KeyError):
                    gauge.remove(label)
        self._sampled = owned
        for partition in self.partitions.readable():
            stream = self.keys.stream(partition)
            try:
                length = await self.redis.xlen(stream)
                groups: Any = await self.redis.xinfo_groups(stream)
            except ResponseError:
                continue  # no stream yet
            ours = _workers_group(groups)
            # Without the group nothing has been read yet. Redis (7.0+) cannot tell the
            # lag in some cases (entries deleted with XDEL, a group moved to an arbitrary
            # id): then the series is left out rather than guessed.
            lag = length if ours is None else ours.get("lag")
            label = str(partition)
            m.stream_length.labels(label).set(length)
            m.stream_pending.labels(label).set(ours.get("pending", 0) if ours else 0)
            if lag is None:
                with contextlib.suppress(KeyError):
                    m.stream_lag.remove(label)
            else:
                m.stream_lag.labels(label).set(lag)


def _is_mongo_up(exc: Exception) -> bool:
    from pymongo.errors import AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError

    return not isinstance(exc, ConnectionFailure | AutoReconnect | ServerSelectionTimeoutError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _workers_group(groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The workers' consumer group among a stream's ``XINFO GROUPS`` (None: not created)."""
    return next((g for g in groups if _text(g.get("name")) == CONSUMER_GROUP), None)
