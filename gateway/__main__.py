"""``python -m gateway``: serve WebSockets on GATEWAY_HOST:GATEWAY_PORT.

SIGTERM (or SIGINT) drains before stopping (see :mod:`gateway.drain`): the listener
stays open meanwhile so ``/readyz`` answers 503 and upgrades are refused with 503. A
second signal cuts the drain short and closes what is left at once.
"""

from __future__ import annotations

import asyncio

from shared.config import Settings
from shared.logs import setup_logging
from shared.runtime import install_event_loop_policy, serve

from .app import DRAIN, HUB, create_app


def main() -> None:
    """Read settings from the environment and serve until SIGINT/SIGTERM."""
    settings = Settings.from_env()
    setup_logging(settings.log_level, role="gateway", node=settings.node_id)
    install_event_loop_policy(settings.use_uvloop)
    app = create_app(settings)
    asyncio.run(
        serve(app, settings.gateway_host, settings.gateway_port, lambda: app[DRAIN].run(app[HUB]))
    )


if __name__ == "__main__":
    main()
