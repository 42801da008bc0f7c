"""How the aiohttp-based peers run: the same loop, limits and server options for each."""

from __future__ import annotations

import asyncio
import contextlib
import os

from aiohttp import web

from tests.scale.common import raise_nofile


def run(app: web.Application) -> None:
    """Serve ``app`` on ``HOST`` (loopback by default) and ``PORT`` until stopped."""
    raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ["PORT"]),
        print=None,
        access_log=None,
        backlog=4096,
        shutdown_timeout=2.0,
    )
