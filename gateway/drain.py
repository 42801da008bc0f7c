"""Graceful drain of a gateway on SIGTERM.

Order, all while the HTTP listener stays open (so a load balancer polling ``/readyz``
sees 503 rather than a refused connection, and a refused upgrade is an answer it can
retry elsewhere at once):

1. unready at once: ``/readyz`` answers 503, ``chat_ready`` is 0, WebSocket upgrades
   get 503;
2. wait, bounded, for the requests in flight at that moment to be answered;
3. close the open sockets with 1001 "going away", ``DRAIN_BATCH_SIZE`` at a time every
   ``DRAIN_BATCH_INTERVAL_SECONDS``, so their clients reconnect to the other gateways
   spread out rather than all at once. A socket whose turn has come but which is still
   waiting for a reply (a forwarded request, or a history page this gateway is reading)
   is closed as soon as that reply is sent. Batches grow when that
   is needed to finish within ``DRAIN_TIMEOUT_SECONDS``.

Then the caller stops the server (listener closed, cleanup as usual).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque

from shared.config import Settings
from shared.metrics import GatewayMetrics

from .connection import Connection
from .hub import Hub

log = logging.getLogger(__name__)

GOING_AWAY = 1001
GOING_AWAY_REASON = "going away"
# How often the drain looks at requests in flight (a reply is noticed this late at most).
POLL_SECONDS = 0.02
# Closing handshakes still running after the last batch get this long to finish
# (Connection.close bounds each one by 5 s itself).
CLOSE_GRACE_SECONDS = 5.0


class Drain:
    """Drain state of one gateway: the flag the handlers read, and :meth:`run`."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.draining = False
        self.batches = 0
        self.closed = 0

    def begin(self) -> None:
        """Turn unready and refuse new sockets (idempotent, synchronous)."""
        if not self.draining:
            self.draining = True
            self.metrics.ready.set(0)

    async def run(self, hub: Hub) -> None:
        """Drain ``hub``: unready now, replies for requests in flight, then batched 1001s."""
        self.begin()
        settings = self.settings
        started = time.monotonic()
        deadline = started + settings.drain_timeout
        sockets = len(hub.connections)
        in_flight = set(hub.pending)
        log.info(
            "draining",
            extra={
                "sockets": sockets,
                "in_flight": len(in_flight),
                "timeout": settings.drain_timeout,
            },
        )
        # Requests forwarded before the drain began: wait for their replies (each one is
        # answered within REQUEST_TIMEOUT_SECONDS anyway, by its own timer), but leave at
        # least half of the drain time for closing sockets.
        wait_until = started + settings.drain_timeout / 2
        while in_flight and time.monotonic() < wait_until:
            await asyncio.sleep(POLL_SECONDS)
            in_flight.intersection_update(hub.pending)
        closing = await self._close_in_batches(hub, deadline)
        if closing:
            # Wait for the close handshakes, but never past their own 5 s bound.
            await asyncio.wait(closing, timeout=CLOSE_GRACE_SECONDS)
        log.info(
            "drained",
            extra={
                "sockets": sockets,
                "closed": self.closed,
                "batches": self.batches,
                "unanswered": len(in_flight),
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def _close_in_batches(self, hub: Hub, deadline: float) -> set[asyncio.Task[None]]:
        settings = self.settings
        interval = settings.drain_batch_interval
        queue = deque(sorted(hub.connections.values(), key=lambda c: c.conn_id))
        due: list[Connection] = []  # their turn came; closed once no reply is owed to them
        tasks: set[asyncio.Task[None]] = set()
        next_batch = time.monotonic()
        while queue or due:
            now = time.monotonic()
            overdue = now >= deadline
            if queue and (overdue or now >= next_batch):
                if overdue:
                    size = len(queue)
                else:
                    # DRAIN_BATCH_SIZE, larger when the rest would not fit in the time left.
                    ticks_left = max(1.0, (deadline - now) / interval) if interval > 0 else 1.0
                    size = max(settings.drain_batch_size, math.ceil(len(queue) / ticks_left))
                batch = [queue.popleft() for _ in range(min(size, len(queue)))]
                due.extend(batch)
                self.batches += 1
                log.info(
                    "drain batch",
                    extra={"batch": self.batches, "sockets": len(batch), "left": len(queue)},
                )
                next_batch = now + interval
            # Owed a reply: a request forwarded, or a history page being read here.
            owed = {p.conn.conn_id for p in hub.pending.values()} | hub.reading if due else set()
            still_due: list[Connection] = []
            for conn in due:
                if conn.closed:
                    continue  # closed meanwhile (by its client, or as a slow consumer)
                if conn.conn_id in owed and not overdue:
                    still_due.append(conn)
                    continue
                tasks.add(asyncio.create_task(self._close(conn), name=f"drain-{conn.conn_id}"))
            due = still_due
            if not queue and not due:
                break
            pause = max(0.0, next_batch - time.monotonic()) if queue else POLL_SECONDS
            if due:
                pause = min(pause, POLL_SECONDS)
            await asyncio.sleep(pause)
        return tasks

    async def _close(self, conn: Connection) -> None:
        self.closed += 1
        with contextlib.suppress(Exception):
            await conn.close(GOING_AWAY, GOING_AWAY_REASON)
