"""``python -m worker``: consume the partition streams; health and metrics on WORKER_HTTP_PORT.

SIGTERM (or SIGINT) drains before stopping (see :func:`worker.app.drain`) while the
HTTP server keeps answering, so ``/readyz`` reports 503 and ``/metrics`` stays
scrapeable until the leases are handed back. A second signal cuts the drain short;
the partitions not released then come back when their leases expire.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from shared.config import Settings
from shared.logs import setup_logging
from shared.runtime import install_event_loop_policy, serve

from .app import DRAIN, create_app, drain


def _cut(app: web.Application) -> None:
    inner = app[DRAIN].task
    if inner is not None:
        inner.cancel()


def main() -> None:
    """Read settings from the environment and run until SIGINT/SIGTERM."""
    settings = Settings.from_env()
    setup_logging(settings.log_level, role="worker", node=settings.node_id)
    install_event_loop_policy(settings.use_uvloop)
    app = create_app(settings)
    asyncio.run(
        serve(
            app,
            settings.worker_http_host,
            settings.worker_http_port,
            lambda: drain(app),
            lambda: _cut(app),
        )
    )


if __name__ == "__main__":
    main()
