"""Bounded exponential backoff with jitter, for retry loops of background tasks."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from shared.logs import describe_error


class Backoff:
    """Delays of ``base * 2**n`` capped at ``cap`` seconds, with full jitter on the upper half."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; grows until :meth:`reset`."""
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        delay: float = ceiling / 2 + random.random() * ceiling / 2
        return delay

    async def sleep(self) -> None:
        """Sleep for :meth:`next_delay` seconds (cancellable)."""
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        """Start again from the base delay after a success."""
        self.attempt = 0


async def run_every(
    interval: float,
    job: Callable[[], Awaitable[object]],
    log: logging.Logger,
    failed: str,
    *,
    base: float = 0.5,
    from_start: bool = False,
) -> None:
    """Await ``job()`` every ``interval`` s until cancelled.

    The interval is counted from the end of each run, or with ``from_start`` from its
    start, so that runs keep to a schedule however long each one takes (one that takes
    longer than ``interval`` is followed at once by the next).

    A failure is logged as a warning (``failed``, with the error) and the job is tried
    again sooner: after a backoff from ``base`` up to ``interval``, reset by a success.
    """
    loop = asyncio.get_running_loop()
    backoff = Backoff(base=base, cap=interval)
    delay = interval
    while True:
        await asyncio.sleep(delay)
        started = loop.time()
        try:
            await job()
            backoff.reset()
            delay = max(0.0, interval - (loop.time() - started)) if from_start else interval
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(failed, extra={"error": describe_error(exc)})
            delay = backoff.next_delay()
