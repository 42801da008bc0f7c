"""The worker's token and membership cache: expiry, and reading entries in use again
before they expire (against a real MongoDB; the clock is a plain variable)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pymongo.errors import AutoReconnect

from shared.codec import token_digest
from shared.config import Settings
from shared.metrics import WorkerMetrics
from shared.wire import WireClient
from tests.support import Seeder, mongo_store
from worker import auth as auth_module
from worker.auth import Authenticator, TTLCache
from worker.store import Store

TTL = 10.0


class Clock:
    """Monotonic seconds that only move when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_due_lists_keys_in_use_that_expire_soon() -> None:
    cache: TTLCache[str] = TTLCache(ttl=TTL, max_entries=100)
    for key in ("hot", "cold", "late"):
        cache.put(key, key.upper(), now=0.0)
    cache.put("late", "LATE", now=4.0)  # expires at 14
    assert cache.get("hot", 1.0) == (True, "HOT")
    assert cache.get("late", 1.0) == (True, "LATE")
    # Expiring within 5 s of t=6: "hot" (10) only; "late" (14) not yet, "cold" unused.
    assert cache.due(6.0, 5.0) == ["hot"]
    # Which keys were used is forgotten: nothing is due until they are used again.
    assert cache.due(6.0, 5.0) == []
    assert cache.get("late", 7.0) == (True, "LATE")
    assert cache.due(9.5, 5.0) == ["late"]
    # An expired entry is neither found nor due.
    assert cache.get("hot", 10.5) == (False, None)
    cache.get("late", 13.0)
    assert cache.due(14.5, 5.0) == []


def test_eviction_forgets_use() -> None:
    cache: TTLCache[int] = TTLCache(ttl=TTL, max_entries=10)
    for n in range(10):
        cache.put(str(n), n, now=0.0)
        cache.get(str(n), 0.0)
    cache.put("new", 10, now=0.0)  # drops the oldest tenth: "0"
    assert cache.get("0", 0.0) == (False, None)
    assert sorted(cache.due(0.0, TTL)) == [str(n) for n in range(1, 10)]


def test_due_keeps_values_found_within_keep_and_drops_what_expired() -> None:
    cache: TTLCache[str] = TTLCache(ttl=TTL, max_entries=100)
    for key in ("value", "idle", "absent"):
        cache.put(key, None if key == "absent" else key, now=0.0)
    assert cache.get("value", 1.0) == (True, "value")
    assert cache.get("absent", 1.0) == (True, None)
    assert sorted(cache.due(6.0, 5.0, keep=60.0)) == ["absent", "value"]
    cache.put("value", "value", now=6.0)
    cache.put("absent", None, now=6.0)
    # Not found since the last call, yet due: a value found within ``keep`` stays warm;
    # an absence does not (a flood of wrong tokens is not read again and again).
    assert cache.due(12.0, 5.0, keep=60.0) == ["value"]
    # "idle" (never found) expired at 10 and was dropped on the way: not found at 9
    # either, so its memory went with it.
    assert cache.get("idle", 9.0) == (False, None)
    cache.put("value", "value", now=66.0)
    # Last found at 1: more than ``keep`` ago, so it is left to expire.
    assert cache.due(72.0, 5.0, keep=60.0) == []
    assert cache.due(77.0, 5.0, keep=60.0) == []
    assert cache.get("value", 75.0) == (False, None)


@pytest.fixture(params=["pymongo", "wire"])
async def auth(
    request: pytest.FixtureRequest, settings: Settings, seed: Seeder
) -> AsyncIterator[tuple[Authenticator, Clock]]:
    """An authenticator whose look-ups go through PyMongo, or over the lean connection
    (MONGO_WIRE, the default)."""
    client, store = await mongo_store(settings)
    wire = None
    if request.param == "wire":
        wire = WireClient(client, settings.mongo_url, settings.mongo_database)
        store = Store(store.db, wire)
    clock = Clock()
    metrics = WorkerMetrics(CollectorRegistry())
    try:
        yield Authenticator(store, TTL, metrics, clock=clock), clock
    finally:
        if wire is not None:
            wire.close()
        await client.close()


def _count(authenticator: Authenticator, result: str) -> float:
    value = authenticator.metrics.registry.get_sample_value(
        "chat_worker_auth_cache_total", {"result": result}
    )
    return value or 0.0


def _timed(authenticator: Authenticator) -> float:
    """MongoDB look-ups timed as ``chat_worker_mongo_seconds{op="auth"}``."""
    value = authenticator.metrics.registry.get_sample_value(
        "chat_worker_mongo_seconds_count", {"op": "auth"}
    )
    return value or 0.0


