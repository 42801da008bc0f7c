"""Token and membership look-ups with a short TTL cache.

Unknown tokens and chats are cached too (as absent), so a flood of wrong tokens costs
one query per distinct value per TTL. Revoking a token or removing a member takes
effect within the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shared.metrics import WorkerMetrics

from .store import Store

V = TypeVar("V")


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
    """A dict with per-entry expiry and a size bound (oldest entries go first)."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._data: dict[str, tuple[float, V | None]] = {}

    def get(self, key: str, now: float) -> tuple[bool, V | None]:
        """(found, value); an expired entry is not found."""
        hit = self._data.get(key)
        if hit is None or hit[0] < now:
            return False, None
        return True, hit[1]

    def put(self, key: str, value: V | None, now: float) -> None:
        """Store ``value`` (None caches an absence)."""
        self._data.pop(key, None)
        if len(self._data) >= self.max_entries:
            # Drop the oldest tenth at once rather than one entry per insert.
            for stale in list(self._data)[: max(1, self.max_entries // 10)]:
                del self._data[stale]
        self._data[key] = (now + self.ttl, value)

    def clear(self) -> None:
        """Forget everything."""
        self._data.clear()


class Authenticator:
    """Resolves token digests to identities and chat ids to member sets."""

    def __init__(
        self, store: Store, ttl: float, metrics: WorkerMetrics, max_entries: int = 200_000
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.identities: TTLCache[Identity] = TTLCache(ttl, max_entries)
        self.members: TTLCache[frozenset[str]] = TTLCache(ttl, max_entries)

    async def identities_for(self, digests: Iterable[str]) -> dict[str, Identity | None]:
        """Identity (or None) for each digest."""
        return await self._resolve(self.identities, digests, self._load_identities)

    async def members_of(self, chat_ids: Iterable[str]) -> dict[str, frozenset[str] | None]:
        """Member ids (or None for a missing chat) for each chat."""
        return await self._resolve(self.members, chat_ids, self._load_members)

    async def _resolve(
        self,
        cache: TTLCache[V],
        keys: Iterable[str],
        load: Callable[[list[str]], Awaitable[dict[str, V]]],
    ) -> dict[str, V | None]:
        now = time.monotonic()
        found: dict[str, V | None] = {}
        missing: list[str] = []
        for key in set(keys):
            hit, value = cache.get(key, now)
            if hit:
                found[key] = value
            else:
                missing.append(key)
        if found:
            self.metrics.auth_cache.labels("hit").inc(len(found))
        if missing:
            self.metrics.auth_cache.labels("miss").inc(len(missing))
            loaded = await load(missing)
            for key in missing:
                value = loaded.get(key)
                cache.put(key, value, now)
                found[key] = value
        return found

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
    if hasattr(value, "timestamp"):
        stamp: float = value.timestamp()
        return stamp
    return float(value)
