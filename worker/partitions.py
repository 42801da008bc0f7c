"""Partition ownership through leases in Redis.

Each partition has a lease key holding its owner's node id with a TTL. Owners renew
every third of the lease; a worker that dies loses its partitions when the TTL runs
out, and the others take them over. Live workers register in a sorted set, and each
aims at a fair share (ceil(partitions / live workers)): it takes free partitions up
to its share and hands back the surplus, between batches, when more workers join.

A worker trusts its own lease only until ``renewed_at + 0.9 * lease``; past that it
stops writing. The unique (chat_id, seq) index fences a worker that was paused
longer than that and wakes up thinking it still owns its partitions.

Between rounds, every worker looks every ``FREE_CHECK`` seconds (one pipelined round
trip) for free partitions. One below its fair share takes them at once: another worker
released them (it drained, or handed back its surplus when this one joined), and the
hand-over costs them a fraction of a second instead of up to a whole round. Any worker
takes a partition that has stayed free for ``ORPHAN_GRACE`` seconds (its owner died),
even above its share: by then every worker below its share has had two looks at it.

A partition is free when no lease names an owner, or when its owner is dead. A lease
outlives a crashed process by up to ``LEASE_SECONDS``, so each worker also keeps a
*presence* connection to Redis and registers its client id; when the process dies its
kernel closes that connection and Redis forgets the id at once. A worker whose
registered id Redis has not had for ``DEAD_AFTER`` seconds, over looks that saw the
same id, is dead: its partitions are taken over (compare-and-set on the lease) without
waiting for its leases to run out. What this cannot see (a host that vanished without
closing its connections, a Redis that refuses the ``CLIENT`` commands, a worker of an
earlier release that registers nothing) falls back to lease expiry.

A worker restarted under a stable ``NODE_ID`` (a StatefulSet's pod name) finds leases
naming itself that it never took: its previous process's, which nobody else can take
(the name's presence is alive again). When that process's registered connection is gone
from Redis, checked before the new one is registered, it takes them back at once.

A worker fences itself as it does with its leases: it trusts them only while its
registration was confirmed within ``PRESENCE_TRUST`` (half of ``DEAD_AFTER``), so one
cut off from Redis stops writing before another can take it for dead. When its presence
comes back on a new connection, it trusts no lease until renewed after the new
registration; a take-over checks the registration it judged dead in the same script, so
a lease is taken or kept, never both. A partition it holds but cannot vouch for now is
*unsure*: a batch for it waits (:meth:`PartitionManager.settle`) rather than dropping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared.backoff import Backoff
from shared.keys import Keys
from shared.metrics import WorkerMetrics
from shared.resp import RespConnection, RespError

log = logging.getLogger(__name__)

# Seconds between looks for free partitions.
FREE_CHECK = 0.2
# A partition free this long is taken by any worker, even above its fair share: workers
# below their share have had two looks at it by then.
ORPHAN_GRACE = 2 * FREE_CHECK

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
# A dead owner's lease, taken only if it still names that owner and the owner's
# registration is still the one judged dead (a worker that registered a new presence
# meanwhile is alive, and renews its leases only after that registration).
_TAKE_OVER = """
if redis.call('get', KEYS[1]) == ARGV[1] and redis.call('hget', KEYS[2], ARGV[1]) == ARGV[4] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# A dead worker leaves the live set (so fair shares count the living) and, once it holds
# no lease, the registry; only while its registration is the one judged dead.
_FORGET_DEAD = """
if redis.call('hget', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('zrem', KEYS[2], ARGV[1])
if ARGV[3] == '1' then
  redis.call('hdel', KEYS[1], ARGV[1])
end
return 1
"""

# A worker whose registered presence connection Redis has not had for this long, in
# looks that saw the same registration, is dead.
DEAD_AFTER = 1.0
# A worker trusts its leases only this long after its registration was last confirmed:
# well before another can take it for dead (DEAD_AFTER), as 0.9 of a lease is before the
# lease expires. Unconfirmed, it writes nothing until its presence is confirmed again
# and its leases renewed, or lost.
PRESENCE_TRUST = 0.5
# A live worker whose presence connection broke (Redis restarted) registers a new one
# within this, well inside DEAD_AFTER.
PRESENCE_BACKOFF_CAP = 0.5
PRESENCE_TIMEOUT = 2.0


