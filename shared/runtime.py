"""Process start-up helpers shared by the gateway and the worker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

# Handlers still running after the drain (none, normally) get this long before cancel.
SHUTDOWN_TIMEOUT = 5.0
# The whole stop after the drain (listener, handlers, the app's cleanup) gets this long;
# past it the process logs what is stuck and exits anyway rather than hang.
CLEANUP_TIMEOUT = SHUTDOWN_TIMEOUT + 10.0


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


async def serve(
    app: web.Application,
    host: str,
    port: int,
    drain: Callable[[], Coroutine[Any, Any, None]],
    on_cut: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, run ``drain`` while still listening, then stop.

    ``web.run_app`` is not used because on a signal it stops listening first and only
    then runs the shutdown hooks: a load balancer would see refused connections instead
    of ``/readyz`` answering 503 during the drain. A second signal cuts the drain short
    (``on_cut`` is called first).
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("listening", extra={"host": host, "port": port})
        settle_gc()
        signals = _signal_queue()
        received = await signals.get()
        log.info("stopping", extra={"signal": received})
        draining = asyncio.create_task(drain(), name="drain")
        again = asyncio.create_task(signals.get(), name="second-signal")
        await asyncio.wait({draining, again}, return_when=asyncio.FIRST_COMPLETED)
        if not draining.done():
            log.warning("second signal: cutting the drain short")
            if on_cut is not None:
                on_cut()
            draining.cancel()
        again.cancel()
        for task in (draining, again):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    finally:
        # Stops listening, then the app's cleanup closes whatever is left.
        await _bounded(runner.cleanup(), CLEANUP_TIMEOUT)
    log.info("stopped")


async def _bounded(cleanup: Coroutine[Any, Any, None], timeout: float) -> None:
    """Run ``cleanup``; if it has not finished in ``timeout`` s, log every task still
    running with where it waits, and end the process (exit status 1).

    The drain before it has already answered, closed and handed over what it could; a
    process that then hangs on its way out only keeps an orchestrator waiting for its
    kill timeout, and leaves no trace of why.
    """
    task = asyncio.ensure_future(cleanup)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done:
        task.result()
        return
    stuck = {
        t.get_name(): [
            f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in t.get_stack()
        ]
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task()
    }
    log.error("stop did not finish; exiting anyway", extra={"timeout": timeout, "tasks": stuck})
    logging.shutdown()
    os._exit(1)


def _signal_queue() -> asyncio.Queue[str]:
    """SIGTERM and SIGINT, as they arrive, by name."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, queue.put_nowait, sig.name)
    return queue
