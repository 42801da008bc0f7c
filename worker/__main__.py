"""``python -m worker``: consume the partition streams; health and metrics on WORKER_HTTP_PORT.

SIGTERM (or SIGINT) drains before stopping (see :func:`worker.app.drain`) while the
HTTP server keeps answering, so ``/readyz`` reports 503 and ``/metrics`` stays
scrapeable until the leases are handed back. A second signal cuts the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from shared.config import Settings
from shared.logs import setup_logging
from shared.runtime import install_event_loop_policy

from .app import DRAIN, create_app, drain

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 5.0


async def serve(settings: Settings) -> None:
    """Serve until a signal, drain, then stop."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.worker_http_host, settings.worker_http_port)
        await site.start()
        log.info(
            "listening",
            extra={"host": settings.worker_http_host, "port": settings.worker_http_port},
        )
        signals = _signal_queue()
        received = await signals.get()
        log.info("stopping", extra={"signal": received})
        draining = asyncio.create_task(drain(app), name="drain")
        again = asyncio.create_task(signals.get(), name="second-signal")
        await asyncio.wait({draining, again}, return_when=asyncio.FIRST_COMPLETED)
        if not draining.done():
            # The partitions not released now come back when their leases expire.
            log.warning("second signal: cutting the drain short")
            inner = app[DRAIN].task
            if inner is not None:
                inner.cancel()
            draining.cancel()
        again.cancel()
        for task in (draining, again):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    finally:
        await runner.cleanup()
    log.info("stopped")


def _signal_queue() -> asyncio.Queue[str]:
    """SIGTERM and SIGINT, as they arrive, by name."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, queue.put_nowait, sig.name)
    return queue


def quiet_payload_loggers() -> None:
    """Keep PyMongo's DEBUG logs out, whatever LOG_LEVEL says.

    At DEBUG, ``pymongo.command`` logs every command with its documents: message texts,
    token digests. Logs must never carry those, so PyMongo logs from INFO up only.
    """
    root = logging.getLogger().getEffectiveLevel()
    logging.getLogger("pymongo").setLevel(max(root, logging.INFO))


def main() -> None:
    """Read settings from the environment and run until SIGINT/SIGTERM."""
    settings = Settings.from_env()
    setup_logging(settings.log_level, role="worker", node=settings.node_id)
    quiet_payload_loggers()
    install_event_loop_policy(settings.use_uvloop)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