async def test_refresh_keeps_entries_in_use_from_expiring(
    auth: tuple[Authenticator, Clock], seed: Seeder
) -> None:
    authenticator, clock = auth
    user, token = await seed.user()
    _, idle_token = await seed.user()
    chat = await seed.chat(user)
    digest, idle = token_digest(token), token_digest(idle_token)

    identity = (await authenticator.identities_for([digest, idle]))[digest]
    assert identity is not None and identity.user_id == user
    assert (await authenticator.members_of([chat]))[chat] == frozenset({user})
    assert _count(authenticator, "miss") == 3
    assert _timed(authenticator) == 2  # one look-up of the two tokens, one of the chat
    clock.now += 0.25 * TTL
    assert await authenticator.refresh(within=TTL / 2) == 0  # a round: none expires soon

    clock.now += 0.35 * TTL  # in the refresh window; only the token and chat are used
    await authenticator.identities_for([digest])
    await authenticator.members_of([chat])
    assert _timed(authenticator) == 2  # cache hits read nothing, so time nothing
    # The store changes: the token is revoked, the user leaves the chat.
    await seed.store.tokens.delete_one({"_id": digest})
    await seed.store.chats.update_one({"_id": chat}, {"$pull": {"member_ids": user}})
    assert await authenticator.refresh(within=TTL / 2) == 2
    assert _count(authenticator, "refreshed") == 2
    assert _timed(authenticator) == 4  # the refresher's two look-ups

    # Past the first load's expiry: the entries in use are found without a MongoDB
    # read, and they say what the store says now; the one unused since a round expired
    # (``keep`` is 0 here).
    clock.now += 0.5 * TTL
    assert (await authenticator.identities_for([digest]))[digest] is None
    assert (await authenticator.members_of([chat]))[chat] == frozenset()
    assert _count(authenticator, "miss") == 3
    assert (await authenticator.identities_for([idle]))[idle] is not None
    assert _count(authenticator, "miss") == 4


async def test_refresh_never_extends_an_entry_past_its_ttl(
    auth: tuple[Authenticator, Clock], seed: Seeder
) -> None:
    authenticator, clock = auth
    _, token = await seed.user()
    digest = token_digest(token)
    await authenticator.identities_for([digest])
    clock.now += 0.2 * TTL
    await authenticator.identities_for([digest])
    # Not within half a TTL of expiring: nothing is read, the entry keeps its expiry.
    assert await authenticator.refresh(within=TTL / 2) == 0
    await seed.store.tokens.delete_one({"_id": digest})
    clock.now += 0.85 * TTL  # past the first load's expiry
    assert (await authenticator.identities_for([digest]))[digest] is None
    assert _count(authenticator, "miss") == 2


async def test_refresh_reads_many_keys_in_slices(
    auth: tuple[Authenticator, Clock], seed: Seeder, monkeypatch: pytest.MonkeyPatch
) -> None:
    authenticator, clock = auth
    monkeypatch.setattr(auth_module, "REFRESH_SLICE", 2)
    digests = [token_digest((await seed.user())[1]) for _ in range(5)]
    await authenticator.identities_for(digests)
    clock.now += 0.6 * TTL
    await authenticator.identities_for(digests)
    assert await authenticator.refresh(within=TTL / 2) == 5
    clock.now += 0.5 * TTL
    found = await authenticator.identities_for(digests)
    assert all(found[d] is not None for d in digests)
    assert _count(authenticator, "miss") == 5


async def test_look_ups_say_when_what_they_found_was_read_from_mongodb(
    auth: tuple[Authenticator, Clock], seed: Seeder
) -> None:
    """How old a decision may be (a grant's age): a cached entry was read when it was
    loaded or refreshed, not when it is found; a miss is read now."""
    authenticator, clock = auth
    user, token = await seed.user()
    _, other = await seed.user()
    chat = await seed.chat(user)
    digest, late = token_digest(token), token_digest(other)
    loaded = clock.now
    await authenticator.identities_for([digest])
    await authenticator.members_of([chat])
    clock.now += 0.6 * TTL
    tokens: dict[str, float] = {}
    chats: dict[str, float] = {}
    await authenticator.identities_for([digest, late], tokens)
    await authenticator.members_of([chat], chats)
    assert tokens == {digest: loaded, late: clock.now} and chats == {chat: loaded}
    refreshed = clock.now
    assert await authenticator.refresh(within=TTL / 2) == 2
    clock.now += 0.1 * TTL
    await authenticator.identities_for([digest], tokens)
    await authenticator.members_of([chat], chats)
    assert tokens[digest] == chats[chat] == refreshed


async def test_a_token_is_read_with_its_user_and_without_one_is_no_identity(
    auth: tuple[Authenticator, Clock], seed: Seeder
) -> None:
    authenticator, _ = auth
    user, token = await seed.user("Ann", avatar="https://example.com/a.png")
    gone, orphan = await seed.user()
    await seed.store.users.delete_one({"_id": gone})
    digests = [token_digest(token), token_digest(orphan), token_digest("never issued")]
    found = await authenticator.identities_for(digests)
    identity = found[digests[0]]
    assert identity is not None
    assert (identity.user_id, identity.username, identity.avatar) == (
        user,
        "Ann",
        "https://example.com/a.png",
    )
    assert found[digests[1]] is None and found[digests[2]] is None


