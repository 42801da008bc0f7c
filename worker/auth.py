"""Token and membership look-ups with a short TTL cache.

Unknown tokens and chats are cached too (as absent), so a flood of wrong tokens costs
one query per distinct value per TTL. Revoking a token or removing a member takes
effect within the TTL, and at once when it is announced on the control channel
(``worker.admin`` does): :meth:`Authenticator.run_control` drops those entries, and
re-reads a chat's members when one is added.

Entries in use are read again before they expire (:meth:`Authenticator.run_refresh`),
in bulk and off the batch path: without it every hot token and chat expires once per
TTL inside some batch, which then waits for an extra MongoDB round trip (at 3,000
sends/s over 1,000 users, 240 misses a second, in a third of all batches). "In use"
reaches back ``keep`` seconds (AUTH_CACHE_KEEP_SECONDS), longer than the TTL: a user who
sends every few seconds or minutes would otherwise find their token expired at almost
every send, and each such batch waits for its look-ups (on the 2-core benchmark machine
~0.7-1 ms of the servers' CPU a send at 30 sends/s), where the refresher reads the same
token in a query of up to 1,000 keys at ~17 us of CPU a key, worker and mongod together
(docs/benchmarks.md, 8 Dec).
The TTL still bounds how old a decision is. A batch that does miss looks its tokens
(then their users) and its chats up at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shared.backoff import Backoff, run_every
from shared.codec import ControlMessage, Revocation, decode_control
from shared.logs import describe_error
from shared.metrics import WorkerMetrics
from shared.resp import RespConnection, RespError

from .store import Store

log = logging.getLogger(__name__)

V = TypeVar("V")

# Keys read again per query by the refresher.
REFRESH_SLICE = 1000
# The refresher reads what expires within this share of the TTL, every quarter TTL (on
# a schedule): a key is read in the last round before it would expire, with 0.05 TTL to
# spare for a round that starts late, and the rest of the quarter for its reads.
REFRESH_WITHIN = 0.3


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token belongs to, as messages record it."""

    user_id: str
    username: str
    avatar: str | None
    expires_at: float | None  # unix seconds

    def valid(self, now: float) -> bool:
        """False once the token has expired."""
        return self.expires_at is None or now < self.expires_at


