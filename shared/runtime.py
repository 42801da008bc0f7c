"""Process start-up helpers shared by the gateway and the worker."""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def install_event_loop_policy(use_uvloop: bool) -> None:
    """Use uvloop when asked and installed (measured faster; see docs/benchmarks.md)."""
    if not use_uvloop:
        return
    try:
        import uvloop
    except ImportError:
        log.info("uvloop not installed; using asyncio's default loop")
        return
    uvloop.install()


def settle_gc() -> None:
    """Move start-up objects out of the collector's sight and raise its thresholds.

    Long-lived objects (sockets, caches) make CPython's full collections slow; these
    pauses are what gives Python gateways their latency tails (see PERFORMANCE.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
