"""``python -m gateway``: serve WebSockets on GATEWAY_HOST:GATEWAY_PORT.

SIGTERM (or SIGINT) drains before stopping (see :mod:`gateway.drain`): the listener
stays open meanwhile so ``/readyz`` answers 503 and upgrades are refused with 503. A
second signal cuts the drain short and closes what is left at once.

``web.run_app`` is not used because on a signal it stops listening first and only then
runs the shutdown hooks: a load balancer would see refused connections, not a 503.
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

from .app import DRAIN, HUB, create_app

log = logging.getLogger(__name__)

# Handlers still running after the drain (none, normally) get this long before cancel.
SHUTDOWN_TIMEOUT = 5.0


async def serve(settings: Settings) -> None:
    """Serve until a signal, drain, then stop."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.gateway_host, settings.gateway_port)
        await site.start()
        log.info("listening", extra={"host": settings.gateway_host, "port": settings.gateway_port})
        signals = _signal_queue()
        received = await signals.get()
        log.info("stopping", extra={"signal": received})
        drain = asyncio.create_task(app[DRAIN].run(app[HUB]), name="drain")
        again = asyncio.create_task(signals.get(), name="second-signal")
        await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            log.warning("second signal: cutting the drain short")
            drain.cancel()
        again.cancel()
        for task in (drain, again):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    finally:
        # Stops listening, then the app's cleanup closes whatever sockets are left.
        await runner.cleanup()
    log.info("stopped")


def _signal_queue() -> asyncio.Queue[str]:
    """SIGTERM and SIGINT, as they arrive, by name."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, queue.put_nowait, sig.name)
    return queue


def main() -> None:
    """Read settings from the environment and serve until SIGINT/SIGTERM."""
    settings = Settings.from_env()
    setup_logging(settings.log_level, role="gateway", node=settings.node_id)
    install_event_loop_policy(settings.use_uvloop)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