class TTLCache(Generic[V]):
    """A dict with per-entry expiry and a size bound (oldest entries go first).

    It also remembers when each key was last found, so that the ones still in use can be
    read again before they expire (:meth:`due`).
    """

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        # Insertion order is (near enough) expiry order: ``put`` re-inserts at the end
        # and every entry lives ``ttl``. :meth:`due` relies on it to read only the front.
        self._data: dict[str, tuple[float, V | None]] = {}
        self._used: dict[str, float] = {}  # key -> last found; only keys in _data
        self._last_due = float("-inf")  # when due() was last called

    def get(self, key: str, now: float) -> tuple[bool, V | None]:
        """(found, value); an expired entry is not found."""
        hit = self.entry(key, now)
        return (False, None) if hit is None else (True, hit[1])

    def entry(self, key: str, now: float) -> tuple[float, V | None] | None:
        """(when it was read from the source, value), or None when absent or expired. A
        found key counts as used at ``now`` (see :meth:`due`)."""
        hit = self._data.get(key)
        if hit is None or hit[0] < now:
            return None
        self._used[key] = now
        return hit[0] - self.ttl, hit[1]

    def put(self, key: str, value: V | None, now: float) -> None:
        """Store ``value`` (None caches an absence), read from the source at or after
        ``now``: it expires at ``now + ttl``."""
        self._data.pop(key, None)
        if len(self._data) >= self.max_entries:
            # Drop the oldest tenth at once rather than one entry per insert.
            for stale in list(self._data)[: max(1, self.max_entries // 10)]:
                del self._data[stale]
                self._used.pop(stale, None)
        self._data[key] = (now + self.ttl, value)

    def fill(
        self, keys: Iterable[str], loaded: Mapping[str, V], now: float, *, used: bool = False
    ) -> dict[str, V | None]:
        """Store what was read for ``keys`` at or after ``now``; a key absent from
        ``loaded`` is cached as absent. ``used``: they were read because they were asked
        for (a miss), which counts as found at ``now`` (a refresh does not). Returns the
        stored values."""
        values: dict[str, V | None] = {}
        for key in keys:
            values[key] = value = loaded.get(key)
            self.put(key, value, now)
            if used:
                self._used[key] = now
        return values

    def due(self, now: float, within: float, keep: float = 0.0) -> list[str]:
        """Keys that expire within ``within`` seconds (and have not yet) and are still in
        use: a value found in the last ``keep`` seconds, or found since the last call.
        An absence counts as in use only by the second rule, so a flood of wrong tokens
        is not kept warm. Expired entries met on the way are dropped.

        Only the front of the cache is read (up to the first entry not due), so a call
        costs what it returns and what it drops, not the cache's size.
        """
        since, self._last_due = self._last_due, now
        horizon = min(now - keep, since)
        limit = now + within
        due: list[str] = []
        expired: list[str] = []
        used = self._used
        for key, (expires, value) in self._data.items():
            if expires > limit:
                break
            if expires < now:
                expired.append(key)
                continue
            last = used.get(key)
            if last is not None and last >= (horizon if value is not None else since):
                due.append(key)
        for key in expired:
            del self._data[key]
            used.pop(key, None)
        return due

    def drop(self, key: str) -> None:
        """Forget one entry: the next look-up reads it from the source."""
        self._data.pop(key, None)
        self._used.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._data.clear()
        self._used.clear()


class Authenticator:
    """Resolves token digests to identities and chat ids to member sets."""

    def __init__(
        self,
        store: Store,
        ttl: float,
        metrics: WorkerMetrics,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
        keep: float = 0.0,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.keep = keep
        self.metrics = metrics
        self.clock = clock
        self.identities: TTLCache[Identity] = TTLCache(ttl, max_entries)
        self.members: TTLCache[frozenset[str]] = TTLCache(ttl, max_entries)

    async def run_refresh(self) -> None:
        """Every quarter TTL, read again the entries in use that expire within 0.3 TTL,
        until cancelled: a key found in the last ``keep`` seconds is never missed inside a
        batch, and is read about every three quarters of a TTL (the round before the one
        it would miss). A failed round is retried sooner, with a bounded backoff;
        meanwhile nothing is lost: the entries expire and batches load them as misses."""
        await run_every(
            self.ttl / 4,
            lambda: self.refresh(within=REFRESH_WITHIN * self.ttl),
            log,
            "auth cache refresh failed",
            base=0.05,
            # On a schedule: rounds that drift later by their own length could miss the
            # last one before an entry expires once they take long (many keys kept).
            from_start=True,
        )

    def forget(self, message: ControlMessage) -> None:
        """Drop what a control message makes stale: the chat's members, the tokens."""
        if message.chat_id is not None:
            self.members.drop(message.chat_id)
        if isinstance(message, Revocation):
            for digest in message.token_digests:
                self.identities.drop(digest)

    async def run_control(self, redis_url: str, channel: str, name: str = "") -> None:
        """Follow the control channel and :meth:`forget` what each message names, until
        cancelled. A message missed while disconnected costs nothing worse than the
        TTL: the entry expires, or the refresher reads it again, as without this."""
        backoff = Backoff(cap=self.ttl)
        while True:
            conn: RespConnection | None = None
            try:
                conn = await RespConnection.open(redis_url, name=name)
                conn.send(("SUBSCRIBE", channel))
                backoff.reset()
                while True:
                    message = await conn.read()
                    if not (isinstance(message, list) and message[:1] == [b"message"]):
                        continue  # the subscription's confirmation
                    try:
                        control = decode_control(message[2])
                    except (ValueError, KeyError, TypeError):
                        log.error("dropping a corrupt control message")
                        continue
                    if control is not None:
                        self.forget(control)
            except asyncio.CancelledError:
                raise
            except (ConnectionError, OSError, RespError, TimeoutError) as exc:
                log.warning("control channel lost", extra={"error": describe_error(exc)})
            except Exception:
                log.exception("control channel listener failed")
            finally:
                if conn is not None:
                    conn.close()
            await backoff.sleep()

    async def refresh(self, within: float) -> int:
        """Read again the entries in use (see :meth:`TTLCache.due`) that expire within
        ``within`` seconds; returns how many were read."""
        now = self.clock()
        tokens = self.identities.due(now, within, self.keep)
        chats = self.members.due(now, within, self.keep)
        await self._reload(self.identities, tokens, self._load_identities, now)
        await self._reload(self.members, chats, self._load_members, now)
        return len(tokens) + len(chats)

    async def _reload(
        self,
        cache: TTLCache[V],
        keys: list[str],
        load: Callable[[list[str]], Awaitable[dict[str, V]]],
        now: float,
    ) -> None:
        # In slices: one ``$in`` query over every key in use could pass BSON's 16 MB.
        for start in range(0, len(keys), REFRESH_SLICE):
            part = keys[start : start + REFRESH_SLICE]
            cache.fill(part, await self.metrics.mongo_call("auth", load(part)), now)
            self.metrics.auth_result("refreshed").inc(len(part))

    async def identities_for(
        self, digests: Iterable[str], read_at: dict[str, float] | None = None
    ) -> dict[str, Identity | None]:
        """Identity (or None) for each digest; ``read_at`` gets when each was read from
        MongoDB (on :attr:`clock`), which is how old a decision taken on it may be."""
        return (await self.resolve(digests, (), read_at, None))[0]

    async def members_of(
        self, chat_ids: Iterable[str], read_at: dict[str, float] | None = None
    ) -> dict[str, frozenset[str] | None]:
        """Member ids (or None for a missing chat) for each chat; ``read_at`` as for
        :meth:`identities_for`."""
        return (await self.resolve((), chat_ids, None, read_at))[1]

    async def resolve(
        self,
        digests: Iterable[str],
        chat_ids: Iterable[str],
        token_read: dict[str, float] | None = None,
        chat_read: dict[str, float] | None = None,
    ) -> tuple[dict[str, Identity | None], dict[str, frozenset[str] | None]]:
        """:meth:`identities_for` and :meth:`members_of` at once: when both caches miss,
        the two look-ups run together, so a batch waits for one of them, not both."""
        now = self.clock()
        identities, tokens_missing = self._found(self.identities, digests, now, token_read)
        members, chats_missing = self._found(self.members, chat_ids, now, chat_read)
        loads = []
        if tokens_missing:
            loads.append(
                self._load(
                    self.identities,
                    tokens_missing,
                    self._load_identities,
                    identities,
                    now,
                    token_read,
                )
            )
        if chats_missing:
            loads.append(
                self._load(self.members, chats_missing, self._load_members, members, now, chat_read)
            )
        if len(loads) == 1:
            await loads[0]
        elif loads:
            # Both finish before this returns (or raises the first failure), so no look-up
            # is left running, or failing unheard, behind the batch.
            for outcome in await asyncio.gather(*loads, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
        return identities, members

    def _found(
        self,
        cache: TTLCache[V],
        keys: Iterable[str],
        now: float,
        read_at: dict[str, float] | None,
    ) -> tuple[dict[str, V | None], list[str]]:
        """What ``cache`` holds of ``keys``, and the keys it does not."""
        found: dict[str, V | None] = {}
        missing: list[str] = []
        for key in set(keys):
            hit = cache.entry(key, now)
            if hit is None:
                missing.append(key)
                continue
            found[key] = hit[1]
            if read_at is not None:
                read_at[key] = hit[0]
        if found:
            self.metrics.auth_result("hit").inc(len(found))
        return found, missing

    async def _load(
        self,
        cache: TTLCache[V],
        missing: list[str],
        load: Callable[[list[str]], Awaitable[dict[str, V]]],
        found: dict[str, V | None],
        now: float,
        read_at: dict[str, float] | None,
    ) -> None:
        """Read ``missing`` from MongoDB into ``cache`` and ``found``."""
        self.metrics.auth_result("miss").inc(len(missing))
        loaded = await self.metrics.mongo_call("auth", load(missing))
        found.update(cache.fill(missing, loaded, now, used=True))
        if read_at is not None:
            # Read after ``now``: counting from it errs towards older, never younger.
            read_at.update(dict.fromkeys(missing, now))

    async def _load_identities(self, digests: list[str]) -> dict[str, Identity]:
        tokens = await self.store.tokens_by_digest(digests)
        users = await self.store.users_by_id({doc["user_id"] for doc in tokens.values()})
        result: dict[str, Identity] = {}
        for digest, token in tokens.items():
            user = users.get(token["user_id"])
            if user is None:
                continue
            result[digest] = Identity(
                user_id=user["_id"],
                username=user.get("username") or "",
                avatar=user.get("avatar"),
                expires_at=_unix(token.get("expires_at")),
            )
        return result

    async def _load_members(self, chat_ids: list[str]) -> dict[str, frozenset[str]]:
        chats = await self.store.chats_by_id(chat_ids)
        return {cid: frozenset(doc.get("member_ids") or ()) for cid, doc in chats.items()}


def _unix(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        # PyMongo returns naive datetimes in UTC; timestamp() would read them as local.
        when: dt.datetime = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return when.timestamp()
    return float(value)
