"""``python -m worker``: consume the partition streams; health and metrics on WORKER_HTTP_PORT."""

from __future__ import annotations

from aiohttp import web

from shared.config import Settings
from shared.logs import setup_logging
from shared.runtime import install_event_loop_policy

from .app import create_app


def main() -> None:
    """Read settings from the environment and run until SIGINT/SIGTERM."""
    settings = Settings.from_env()
    setup_logging(settings.log_level, role="worker", node=settings.node_id)
    install_event_loop_policy(settings.use_uvloop)
    web.run_app(
        create_app(settings),
        host=settings.worker_http_host,
        port=settings.worker_http_port,
        access_log=None,
        print=None,
        shutdown_timeout=15.0,
    )


if __name__ == "__main__":
    main()
