"""MongoDB access: collections, indexes and every query the worker and admin CLI make.

Data model (ARCHITECTURE.md): ``users`` {_id, username, avatar}; ``tokens`` {_id: sha256
hex of the token, user_id, expires_at?}; ``chats`` {_id, title?, member_ids};
``messages`` {_id: the stream entry's event id, chat_id, seq, user_id, username, avatar,
type, text, file_url, created_at, client_msg_id?}.

Uses PyMongo's native async API (``AsyncMongoClient``); Motor is deprecated by MongoDB
in its favour.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence

from pymongo import ASCENDING, IndexModel, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from shared.mongo import HistoryReader, find_by_ids
from shared.wire import Doc, WireClient

# Unique per chat: a stale partition owner that reuses a sequence id fails to insert.
SEQ_INDEX = "chat_seq_unique"
# Unique per (chat, author, client key): a client retry creates nothing new.
CLIENT_KEY_INDEX = "client_msg_unique"


class Store:
    """The chat's collections in one database.

    With a :class:`~shared.wire.WireClient`, the calls a batch makes (inserting messages,
    reading a page, looking up tokens and chats not in the worker's cache) go over its
    lean connection; everything else, and all of those without one, through PyMongo.
    """

    def __init__(self, db: AsyncDatabase[Doc], wire: WireClient | None = None) -> None:
        self.db = db
        self.wire = wire
        self.users: AsyncCollection[Doc] = db["users"]
        self.tokens: AsyncCollection[Doc] = db["tokens"]
        self.chats: AsyncCollection[Doc] = db["chats"]
        self.messages: AsyncCollection[Doc] = db["messages"]
        self.counters: AsyncCollection[Doc] = db["counters"]
        # A page of a chat, oldest first: the query both kinds of process make.
        self.history = HistoryReader(self.messages, wire).history

    async def ensure_indexes(self) -> None:
        """Create the indexes the code relies on (idempotent)."""
        await self.messages.create_indexes(
            [
                IndexModel(
                    [("chat_id", ASCENDING), ("seq", ASCENDING)], unique=True, name=SEQ_INDEX
                ),
                IndexModel(
                    [("chat_id", ASCENDING), ("user_id", ASCENDING), ("client_msg_id", ASCENDING)],
                    unique=True,
                    name=CLIENT_KEY_INDEX,
                    partialFilterExpression={"client_msg_id": {"$type": "string"}},
                ),
            ]
        )
        # Expired tokens are removed by MongoDB; the worker also checks expiry itself.
        await self.tokens.create_indexes(
            [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="token_expiry")]
        )
        await self.tokens.create_indexes([IndexModel([("user_id", ASCENDING)], name="token_user")])

    async def ping(self) -> None:
        """Raise when MongoDB does not answer."""
        await self.db.command("ping")

    # -- identity ----------------------------------------------------------------

    async def tokens_by_digest(self, digests: Iterable[str]) -> dict[str, Doc]:
        """Token documents by digest (only those that exist)."""
        return await self._by_ids(self.tokens, digests)

    async def users_by_id(self, user_ids: Iterable[str]) -> dict[str, Doc]:
        """User documents by id (``username`` and ``avatar`` only)."""
        return await self._by_ids(self.users, user_ids, {"username": 1, "avatar": 1})

    async def chats_by_id(self, chat_ids: Iterable[str]) -> dict[str, Doc]:
        """Chat documents by id (``member_ids`` only)."""
        return await self._by_ids(self.chats, chat_ids, {"member_ids": 1})

    async def _by_ids(
        self, collection: AsyncCollection[Doc], ids: Iterable[str], projection: Doc | None = None
    ) -> dict[str, Doc]:
        wanted = list(ids)
        if not wanted:
            return {}
        found = await find_by_ids(collection, wanted, self.wire, projection)
        return {doc["_id"]: doc for doc in found}

    # -- messages ----------------------------------------------------------------

    async def last_seqs(self, chat_ids: Collection[str]) -> dict[str, int]:
        """The highest sequence id stored in each of these chats (0 for an empty one).

        One query for them all, however many: a worker meets every chat anew after it
        starts or takes over partitions, and one query per chat made that first batch
        wait ~0.6 ms a chat. Sorted as the ``(chat_id, seq)`` index runs backwards,
        ``$group`` with ``$first`` lets mongod read one index key per chat (a
        DISTINCT_SCAN), not a chat's every message.
        """
        found = dict.fromkeys(chat_ids, 0)
        if not found:
            return found
        pipeline: list[Doc] = [
            {"$match": {"chat_id": {"$in": list(found)}}},
            {"$sort": {"chat_id": -1, "seq": -1}},
            {"$group": {"_id": "$chat_id", "seq": {"$first": "$seq"}}},
        ]
        async for doc in await self.messages.aggregate(pipeline):
            found[doc["_id"]] = int(doc["seq"])
        return found

    async def find_existing(
        self, event_ids: Sequence[str], client_keys: Sequence[tuple[str, str, str]]
    ) -> tuple[dict[str, Doc], dict[tuple[str, str, str], Doc]]:
        """Messages already stored for these events or client keys (chat, user, client id)."""
        clauses: list[Doc] = []
        if event_ids:
            clauses.append({"_id": {"$in": list(event_ids)}})
        clauses.extend(
            {"chat_id": chat, "user_id": user, "client_msg_id": key}
            for chat, user, key in client_keys
        )
        by_event: dict[str, Doc] = {}
        by_key: dict[tuple[str, str, str], Doc] = {}
        if not clauses:
            return by_event, by_key
        async for doc in self.messages.find({"$or": clauses}):
            by_event[doc["_id"]] = doc
            if doc.get("client_msg_id") is not None:
                by_key[(doc["chat_id"], doc["user_id"], doc["client_msg_id"])] = doc
        return by_event, by_key

    async def insert_messages(self, docs: Sequence[Doc]) -> None:
        """Insert in order; stops at the first failure (the caller retries the rest)."""
        if not docs:
            return
        if self.wire is not None:
            await self.wire.insert("messages", docs, self.messages.write_concern.document)
        else:
            await self.messages.insert_many(list(docs), ordered=True)

    # -- admin -------------------------------------------------------------------

    async def next_id(self, name: str) -> str:
        """The next free decimal id of a collection (``users`` or ``chats``)."""
        collection = self.db[name]
        while True:
            doc = await self.counters.find_one_and_update(
                {"_id": name}, {"$inc": {"n": 1}}, upsert=True, return_document=ReturnDocument.AFTER
            )
            assert doc is not None  # upsert with AFTER always returns the document
            candidate = str(doc["n"])
            if await collection.find_one({"_id": candidate}, {"_id": 1}) is None:
                return candidate

    @staticmethod
    def now() -> int:
        """Unix seconds, the seed's ``created_at``."""
        return int(time.time())
