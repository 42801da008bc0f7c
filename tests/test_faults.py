"""Fault injection: nothing acknowledged is lost, duplicated or reordered.

Several clients on 2 gateway processes send steadily into overlapping chats served by
2 worker processes, while one fault is injected mid-stream. Afterwards the ledger is
checked against MongoDB and every client's log: every acknowledged message stored
once with the id it was acknowledged with, ids 1..n per chat, no push out of order
or twice, and every member got every message of its chats. The counts are printed
(run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest

from shared.config import Settings
from tests.conftest import Servers, local_servers
from tests.support import Seeder, Stack, mongo_store
from tests.traffic import TrafficClient, verify, wait_delivered

pytestmark = pytest.mark.timeout(180)

USERS = 10
CHATS = 5
MEMBERS = 4
INTERVAL = 0.1  # each client sends 10 messages a second
BEFORE_FAULT = 2.0
AFTER_FAULT = 5.0


@pytest.fixture(scope="module")
def fault_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Redis and MongoDB of this module only: the scenarios stop and restart them."""
    with local_servers(tmp_path_factory.mktemp("fault-servers")) as started:
        yield started


@pytest.fixture
async def cluster(
    fault_servers: Servers, settings: Settings, log_dir: Path
) -> AsyncIterator[Cluster]:
    tag = uuid.uuid4().hex[:8]
    fault_settings = replace(
        settings,
        redis_url=fault_servers.redis.url,
        mongo_url=fault_servers.mongo.url.rsplit("/", 1)[0] + f"/f_{tag}",
        redis_prefix=f"f{tag}",
        partitions=8,
        request_timeout=3.0,
        lease_seconds=2.0,
        auth_cache_ttl=5.0,
    )
    async with aiohttp.ClientSession() as session:
        stack = Stack(fault_settings, session)
        client, store = await mongo_store(fault_settings)
        await store.ensure_indexes()
        built = Cluster(stack, Seeder(store), fault_servers, log_dir)
        try:
            yield built
        finally:
            await built.close()
            await stack.close()
            await client.drop_database(fault_settings.mongo_database)
            await client.close()


@dataclass
class Cluster:
    stack: Stack
    seed: Seeder
    servers: Servers
    log_dir: Path

    def __post_init__(self) -> None:
        self.gateways: list[tuple[object, str]] = []
        self.workers: list[tuple[object, str]] = []
        self.clients: list[TrafficClient] = []

    async def start(self, gateways: int = 2, workers: int = 2) -> None:
        for _ in range(gateways):
            self.gateways.append(self.stack.spawn("gateway", self.log_dir))
        for _ in range(workers):
            self.workers.append(self.stack.spawn("worker", self.log_dir))
        for _, url in self.gateways + self.workers:
            await self.stack.wait_ready(url, timeout=30)

    async def connect_clients(self) -> None:
        users = [await self.seed.user(f"user{i}") for i in range(USERS)]
        chats: dict[int, list[str]] = {i: [] for i in range(USERS)}
        for c in range(CHATS):
            members = [(c * 2 + k) % USERS for k in range(MEMBERS)]
            chat = await self.seed.chat(*(users[m][0] for m in members))
            for m in members:
                chats[m].append(chat)
        urls = [url for _, url in self.gateways]
        deadline = time.monotonic() + 30
        for i, (user_id, token) in enumerate(users):
            client = TrafficClient(
                name=f"u{i}", user_id=user_id, token=token, chats=chats[i],
                urls=urls, session=self.stack.session, interval=INTERVAL, url_index=i,
            )  # fmt: skip
            await client.connect(deadline)
            self.clients.append(client)

    async def run(self, fault: object, label: str) -> None:
        """Traffic for BEFORE_FAULT s, the fault, traffic for AFTER_FAULT s, then verify."""
        stop = asyncio.Event()
        deadline = time.monotonic() + 120
        tasks = [asyncio.create_task(c.run(stop, deadline)) for c in self.clients]
        await asyncio.sleep(BEFORE_FAULT)
        fault_at = time.monotonic()
        await fault()  # type: ignore[operator]
        await asyncio.sleep(AFTER_FAULT)
        stop.set()
        await asyncio.gather(*tasks)
        settle_deadline = time.monotonic() + 60
        await asyncio.gather(*(c.settle(settle_deadline) for c in self.clients))
        await wait_delivered(self.clients, self.seed.store, time.monotonic() + 20)
        try:
            ledger = await verify(self.clients, self.seed.store)
        except AssertionError as exc:
            counters = []
            for _, url in self.gateways:
                try:
                    async with self.stack.session.get(url + "metrics") as resp:
                        text = await resp.text()
                    counters += [
                        f"{url} {line}"
                        for line in text.splitlines()
                        if line.startswith("chat_gateway_gap")
                    ]
                except aiohttp.ClientError:
                    counters.append(f"{url} unreachable")
            raise AssertionError(
                f"{exc}\n" + "\n".join(counters) + f"\n{self.stack.logs()[-3000:]}"
            ) from None
        # Time to recover: the slowest acknowledgement of a message sent after the fault
        # (those sent while the system was down wait for it to come back).
        recovery = max(
            (
                s.acked_at - s.first_sent
                for c in self.clients
                for s in c.sent
                if s.acked_at is not None and s.first_sent >= fault_at
            ),
            default=0.0,
        )
        print(
            f"\n[{label}] sent={ledger.sent} acknowledged={ledger.acknowledged} "
            f"stored={ledger.stored} delivered={ledger.delivered}/{ledger.expected_deliveries} "
            f"reconnects={ledger.reconnects} slowest_ack={ledger.max_ack_seconds}s "
            f"recovery={recovery:.2f}s"
        )
        assert ledger.acknowledged == ledger.sent
        assert ledger.delivered == ledger.expected_deliveries > 0

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