def _refused(exc: Exception) -> bool:
    """Redis refused the command itself (not the connection): an ACL, or a command
    renamed away."""
    text = str(exc)
    return isinstance(exc, RespError) and (
        text.startswith("NOPERM") or "unknown command" in text.lower()
    )


def judge_absent(
    absent: Mapping[str, str],
    before: Mapping[str, tuple[str, float]],
    now: float,
    after: float = DEAD_AFTER,
) -> tuple[set[str], dict[str, tuple[str, float]]]:
    """(dead workers, what to remember for the next look).

    ``absent``: workers whose registered client id Redis does not have now (node id ->
    that id). ``before``: the last look's memory (node id -> (id, absent since)). A
    worker is dead once its id has been missing for ``after`` seconds; a new id (it
    reconnected) starts the count again, and a worker seen present is forgotten.
    """
    seen: dict[str, tuple[str, float]] = {}
    for node, client_id in absent.items():
        first = before.get(node)
        since = first[1] if first is not None and first[0] == client_id else now
        seen[node] = (client_id, since)
    dead = {node for node, (_, since) in seen.items() if now - since >= after}
    return dead, seen


class PartitionManager:
    """Acquires, renews and releases this worker's partition leases."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        node_id: str,
        partitions: int,
        lease_seconds: float,
        metrics: WorkerMetrics,
        backoff_cap: float = 2.0,
        redis_url: str | None = None,
    ) -> None:
        self.redis = redis
        # Where the presence connection goes; None: no presence, no fast take-over.
        self.redis_url = redis_url
        self.keys = keys
        self.node_id = node_id
        self.partitions = partitions
        self.lease = lease_seconds
        self.metrics = metrics
        self.backoff_cap = backoff_cap
        self._valid_until: dict[int, float] = {}
        self._fresh: set[int] = set()  # acquired, pending entries not yet recovered
        self._surplus: set[int] = set()  # to hand back between batches
        self._free_since: dict[int, float] = {}  # partition -> first seen without an owner
        # Set when a lease is taken, renewed or given up, and when the presence is
        # confirmed: what the consumer (the only one to wait on it) may be waiting for.
        self._changed = asyncio.Event()
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._take_over = redis.register_script(_TAKE_OVER)
        self._forget_dead = redis.register_script(_FORGET_DEAD)
        self._absent: dict[str, tuple[str, float]] = {}  # see judge_absent
        # When (monotonic, taken before sending) the registration was last confirmed;
        # None until the first one, and while there is no presence.
        self._confirmed_at: float | None = None
        self._recheck = False  # renew the leases now: the presence was lost meanwhile
        # Free partition -> its dead owner and the registration judged dead.
        self._dead_owner: dict[int, tuple[str, str]] = {}
        self._client_list = redis_url is not None  # False once Redis refused CLIENT LIST
        # Set once the previous process under this node id is known to be gone (its
        # registered presence connection is not in Redis): its leases are this one's.
        self._predecessor_gone = False
        self._ever_held: set[int] = set()  # partitions this process has acquired
        self._leftover: set[int] = set()  # leases naming this node, left by its predecessor
        self.stopping = False
        self.healthy = False

    def holds(self, partition: int) -> bool:
        """True while this worker may write for ``partition``: its lease is valid, and
        its presence confirmed lately (no other worker can have taken it for dead)."""
        now = time.monotonic()
        return self._valid_until.get(partition, 0.0) > now and self._present(now)

    def _present(self, now: float) -> bool:
        return self._confirmed_at is None or now - self._confirmed_at < PRESENCE_TRUST

    def unsure(self, partition: int) -> bool:
        """True while ``partition`` is neither held nor given up: its lease or this
        worker's presence awaits confirmation. Its entries must wait, not be dropped."""
        return partition in self._valid_until and not self.holds(partition)

    def readable(self) -> list[int]:
        """Partitions to read from now (held, not being handed back)."""
        now = time.monotonic()
        if not self._present(now):
            return []
        return sorted(p for p, t in self._valid_until.items() if t > now and p not in self._surplus)

    def take_fresh(self) -> list[int]:
        """Partitions acquired since the last call (their pending entries need a claim);
        one not held for now stays to be taken later, unless it was given up."""
        fresh = sorted(p for p in self._fresh if self.holds(p))
        self._fresh = {p for p in self._fresh if self.unsure(p)}
        return fresh

    async def settle(self, partitions: set[int], timeout: float) -> None:
        """Return once none of ``partitions`` is :meth:`unsure` (held again, or given
        up), or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while any(self.unsure(p) for p in partitions):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                # Bounded by the trust too: a lease runs out unannounced.
                async with asyncio.timeout(min(left, PRESENCE_TRUST)):
                    await self._changed.wait()

    @property
    def owned(self) -> int:
        """How many partitions this worker holds."""
        return len(self._valid_until)

    async def wait_changed(self, timeout: float) -> None:
        """Sleep until ownership or presence changes, or ``timeout`` passes."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Heartbeat, renew, rebalance every third of the lease (sooner when a free
        partition is this worker's to take), until cancelled."""
        backoff = Backoff(cap=self.backoff_cap)
        while True:
            try:
                await self.tick()
                self.healthy = True
                backoff.reset()
                await self._until_next_round()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.healthy = False
                log.warning("lease upkeep failed", extra={"error": repr(exc)})
                await backoff.sleep()
            except Exception:
                self.healthy = False
                log.exception("lease upkeep failed")
                await backoff.sleep()

    async def _until_next_round(self) -> None:
        deadline = time.monotonic() + self.lease / 3
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, FREE_CHECK))
            if self._recheck:
                self._recheck = False
                return
            if not self.stopping and await self.free_for_me():
                return

    async def free_for_me(self) -> bool:
        """True when a free partition is this worker's to take now: it holds less than
        its fair share, or the partition has been free for ``ORPHAN_GRACE``."""
        live, free = await self._free_now()
        if not free:
            return False
        if self._leftover or len(self._valid_until) < math.ceil(self.partitions / live):
            return True
        now = time.monotonic()
        return any(now - self._free_since[p] >= ORPHAN_GRACE for p in free)

    async def _free_now(self) -> tuple[int, list[int]]:
        """(live workers, partitions nobody holds or whose owner is dead); remembers
        since when each partition has been free. One pipelined round trip, and one more
        (``CLIENT LIST``) while other workers are registered."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.workers)
            for partition in range(self.partitions):
                pipe.get(self.keys.lease(partition))
            pipe.hgetall(self.keys.worker_connections)
            live, *holders, registered = await pipe.execute()
        owners = [h.decode() if h else None for h in holders]
        for partition, owner in enumerate(owners):
            if partition in self._valid_until and owner != self.node_id:
                # Taken over (this worker was taken for dead) or expired: stop now
                # rather than at the next renewal.
                log.warning("lease lost", extra={"partition": partition, "owner": owner})
                self._drop(partition)
        dead = await self._dead_workers(
            {k.decode(): v.decode() for k, v in registered.items()}, set(owners)
        )
        self._dead_owner = {
            p: (owner, dead[owner])
            for p, owner in enumerate(owners)
            if owner is not None and owner in dead and p not in self._valid_until
        }
        self._leftover = (
            {
                p
                for p, owner in enumerate(owners)
                if owner == self.node_id and p not in self._ever_held
            }
            if self._predecessor_gone
            else set()
        )
        free = [
            p
            for p, owner in enumerate(owners)
            if (owner is None or owner in dead or p in self._leftover)
            and p not in self._valid_until
        ]
        now = time.monotonic()
        self._free_since = {p: self._free_since.get(p, now) for p in free}
        # A dead worker still counts until the next look: it has just left the live set.
        return max(1, int(live)), free

    async def _dead_workers(
        self, registered: dict[str, str], owners: set[str | None]
    ) -> dict[str, str]:
        """Registered workers (other than this one) judged dead by :func:`judge_absent`,
        with the registration judged; each leaves the live set, and the registry once no
        lease names it."""
        others = {node: cid for node, cid in registered.items() if node != self.node_id}
        if not others or not self._client_list:
            self._absent = {}
            return {}
        try:
            listed = await self.redis.client_list(client_id=list(others.values()))
        except ResponseError as exc:
            # A managed Redis may refuse it: crashed workers' leases then just expire.
            log.warning(
                "CLIENT LIST refused: a dead worker's partitions wait for its leases",
                extra={"error": repr(exc)},
            )
            self._client_list = False
            return {}
        present = {str(client["id"]) for client in listed}
        absent = {node: cid for node, cid in others.items() if cid not in present}
        judged, self._absent = judge_absent(absent, self._absent, time.monotonic())
        dead = {node: others[node] for node in judged}
        for node in dead:
            holds_none = node not in owners
            forgotten = await self._forget_dead(
                keys=[self.keys.worker_connections, self.keys.workers],
                args=[node, others[node], "1" if holds_none else "0"],
            )
            if forgotten and holds_none:
                log.info("dead worker forgotten", extra={"worker": node})
        return dead

    async def tick(self) -> None:
        """One round: register, renew held leases, take or hand back to reach a fair share."""
        now_wall = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers, {self.node_id: now_wall})
            # A worker silent for a lease and a half is dead: its leases have expired too.
            pipe.zremrangebyscore(self.keys.workers, "-inf", now_wall - 1.5 * self.lease)
            pipe.zcard(self.keys.workers)
            _, _, live = await pipe.execute()
        ms = int(self.lease * 1000)
        for partition in list(self._valid_until):
            started = time.monotonic()
            renewed = await self._renew(keys=[self.keys.lease(partition)], args=[self.node_id, ms])
            if renewed:
                self._valid_until[partition] = started + 0.9 * self.lease
                self._changed.set()
            else:
                log.warning("lease lost", extra={"partition": partition})
                self._drop(partition)
        if self.stopping:
            return
        share = math.ceil(self.partitions / max(1, int(live)))
        await self._acquire(share - len(self._valid_until), ms)
        if len(self._valid_until) > share:
            extra = len(self._valid_until) - share - len(self._surplus)
            for partition in sorted(self._valid_until, reverse=True)[: max(0, extra)]:
                self._surplus.add(partition)
        self.metrics.partitions_owned.set(len(self._valid_until))

    async def _acquire(self, wanted: int, ms: int) -> None:
        """Take free partitions: up to ``wanted`` at once, and any free for ``ORPHAN_GRACE``.

        The second rule means no partition stays unowned while a worker lives, even when
        every survivor already has its fair share; the grace lets a worker that is below
        its share (and looks as often) take it first.
        """
        _, free = await self._free_now()
        # Start at a per-worker offset so workers do not all race for the same partition.
        offset = hash(self.node_id) % self.partitions
        free.sort(key=lambda p: (p - offset) % self.partitions)
        for partition in free:
            leftover = partition in self._leftover
            if (
                wanted <= 0
                and not leftover
                and time.monotonic() - self._free_since[partition] < ORPHAN_GRACE
            ):
                continue
            started = time.monotonic()
            lease = self.keys.lease(partition)
            judged = self._dead_owner.get(partition)
            dead = judged[0] if judged is not None else None
            if leftover:
                # Still naming this node: the previous process's, renewed as this one's.
                dead = self.node_id
                taken = await self._renew(keys=[lease], args=[self.node_id, ms])
            elif judged is None:
                taken = await self.redis.set(lease, self.node_id, nx=True, px=ms)
            else:
                taken = await self._take_over(
                    keys=[lease, self.keys.worker_connections],
                    args=[judged[0], self.node_id, ms, judged[1]],
                )
            if taken:
                self._valid_until[partition] = started + 0.9 * self.lease
                self._ever_held.add(partition)
                self._leftover.discard(partition)
                self._fresh.add(partition)
                self._free_since.pop(partition, None)
                wanted -= 1
                extra: dict[str, object] = {"partition": partition}
                if dead is not None:
                    extra["dead_owner"] = dead
                log.info("partition acquired", extra=extra)
                self.metrics.partition_taken("none" if dead is None else "dead")
                self._changed.set()

    def _drop(self, partition: int) -> None:
        self._valid_until.pop(partition, None)
        self._fresh.discard(partition)
        self._surplus.discard(partition)
        self._changed.set()

    def _unconfirm_leases(self) -> None:
        now = time.monotonic()
        for partition, valid_until in self._valid_until.items():
            self._valid_until[partition] = min(valid_until, now)
        self._recheck = True

    async def hand_back_surplus(self) -> None:
        """Release partitions marked surplus; call only between batches."""
        for partition in list(self._surplus):
            await self.release(partition)

    async def release(self, partition: int) -> None:
        """Give a lease up now so another worker can take it at its next round."""
        self._drop(partition)
        try:
            await self._release(keys=[self.keys.lease(partition)], args=[self.node_id])
            log.info("partition released", extra={"partition": partition})
        except (RedisError, OSError) as exc:
            log.warning("release failed; the lease will expire", extra={"error": repr(exc)})
        self.metrics.partitions_owned.set(len(self._valid_until))

    async def release_all(self) -> None:
        """Stop taking partitions and release every lease (graceful shutdown)."""
        self.stopping = True
        for partition in list(self._valid_until):
            await self.release(partition)
        try:
            await self.redis.zrem(self.keys.workers, self.node_id)
            await self.redis.hdel(self.keys.worker_connections, self.node_id)
        except (RedisError, OSError):
            pass

    async def _check_predecessor(self, conn: RespConnection, client_id: int) -> None:
        """Before this process first registers: is the one registered under this node id
        before it (a restart under a stable ``NODE_ID``) gone from Redis? Then the leases
        naming this node are its leftovers, taken back at once (see the module's
        docstring). Alive, two processes share the name: its leases are left alone."""
        key = self.keys.worker_connections
        (previous,) = await conn.execute([("HGET", key, self.node_id)], PRESENCE_TIMEOUT)
        if previous is None:
            return  # never registered (first start, or a release before presence)
        # Equal: Redis restarted and gave this connection the old number, so the old
        # connection is gone (ids are unique among connected clients).
        if int(previous) != client_id:
            try:
                (listed,) = await conn.execute(
                    [("CLIENT", "LIST", "ID", previous)], PRESENCE_TIMEOUT
                )
            except RespError as exc:
                if not _refused(exc):
                    raise
                return  # cannot tell: its leases expire
            if listed:
                log.error(
                    "another process is connected under this NODE_ID (it must be "
                    "unique per process): the leases naming it are left to expire",
                    extra={"client_id": int(previous)},
                )
                return
        self._predecessor_gone = True

    async def run_presence(self) -> None:
        """Hold the presence connection and keep its client id registered, until
        cancelled (see the module's docstring). Re-registered every ``FREE_CHECK``, so a
        registration lost or overwritten is put back before anyone could judge it."""
        if self.redis_url is None:
            return
        backoff = Backoff(cap=PRESENCE_BACKOFF_CAP)
        conn: RespConnection | None = None
        client_id = 0
        try:
            while True:
                try:
                    rejoined = False
                    if conn is None or conn.closed:
                        conn = await RespConnection.open(
                            self.redis_url, name=f"worker-presence:{self.node_id}"
                        )
                        (client_id,) = await conn.execute([("CLIENT", "ID")], PRESENCE_TIMEOUT)
                        if self._confirmed_at is None:
                            await self._check_predecessor(conn, client_id)
                        # Without presence for a while this worker may have been taken
                        # for dead: nothing is trusted until it is registered again.
                        rejoined = self._confirmed_at is not None
                        if rejoined:
                            self._confirmed_at = -math.inf
                    # Also while draining: the batch in hand still needs its leases trusted.
                    sent = time.monotonic()
                    await conn.execute(
                        [("HSET", self.keys.worker_connections, self.node_id, client_id)],
                        PRESENCE_TIMEOUT,
                    )
                    if rejoined:
                        # A worker that judged it dead can take its leases only while the
                        # old registration stands: renewed after this one, a lease that
                        # is still this worker's stays so.
                        self._unconfirm_leases()
                    self._confirmed_at = sent
                    self._changed.set()
                    backoff.reset()
                    await asyncio.sleep(FREE_CHECK)
                except asyncio.CancelledError:
                    raise
                except (ConnectionError, OSError, RespError, TimeoutError) as exc:
                    if self._confirmed_at is None and _refused(exc):
                        # CLIENT or HSET not allowed (ACL, renamed commands) from the start:
                        # no presence, so nobody can take this worker for dead; its leases
                        # are trusted as leases alone, and expire when it dies.
                        log.warning(
                            "presence refused by Redis: a crash of this worker leaves its "
                            "partitions until their leases expire",
                            extra={"error": repr(exc)},
                        )
                        return
                    log.warning("presence connection lost", extra={"error": repr(exc)})
                    if conn is not None:
                        conn.close()
                    conn = None
                    await backoff.sleep()
        finally:
            if conn is not None:
                conn.close()