async def test_a_batch_missing_both_a_token_and_a_chat_looks_them_up_at_once(
    auth: tuple[Authenticator, Clock], seed: Seeder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold batch waits for one look-up, not the token's and then the chat's: each
    look-up here goes on only once the other has started, which never happens when
    they run one after the other (in either order)."""
    authenticator, _ = auth
    store = authenticator.store
    user, token = await seed.user()
    chat = await seed.chat(user)
    tokens_started, chats_started = asyncio.Event(), asyncio.Event()
    read_tokens, read_chats = store.tokens_by_digest, store.chats_by_id

    async def tokens_by_digest(digests: Iterable[str]) -> dict[str, Any]:
        tokens_started.set()
        await asyncio.wait_for(chats_started.wait(), 5)
        return await read_tokens(digests)

    async def chats_by_id(chat_ids: Iterable[str]) -> dict[str, Any]:
        chats_started.set()
        await asyncio.wait_for(tokens_started.wait(), 5)
        return await read_chats(chat_ids)

    monkeypatch.setattr(store, "tokens_by_digest", tokens_by_digest)
    monkeypatch.setattr(store, "chats_by_id", chats_by_id)
    digest = token_digest(token)
    tokens: dict[str, float] = {}
    chats: dict[str, float] = {}
    identities, members = await authenticator.resolve([digest], [chat], tokens, chats)
    identity = identities[digest]
    assert identity is not None and identity.user_id == user
    assert members == {chat: frozenset({user})}
    assert tokens == {digest: 1000.0} and chats == {chat: 1000.0}
    assert _count(authenticator, "miss") == 2 and _timed(authenticator) == 2


async def test_a_failed_look_up_fails_the_batch_after_both_have_ended(
    auth: tuple[Authenticator, Clock], seed: Seeder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the chat's look-up fails beside the token's, resolve raises that failure (the
    worker retries the batch) only once the token's look-up has ended too: nothing is
    left running behind the batch. What was read is kept."""
    authenticator, _ = auth
    store = authenticator.store
    user, token = await seed.user()
    chat = await seed.chat(user)
    read_tokens = store.tokens_by_digest
    ended: list[str] = []

    async def tokens_by_digest(digests: Iterable[str]) -> dict[str, Any]:
        await asyncio.sleep(0.05)  # still running when the chats' look-up fails
        found = await read_tokens(digests)
        ended.append("tokens")
        return found

    async def chats_by_id(chat_ids: Iterable[str]) -> dict[str, Any]:
        raise AutoReconnect("MongoDB went away")

    monkeypatch.setattr(store, "tokens_by_digest", tokens_by_digest)
    monkeypatch.setattr(store, "chats_by_id", chats_by_id)
    digest = token_digest(token)
    with pytest.raises(AutoReconnect):
        await authenticator.resolve([digest], [chat])
    assert ended == ["tokens"]
    monkeypatch.undo()
    identities, members = await authenticator.resolve([digest], [chat])
    assert _count(authenticator, "hit") == 1  # the token, read by the failed batch
    assert members == {chat: frozenset({user})} and identities[digest] is not None


async def test_a_token_used_now_and_then_stays_cached_and_current(
    auth: tuple[Authenticator, Clock], seed: Seeder
) -> None:
    """A user who sends less often than the TTL (most users) finds their token and chat
    cached, read again by the refresher within every TTL, until ``keep`` has passed
    since they were last used."""
    warm, clock = auth
    authenticator = Authenticator(warm.store, TTL, warm.metrics, clock=clock, keep=6 * TTL)
    user, token = await seed.user()
    chat = await seed.chat(user)
    digest = token_digest(token)
    used = clock.now
    await authenticator.resolve([digest], [chat])
    assert _count(authenticator, "miss") == 2
    within = auth_module.REFRESH_WITHIN * TTL
    refreshed = 0
    while clock.now < used + 2 * TTL:  # rounds every quarter TTL, as run_refresh makes them
        clock.now += TTL / 4
        refreshed += await authenticator.refresh(within)
    assert refreshed == 4  # each entry every three quarters of a TTL
    # The store changes: the refresher has read the change, the cache is current.
    await seed.store.chats.update_one({"_id": chat}, {"$pull": {"member_ids": user}})
    clock.now += TTL / 4
    await authenticator.refresh(within)
    clock.now += TTL / 4
    await authenticator.refresh(within)
    identities, members = await authenticator.resolve([digest], [chat])
    assert identities[digest] is not None and members[chat] == frozenset()
    assert _count(authenticator, "miss") == 2
    # Used again at 2.5 TTL: kept until 8.5 TTL, and then left to expire.
    used = clock.now
    while clock.now < used + 8 * TTL:
        clock.now += TTL / 4
        await authenticator.refresh(within)
    await authenticator.resolve([digest], [chat])
    assert _count(authenticator, "miss") == 4
