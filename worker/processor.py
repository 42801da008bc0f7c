"""Turns a batch of stream entries into stored messages, replies and pushes.

:meth:`Processor.process` has no side effect but MongoDB writes, and those are
idempotent: a batch that fails half-way is simply processed again with
``suspect=True``, which looks up what the first attempt (or a stale owner, or an
earlier delivery of the same entry) already stored, by event id and client key.

Within a batch, entries are handled in stream order. Sends are grouped and inserted
with one ``insert_many``; a ``get_history`` first flushes the sends before it, so a page
and its ``head`` reflect every message stored ahead of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from shared import protocol
from shared.codec import Grant, Push, Reply, StreamEntry, event_id
from shared.metrics import WorkerMetrics
from shared.wire import Doc

from .auth import Authenticator, Identity
from .store import CLIENT_KEY_INDEX, SEQ_INDEX, Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Item:
    """One stream entry in a batch."""

    stream: str
    entry_id: str
    partition: int
    entry: StreamEntry
    # When the worker read from MongoDB what it authorised this request on: the older of
    # its token's and its chat's cache entries (Authenticator.clock). Grants say how old.
    checked_at: float = 0.0

    @property
    def event_id(self) -> str:
        """Unique id of this request across all partitions: the message's ``_id``."""
        return event_id(self.partition, self.entry_id)


@dataclass(slots=True)
class Outcome:
    """What a processed batch publishes, in entry order."""

    replies: list[tuple[str, Reply]] = field(default_factory=list)  # (node, reply)
    _reserved: set[int] = field(default_factory=set)
    pushes: list[Push] = field(default_factory=list)
    order: list[tuple[str, int]] = field(default_factory=list)  # ("r"|"p", index)
    stored: int = 0
    reads: int = 0  # history reads answered

    def reply(self, node: str, reply: Reply) -> None:
        self.order.append(("r", len(self.replies)))
        self.replies.append((node, reply))

    def reserve(self) -> int:
        """Keep the next reply's place in order; :meth:`fill` it later."""
        index = len(self.replies)
        self.order.append(("r", index))
        self.replies.append(("", Reply(0, 0, b"")))
        self._reserved.add(index)
        return index

    def fill(self, index: int, node: str, reply: Reply) -> None:
        """Put the reply of a reserved place."""
        self.replies[index] = (node, reply)
        self._reserved.discard(index)

    @property
    def complete(self) -> bool:
        """True when every reserved place has its reply."""
        return not self._reserved

    def push(self, push: Push) -> None:
        self.order.append(("p", len(self.pushes)))
        self.pushes.append(push)


class StaleOwner(Exception):
    """An insert hit the (chat_id, seq) index: someone else wrote for this chat; reload."""


class AlreadyStored(Exception):
    """An insert hit the event-id or client-key index: a retry or a redelivery that the
    batch did not look up first. Processing the batch again with ``suspect`` answers it."""