async def test_worker_killed_mid_stream(cluster: Cluster) -> None:
    await cluster.start()
    await cluster.connect_clients()
    victim, _ = cluster.workers[0]

    async def kill_worker() -> None:
        victim.kill()  # type: ignore[attr-defined]

    await cluster.run(kill_worker, "SIGKILL worker")


async def test_gateway_killed_mid_stream(cluster: Cluster) -> None:
    await cluster.start()
    await cluster.connect_clients()
    victim, _ = cluster.gateways[0]

    async def kill_gateway() -> None:
        victim.kill()  # type: ignore[attr-defined]

    await cluster.run(kill_gateway, "SIGKILL gateway")
    assert sum(c.reconnects for c in cluster.clients) >= USERS // 2


async def test_redis_restarted_mid_stream(cluster: Cluster) -> None:
    await cluster.start()
    await cluster.connect_clients()
    redis = cluster.servers.redis

    async def restart_redis() -> None:
        # A crash, not a clean shutdown: AOF (fsync every second) is all that survives.
        redis.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis.start)

    await cluster.run(restart_redis, "Redis restart")


async def test_mongo_stopped_for_seconds(cluster: Cluster) -> None:
    await cluster.start()
    await cluster.connect_clients()
    mongo = cluster.servers.mongo

    async def stop_mongo() -> None:
        await asyncio.to_thread(mongo.stop)
        await asyncio.sleep(3.0)
        await asyncio.to_thread(mongo.start, 60)

    await cluster.run(stop_mongo, "MongoDB down 3 s")
    # The gateways read pages from the restarted mongod again, each over new connections.
    for _, url in cluster.gateways:
        client = await cluster.stack.client(url, cluster.clients[0].token)
        chat = cluster.clients[0].chats[0]
        deadline = time.monotonic() + 30
        while True:
            page = await client.request("get_history", chat, {"limit": 5})
            assert page["type"] == "success" and len(page["messages"]) == 5
            if await _pages_read_by(cluster.stack, url) > 0:
                break
            assert time.monotonic() < deadline, "the gateway did not read a page again"
            await asyncio.sleep(0.5)


async def _pages_read_by(stack: Stack, url: str) -> float:
    """Pages this gateway has read from MongoDB itself."""
    async with stack.session.get(url + "metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('chat_gateway_history_reads_total{by="gateway"}')
    )


async def test_same_client_msg_id_on_two_gateways(cluster: Cluster) -> None:
    await cluster.start()
    author, token = await cluster.seed.user("Author")
    reader, reader_token = await cluster.seed.user("Reader")
    chat = await cluster.seed.chat(author, reader)
    (_, url_a), (_, url_b) = cluster.gateways
    on_a = await cluster.stack.client(url_a, token)
    on_b = await cluster.stack.client(url_b, token)
    watcher = await cluster.stack.client(url_b, reader_token)
    for client in (on_a, on_b, watcher):
        await client.join(chat)
    rounds = 20
    for n in range(rounds):
        message = {"type": "text", "text": f"once {n}", "client_msg_id": f"same-{n}"}
        first, second = await asyncio.gather(
            on_a.request("send_message", chat, message), on_b.request("send_message", chat, message)
        )
        assert first["type"] == second["type"] == "success"
        assert first["messages"][0]["id"] == second["messages"][0]["id"]
    pushes = [await watcher.push() for _ in range(rounds)]
    await watcher.no_push(0.5)
    assert [p["messages"][0]["text"] for p in pushes] == [f"once {n}" for n in range(rounds)]
    stored = await cluster.seed.store.messages.count_documents({"chat_id": chat})
    print(f"\n[same client_msg_id x2] sent={2 * rounds} stored={stored} pushed={len(pushes)}")
    assert stored == rounds
