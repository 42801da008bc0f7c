"""How long a worker that starts to a backlog takes to answer it.

After a worker crashes, or hands its partitions over, the sends of its chats wait in the
streams, and the worker that takes those partitions knows none of the chats yet: it
reads each one's last id (and its members) from MongoDB before it can store a send.
This measures that case alone, as processes are deployed:

    python -m tests.scale.backlog [--chats 5000] [--history 5] [--rounds 3]

Each round starts its own Redis and mongod on loopback (fresh data), seeds one user in
``--chats`` chats of ``--history`` messages each, starts a gateway process, queues one
``send_message`` to every chat through one socket while no worker runs, then starts a
worker process and times the replies: from the worker's start, and from when it answered
``/readyz``. Every reply must be a success with the id after the chat's history.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from deploy.local.servers import free_port, mongo_server, redis_server
from shared.config import Settings
from tests.support import ROOT, Seeder, Stack, message_docs, mongo_store


@dataclass(frozen=True)
class Round:
    """One worker start against a backlog."""

    chats: int
    ready_s: float  # worker start -> /readyz answered
    answered_s: float  # worker start -> the last reply
    right: int  # replies that were a success with the expected id

    def line(self) -> str:
        """The result as a line of text."""
        return (
            f"{self.chats} sends to {self.chats} chats queued: worker ready {self.ready_s:.2f} s "
            f"after its start, last reply {self.answered_s:.2f} s after its start "
            f"({self.answered_s - self.ready_s:.2f} s after ready); "
            f"{self.right} of {self.chats} right"
        )


async def one_round(settings: Settings, chats: int, history: int, logs: Path) -> Round:
    """Seed, queue the sends, start a worker, time its answers."""
    client, store = await mongo_store(settings)
    try:
        await store.ensure_indexes()
        user, token = await Seeder(store).user()
        ids = [f"b{n}" for n in range(chats)]
        await store.chats.insert_many([{"_id": chat, "member_ids": [user]} for chat in ids])
        if history:
            await store.messages.insert_many(
                [doc for chat in ids for doc in message_docs(chat, 1, history)]
            )
    finally:
        await client.close()
    async with aiohttp.ClientSession() as session:
        stack = Stack(settings, session)
        try:
            # One socket sends them all: no per-socket rate limit.
            _, gateway = stack.spawn("gateway", logs, rate_limit_per_second=0)
            await stack.wait_ready(gateway)
            socket = await stack.client(gateway, token)
            for n, chat in enumerate(ids):
                await socket.queue_text(chat, f"queued for {chat}", str(n))
            await asyncio.sleep(1.0)  # every send is in its stream
            started = time.perf_counter()
            _, worker = stack.spawn("worker", logs)
            await stack.wait_ready(worker, timeout=60)
            ready = time.perf_counter() - started
            right = 0
            expected = str(history + 1)
            for _ in ids:
                reply = await socket.reply(settings.request_timeout + 10)
                messages = reply.get("messages") or [{}]
                right += reply["type"] == "success" and messages[0].get("id") == expected
            return Round(chats, ready, time.perf_counter() - started, right)
        finally:
            await stack.close()


async def run(chats: int, history: int, rounds: int) -> list[Round]:
    """``rounds`` rounds, each on servers of its own."""
    results = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="chat-backlog-") as tmp:
            base = Path(tmp)
            redis = redis_server(free_port(), base / "redis").start()
            try:
                mongo = mongo_server(free_port(), base / "mongo").start(timeout=60)
                try:
                    tag = uuid.uuid4().hex[:8]
                    settings = Settings(
                        redis_url=redis.url,
                        mongo_url=mongo.url,
                        redis_prefix=f"backlog{tag}",
                        # The backlog waits for the worker: no send may time out meanwhile.
                        request_timeout=120.0,
                    )
                    results.append(await one_round(settings, chats, history, base))
                finally:
                    mongo.stop()
            finally:
                redis.stop()
    return results


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=5000)
    parser.add_argument("--history", type=int, default=5, help="messages per chat before")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(f"git {git}: python -m tests.scale.backlog --chats {args.chats} "
          f"--history {args.history} --rounds {args.rounds}")  # fmt: skip
    for result in asyncio.run(run(args.chats, args.history, args.rounds)):
        print(result.line(), flush=True)


if __name__ == "__main__":
    main()