class Counters:
    """Last sequence id per chat, loaded lazily and trusted while the partition is held."""

    def __init__(self, store: Store, max_chats: int = 200_000) -> None:
        self.store = store
        self.max_chats = max_chats
        self._last: dict[str, int] = {}

    def missing(self, chat_ids: set[str]) -> set[str]:
        """The chats of ``chat_ids`` without a counter yet."""
        # Not ``chat_ids - self._last.keys()``: a set minus a dict view walks the whole
        # dict (~45 us a batch with 3,000 chats' counters), this only the batch's chats.
        last = self._last
        return {chat_id for chat_id in chat_ids if chat_id not in last}

    async def load(self, chat_ids: set[str]) -> None:
        """Make sure every chat in ``chat_ids`` has a counter (one query for all the
        missing ones). At ``max_chats`` the counters loaded first are dropped, a tenth
        at a time, except those of ``chat_ids``: the caller is about to use them."""
        missing = self.missing(chat_ids)
        if not missing:
            return
        loaded = await self.store.last_seqs(missing)
        excess = len(self._last) + len(loaded) - self.max_chats
        if excess > 0:
            drop = max(excess, self.max_chats // 10)
            stale = list(islice((c for c in self._last if c not in chat_ids), drop))
            for chat in stale:
                del self._last[chat]
        self._last.update(loaded)

    def get(self, chat_id: str) -> int:
        """The chat's last id (call :meth:`load` first)."""
        return self._last[chat_id]

    def put(self, chat_id: str, seq: int) -> None:
        """Record the chat's new last id."""
        self._last[chat_id] = seq

    def forget(self, chat_ids: set[str] | None = None) -> None:
        """Drop counters (all of them by default) so they are read from MongoDB again."""
        if chat_ids is None:
            self._last.clear()
        else:
            for chat_id in chat_ids:
                self._last.pop(chat_id, None)


CONCURRENT_READS = 16


class Processor:
    """Validates, stores and answers one batch at a time."""

    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        counters: Counters,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.time,
        concurrent_reads: int = CONCURRENT_READS,
    ) -> None:
        self.store = store
        self.auth = auth
        self.counters = counters
        self.metrics = metrics
        self.clock = clock
        # History queries in flight at once. Past a few, more only queue inside the
        # driver (and make it open connections, two at a time) while each query's
        # latency grows: a batch of 500 reads ran at ~190 ms a query unbounded.
        self._reads = asyncio.Semaphore(concurrent_reads)

    async def process(
        self,
        items: Sequence[Item],
        *,
        suspect: bool,
        now_ms: float | None = None,
        read_cost_ms: float = 0.0,
    ) -> Outcome:
        """Handle ``items`` in order; raise on a MongoDB failure (the caller retries).

        ``now_ms``: the current time on the clock that stamped the entry ids (Redis's);
        with it, reads whose gateway will have stopped waiting before their reply is
        out are skipped unanswered. ``read_cost_ms``: recent batch time per read, which
        predicts when the batch's replies go out.
        """
        outcome = Outcome()
        if now_ms is not None:
            items = self._drop_expired(items, now_ms, read_cost_ms)
        digests = {i.entry.token_digest for i in items if i.entry.token_digest}
        # Timed by the authenticator, and only when it reads MongoDB: a cache hit is not
        # a MongoDB operation, and timing one put ~0 s samples in that histogram.
        token_read: dict[str, float] = {}
        chat_read: dict[str, float] = {}
        identities, members = await self.auth.resolve(
            digests, {i.entry.chat_id for i in items}, token_read, chat_read
        )
        now = self.clock()
        segment: list[tuple[Item, Identity]] = []
        # Consecutive history reads see the same data: they run concurrently, each in
        # its place in the reply order. Sends before them are stored first, sends after
        # them wait until they are done (a page never shows a later message).
        reads: list[tuple[int, Item, Identity]] = []
        for item in items:
            entry = item.entry
            identity = identities.get(entry.token_digest) if entry.token_digest else None
            if identity is None or not identity.valid(now):
                self._error(
                    outcome, item, protocol.TOKEN_VALIDATION_ERROR, protocol.DETAIL_BAD_TOKEN
                )
                continue
            chat_members = members.get(entry.chat_id)
            if chat_members is None or identity.user_id not in chat_members:
                # A non-member learns nothing more than for a chat that does not exist.
                self._error(outcome, item, protocol.CHAT_NOT_EXISTS, protocol.DETAIL_NO_CHAT)
                continue
            item.checked_at = min(token_read[entry.token_digest], chat_read[entry.chat_id])
            if entry.event_type in protocol.SEND_EVENTS:
                if reads:
                    await self._read_histories(outcome, reads)
                    reads = []
                segment.append((item, identity))
                continue
            if segment:
                await self._store_segment(outcome, segment, suspect)
                segment = []
            reads.append((outcome.reserve(), item, identity))
        if segment:
            await self._store_segment(outcome, segment, suspect)
        if reads:
            await self._read_histories(outcome, reads)
        assert outcome.complete
        return outcome

    def _drop_expired(
        self, items: Sequence[Item], now_ms: float, read_cost_ms: float
    ) -> Sequence[Item]:
        # After a join storm the stream holds reads whose gateways already answered
        # server_error (timeout), and a batch can hold more reads than can be served
        # before their gateways give up (every reply of a batch goes out at its end).
        # Serving them would only delay the reads that can still be answered in time,
        # and the clients' retries behind them, until nothing is answered in time at
        # all. So the newest reads are kept, as many as can be answered in time, and the
        # older ones skipped. Sends are never skipped: their outcome is unknown to the
        # client, and a retry with the same client_msg_id must find them stored.
        expiring = sorted(
            (entry_stamp_ms(item.entry_id) + item.entry.timeout * 1000.0, n)
            for n, item in enumerate(items)
            if item.entry.timeout and item.entry.event_type == protocol.GET_HISTORY
        )
        reads = len(expiring)
        skip: set[int] = set()
        for deadline, n in expiring:  # soonest deadline (oldest) first
            if now_ms + read_cost_ms * (reads - len(skip)) <= deadline:
                break  # this one can be answered in time, and every later one too
            skip.add(n)
        if not skip:
            return items
        self.metrics.expired.inc(len(skip))
        return [item for n, item in enumerate(items) if n not in skip]

    async def _read_histories(
        self, outcome: Outcome, reads: list[tuple[int, Item, Identity]]
    ) -> None:
        await self._load_counters({i.entry.chat_id for _, i, _ in reads})
        renewals = [read for read in reads if read[1].entry.grant_only]
        if renewals:
            # The gateway reads these pages itself: the checks above and a grant are all
            # it asked for.
            for index, item, who in renewals:
                outcome.fill(index, item.entry.node, self._history_reply(item, who, None))
            reads = [read for read in reads if not read[1].entry.grant_only]
            if not reads:
                return
        outcome.reads += len(reads)
        # Sockets joining together ask the same page of the same chat (a room after a
        # reconnect storm): one query per distinct page, each reply built per reader.
        keys = [_page_key(item.entry) for _, item, _ in reads]
        distinct = list(dict.fromkeys(keys))
        if len(distinct) == 1:
            # The usual case, one page: awaited here, without a Task and gather's future
            # (~10 µs and two passes of the event loop).
            pages = [await self._page(distinct[0])]
        else:
            pages = await asyncio.gather(*(self._page(key) for key in distinct))
        by_key = dict(zip(distinct, pages, strict=True))
        for (index, item, who), key in zip(reads, keys, strict=True):
            outcome.fill(index, item.entry.node, self._history_reply(item, who, by_key[key]))

    # -- replies -----------------------------------------------------------------

    def _error(self, outcome: Outcome, item: Item, reply_type: str, detail: str) -> None:
        entry = item.entry
        frame = protocol.encode_reply(reply_type, entry.event_type, None, detail, entry.request_id)
        outcome.reply(entry.node, Reply(entry.conn, entry.req, frame, revoke=entry.chat_id))
        self.metrics.event(entry.event_type, reply_type).inc()

    async def _page(self, key: PageKey) -> list[Doc]:
        chat_id, limit, before, after = key
        async with self._reads:
            page: list[Doc] = await self.metrics.mongo_call(
                "history", self.store.history(chat_id, limit=limit, before=before, after=after)
            )
        return page

    def _history_reply(self, item: Item, identity: Identity, page: list[Doc] | None) -> Reply:
        """A page and its grant, or with no ``page`` the grant alone (an empty frame)."""
        entry = item.entry
        head = self.counters.get(entry.chat_id)
        user = identity.user_id
        frame = b"" if page is None else protocol.history_frame(page, user, entry.request_id)
        grant = Grant(entry.chat_id, user, head, identity.expires_at, age=self._age(item))
        self.metrics.event(entry.event_type, protocol.SUCCESS).inc()
        return Reply(entry.conn, entry.req, frame, grant=grant)

    def _age(self, item: Item) -> float:
        """Seconds since what ``item`` was authorised on was read from MongoDB."""
        return max(0.0, self.auth.clock() - item.checked_at)

    # -- sends -------------------------------------------------------------------

    async def _store_segment(
        self, outcome: Outcome, segment: list[tuple[Item, Identity]], suspect: bool
    ) -> None:
        by_event: dict[str, Doc] = {}
        by_key: dict[tuple[str, str, str], Doc] = {}
        # Fresh entries are inserted without looking anything up first (one MongoDB round
        # trip less per batch): a retry or redelivery among them fails on a unique index,
        # and the batch is then processed again with ``suspect``, which looks them up.
        if suspect:
            client_keys = [
                (item.entry.chat_id, identity.user_id, item.entry.message["client_msg_id"])
                for item, identity in segment
                if item.entry.message and item.entry.message.get("client_msg_id")
            ]
            event_ids = [item.event_id for item, _ in segment]
            by_event, by_key = await self.metrics.mongo_call(
                "find_existing", self.store.find_existing(event_ids, client_keys)
            )
        await self._load_counters({i.entry.chat_id for i, _ in segment})

        now = int(self.clock())
        new_docs: list[Doc] = []
        # (item, identity, doc, head, push?): replies and pushes once the insert succeeded.
        # ``head`` is the grant's: the last id pushed ahead of this reply (see Grant).
        plan: list[tuple[Item, Identity, Doc, int, bool]] = []
        for item, identity in segment:
            entry = item.entry
            message: dict[str, Any] = entry.message or {}
            key = message.get("client_msg_id")
            existing = by_event.get(item.event_id) if by_event else None
            if existing is not None:
                # Redelivered entry: answer again, push again (gateways drop duplicates by id).
                plan.append((item, identity, existing, existing["seq"], True))
                continue
            if key is not None:
                existing = by_key.get((entry.chat_id, identity.user_id, key))
                if existing is not None:
                    # Client retry: the first stored message, and nothing pushed again.
                    # Every push up to the chat's last id went out before this reply: a
                    # socket authorised by it gets what follows, not what it had.
                    head = self.counters.get(entry.chat_id)
                    plan.append((item, identity, existing, head, False))
                    continue
            seq = self.counters.get(entry.chat_id) + 1
            self.counters.put(entry.chat_id, seq)
            doc: Doc = {
                "_id": item.event_id,
                "chat_id": entry.chat_id,
                "seq": seq,
                "user_id": identity.user_id,
                "username": identity.username,
                "avatar": identity.avatar,
                "type": message.get("type", protocol.TEXT),
                "text": message.get("text"),
                "file_url": message.get("file_url"),
                "created_at": now,
            }
            if key is not None:
                doc["client_msg_id"] = key
                by_key[(entry.chat_id, identity.user_id, key)] = doc
            new_docs.append(doc)
            plan.append((item, identity, doc, seq, True))

        try:
            await self.metrics.mongo_call("insert", self.store.insert_messages(new_docs))
        except Exception as exc:
            # Whatever got in before the failure is found by event id on the retry.
            self.counters.forget({i.entry.chat_id for i, _ in segment})
            duplicate = _duplicate_index(exc)
            if duplicate == SEQ_INDEX:
                raise StaleOwner(SEQ_INDEX) from exc
            if duplicate is not None:
                raise AlreadyStored(duplicate) from exc
            raise
        outcome.stored += len(new_docs)
        self.metrics.messages_stored.inc(len(new_docs))
        # When the insert was acknowledged (journaled): the gateways' delivery histogram
        # starts here. Taken before the insert, it counted the insert's own ~0.5-1.5 ms.
        stored_at = self.clock()

        # Counted once per event type, not once per send.
        answered: dict[str, int] = {}
        for item, identity, doc, head, push in plan:
            entry = item.entry
            answered[entry.event_type] = answered.get(entry.event_type, 0) + 1
            chat_id = entry.chat_id
            # One view for every frame: its is_my flips for the other members'.
            view = protocol.message_view(doc, True)
            seq = doc["seq"]
            # A stored message's reply rides on its push when the gateway can take it
            # so (codec.Push): one PUBLISH, and its request_id is added by the gateway.
            rides = push and entry.reply_on_push
            mine: bytes | None = None
            if not rides:
                mine = protocol.encode_reply(
                    protocol.SUCCESS,
                    entry.event_type,
                    [view],
                    protocol.DETAIL_SUCCESS,
                    entry.request_id,
                )
                grant = Grant(
                    chat_id,
                    identity.user_id,
                    head,
                    identity.expires_at,
                    None if seq == head else seq,
                    self._age(item),
                )
                outcome.reply(entry.node, Reply(entry.conn, entry.req, mine, grant=grant))
                if not push:
                    continue
            # The push's frame for the author's other sockets: the reply without its
            # request_id (the same bytes when there is none).
            if mine is not None and entry.request_id is None:
                push_mine = mine
            else:
                push_mine = protocol.encode_reply(
                    protocol.SUCCESS, entry.event_type, [view], protocol.DETAIL_SUCCESS
                )
            view["is_my"] = False
            other = protocol.encode_reply(
                protocol.SUCCESS, entry.event_type, [view], protocol.DETAIL_SUCCESS
            )
            outcome.push(
                Push(
                    chat_id=chat_id,
                    seq=seq,
                    author=doc["user_id"],
                    origin_node=entry.node,
                    origin_conn=entry.conn,
                    stored_at=stored_at,
                    mine=push_mine,
                    other=other,
                    # A pushed message's grant is (chat, author, seq): only the
                    # request and the token's expiry need saying.
                    reply_req=entry.req if rides else None,
                    reply_expires_at=identity.expires_at if rides else None,
                    reply_age=self._age(item) if rides and entry.carried_age else None,
                )
            )
        for event_type, n in answered.items():
            self.metrics.event(event_type, protocol.SUCCESS).inc(n)

    async def _load_counters(self, chat_ids: set[str]) -> None:
        # Most batches find every counter loaded: time only what reads MongoDB.
        missing = self.counters.missing(chat_ids)
        if missing:
            await self.metrics.mongo_call("last_seq", self.counters.load(missing))


