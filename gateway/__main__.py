"""``python -m gateway``: serve WebSockets on GATEWAY_HOST:GATEWAY_PORT."""

from __future__ import annotations

import logging

from aiohttp import web

from shared.config import Settings
from shared.logs import setup_logging
from shared.runtime import install_event_loop_policy

from .app import create_app


def main() -> None:
    """Read settings from the environment and serve until SIGINT/SIGTERM."""
    settings = Settings.from_env()
    setup_logging(settings.log_level, role="gateway", node=settings.node_id)
    install_event_loop_policy(settings.use_uvloop)
    logging.getLogger(__name__).info(
        "listening", extra={"host": settings.gateway_host, "port": settings.gateway_port}
    )
    web.run_app(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        access_log=None,
        print=None,
        shutdown_timeout=5.0,
    )


if __name__ == "__main__":
    main()
