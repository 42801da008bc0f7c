"""Client CPU of the worker's two per-batch MongoDB calls, through PyMongo and through the
lean connection (shared/wire.py), against a mongod of its own on loopback.

    python -m tests.scale.mongo_calls [--calls 2000] [--docs 1,6,30] [--page 50]

Each call is one ``Store.insert_messages`` (``j: true``, as the worker writes) or one
``Store.history`` page, awaited one at a time under uvloop; the figure is the process's
CPU time over the calls (client only: mongod runs in its own process), and the wall
time. The two paths alternate, twice each, so a change in the machine's speed shows as
a spread rather than as a difference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from deploy.local.servers import free_port, mongo_server
from shared.mongo import create_client
from shared.wire import Doc, WireClient
from tests.support import message_docs
from worker.store import Store


def _docs(chat: str, first: int, count: int) -> list[Doc]:
    return message_docs(
        chat, first, count, text="a message of a typical length, some forty to sixty characters"
    )


async def _measure(calls: int, call: Callable[[int], Awaitable[object]]) -> tuple[float, float]:
    """(client CPU µs, wall µs) per call."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(calls):
        await call(i)
    return (
        1e6 * (time.process_time() - cpu) / calls,
        1e6 * (time.perf_counter() - wall) / calls,
    )


async def run(url: str, database: str, calls: int, sizes: list[int], page: int) -> list[str]:
    """The result lines."""
    client = create_client(url)
    wire = WireClient(client, url, database)
    stores = {"pymongo": Store(client[database]), "lean": Store(client[database], wire)}
    lines = []
    try:
        await stores["pymongo"].ensure_indexes()
        for size in sizes:
            for round_ in range(2):
                for name, store in stores.items():
                    chat = f"{name}-{size}-{round_}"

                    async def insert(
                        i: int, store: Store = store, chat: str = chat, size: int = size
                    ) -> None:
                        await store.insert_messages(_docs(chat, 1 + i * size, size))

                    cpu, wall = await _measure(calls, insert)
                    lines.append(
                        f"insert of {size:>3} documents, {name:>7}: "
                        f"{cpu:6.0f} µs client CPU, {wall:6.0f} µs wall per call"
                    )
        for _ in range(2):
            for name, store in stores.items():
                chat = f"{name}-{sizes[-1]}-0"

                async def read(i: int, store: Store = store, chat: str = chat) -> None:
                    await store.history(chat, limit=page, before=1 + page + i % 50)

                cpu, wall = await _measure(calls, read)
                lines.append(
                    f"history page of {page}, {name:>7}: "
                    f"{cpu:6.0f} µs client CPU, {wall:6.0f} µs wall per call"
                )
    finally:
        wire.close()
        await client.close()
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--docs", default="1,6,30", help="documents per insert, comma-separated")
    parser.add_argument("--page", type=int, default=50, help="documents per history page")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.docs.split(",")]
    with tempfile.TemporaryDirectory(prefix="mongo-calls-") as base:
        server = mongo_server(free_port(), Path(base) / "mongo").start(timeout=60)
        try:
            lines = uvloop.run(run(server.url, "bench", args.calls, sizes, args.page))
        finally:
            server.stop()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
