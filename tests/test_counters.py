"""The worker's per-chat counters: how a worker that meets many chats at once (after it
starts or takes partitions over) learns each chat's last id from MongoDB, on a real
mongod."""

from __future__ import annotations

from typing import Any

from tests.support import Seeder, Stack, message_docs
from worker.processor import Counters


async def _server_counts(seed: Seeder) -> tuple[int, int]:
    """(operations, index keys scanned) so far, by mongod's own count."""
    status = await seed.store.messages.database.client.admin.command("serverStatus")
    ops = status["opcounters"]
    return ops["query"] + ops["command"] + ops["getmore"], status["metrics"]["queryExecutor"][
        "scanned"
    ]


async def test_last_ids_of_many_chats_take_one_query_and_a_key_or_two_each(
    seed: Seeder,
) -> None:
    store = seed.store
    chats = [f"c{n}" for n in range(40)]
    docs = [doc for n, chat in enumerate(chats[:30]) for doc in message_docs(chat, 1, n + 1)]
    docs += message_docs("long", 1, 3000)  # a long chat must not be read message by message
    docs += [doc for doc in message_docs("gaps", 1, 9) if doc["seq"] in (1, 2, 9)]
    await store.messages.insert_many(docs)
    wanted = {*chats, "long", "gaps"}  # c30..c39 have no message yet
    before = await _server_counts(seed)
    last = await store.last_seqs(wanted)
    after = await _server_counts(seed)
    expected: dict[str, Any] = {chat: n + 1 if n < 30 else 0 for n, chat in enumerate(chats)}
    assert last == {**expected, "long": 3000, "gaps": 9}
    operations, scanned = after[0] - before[0], after[1] - before[1]
    # One aggregate (and the second serverStatus, and perhaps a driver heartbeat), not a
    # query per chat; about one index key per chat, not the long chat's 3,000.
    assert operations <= 4, operations
    assert scanned <= 3 * len(wanted), scanned
    assert await store.last_seqs(set()) == {}


async def test_at_their_bound_counters_keep_the_chats_about_to_be_used(seed: Seeder) -> None:
    await seed.store.messages.insert_many(message_docs("new", 1, 4))
    counters = Counters(seed.store, max_chats=20)
    first = {f"c{n}" for n in range(20)}
    await counters.load({"c0"})
    await counters.load(first)
    for n in range(20):
        counters.put(f"c{n}", 100 + n)
    # c0 was loaded first, so it is the oldest; a batch about to write to it must find it.
    await counters.load({"c0", "new"})
    assert counters.get("c0") == 100 and counters.get("new") == 4
    assert not counters.missing({"c0", "new"})
    assert len(counters.missing(first)) >= 2  # room was made among the others
    assert len(first - counters.missing(first)) + 1 <= 20


async def test_a_worker_starting_to_a_backlog_of_many_chats_continues_each_from_its_last_id(
    stack: Stack, seed: Seeder
) -> None:
    user, token = await seed.user()
    chats = [f"k{n}" for n in range(300)]
    await seed.store.chats.insert_many([{"_id": c, "member_ids": [user]} for c in chats])
    await seed.store.messages.insert_many(
        [doc for n, chat in enumerate(chats) for doc in message_docs(chat, 1, n % 7)]
    )
    gateway = await stack.gateway(rate_limit_per_second=0)  # one socket sends them all
    client = await stack.client(gateway, token)
    for n, chat in enumerate(chats):  # queued in the streams: no worker runs yet
        await client.queue_text(chat, f"to {chat}", str(n))
    await stack.worker()
    replies = [await client.reply() for _ in chats]
    ids = {int(r["request_id"]): r["messages"][0]["id"] for r in replies if r["type"] == "success"}
    assert ids == {n: str(n % 7 + 1) for n in range(len(chats))}