def _duplicate_index(exc: Exception) -> str | None:
    """The index a duplicate-key failure hit (the seq index wins when several did)."""
    from pymongo.errors import BulkWriteError, DuplicateKeyError

    if isinstance(exc, DuplicateKeyError):
        errors = [exc.details or {}]
    elif isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors", [])
    else:
        return None
    if not errors or any(e.get("code") != 11000 for e in errors):
        return None
    names = set()
    for error in errors:
        pattern = error.get("keyPattern") or {}
        if "seq" in pattern:
            names.add(SEQ_INDEX)
        elif "client_msg_id" in pattern:
            names.add(CLIENT_KEY_INDEX)
        else:
            names.add("_id")
    return SEQ_INDEX if SEQ_INDEX in names else sorted(names)[0]


PageKey = tuple[str, int, Any, Any]


def _page_key(entry: StreamEntry) -> PageKey:
    """What a get_history reads: (chat, limit, before_id, after_id)."""
    query = entry.message or {}
    return (
        entry.chat_id,
        int(query.get("limit", protocol.HISTORY_DEFAULT_LIMIT)),
        query.get("before_id"),
        query.get("after_id"),
    )


def entry_stamp_ms(entry_id: str) -> int:
    """The millisecond part of a stream entry id (Redis's clock when it was added)."""
    return int(entry_id.split("-", 1)[0])


def entry_age_ms(entry_id: str, now_ms: float) -> float:
    """How long ago the entry was added, at ``now_ms`` on Redis's clock (never negative).

    The id holds the millisecond the entry was added in, truncated: the add fell
    anywhere within it, so the age is taken from the middle of that millisecond. From
    its start, every age came out 0.5 ms long on average, as large as a whole stream
    wait on a quiet worker.
    """
    return max(0.0, now_ms - entry_stamp_ms(entry_id) - 0.5)
