"""The retry delays of background tasks, and the periodic loop built on them (pure unit
tests: the job here is a plain coroutine, nothing talks to Redis or MongoDB)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from shared.backoff import Backoff, run_every


def test_backoff_grows_to_its_cap_and_starts_again_after_a_reset() -> None:
    backoff = Backoff(base=0.1, cap=1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    # Full jitter on the upper half: each delay lies between half its ceiling and it.
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    backoff.reset()
    assert 0.05 <= backoff.next_delay() <= 0.1


async def test_run_every_retries_a_failed_job_sooner_and_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    interval = 2.0
    calls: list[float] = []
    succeeded = asyncio.Event()

    async def job() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise ConnectionError("down for now")
        succeeded.set()

    log = logging.getLogger("tests.backoff")
    with caplog.at_level(logging.WARNING, logger="tests.backoff"):
        task = asyncio.create_task(run_every(interval, job, log, "job failed", base=0.001))
        await asyncio.wait_for(succeeded.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(calls) == 3
    # Each failure is retried after a backoff from ``base``, not after a whole interval.
    assert calls[2] - calls[0] < interval / 2
    failures = [r for r in caplog.records if r.getMessage() == "job failed"]
    assert len(failures) == 2
    assert all("down for now" in str(getattr(r, "error", "")) for r in failures)


@pytest.mark.parametrize("from_start", [False, True])
async def test_run_every_counts_the_interval_from_each_runs_end_or_its_start(
    from_start: bool,
) -> None:
    """A job that takes 0.8 of the interval runs every 1.8 intervals, or on a schedule
    of one interval with ``from_start``."""
    interval = 0.5
    starts: list[float] = []
    third = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def job() -> None:
        starts.append(loop.time())
        if len(starts) == 3:
            third.set()
        await asyncio.sleep(0.8 * interval)

    task = asyncio.create_task(
        run_every(
            interval, job, logging.getLogger("tests.backoff"), "failed", from_start=from_start
        )
    )
    try:
        await asyncio.wait_for(third.wait(), 10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # The loop's timers may fire a clock tick early; the upper margin is for one that
    # wakes late.
    if from_start:
        assert all(0.99 * interval <= gap < 1.5 * interval for gap in gaps), gaps
    else:
        assert all(gap >= 0.99 * 1.8 * interval for gap in gaps), gaps
