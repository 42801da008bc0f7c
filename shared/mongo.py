"""MongoDB clients, and the one query both kinds of process make: a page of history.

The worker stores and reads; a gateway only reads pages for sockets already authorised
for the chat (``GATEWAY_READS_HISTORY``, see gateway/hub.py). Both build their clients
here, so the URL's options, the write concern and the choice of the lean connection
(:mod:`shared.wire`) are decided once.
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.uri_parser import split_options

from .config import Settings
from .wire import Doc, WireClient, unsupported

log = logging.getLogger(__name__)


def create_client(url: str, **kwargs: Any) -> AsyncMongoClient[Doc]:
    """An async client with short timeouts: its callers retry (or go another way) rather
    than hang."""
    return AsyncMongoClient(url, **client_options(url, **kwargs))


def client_options(url: str, **kwargs: Any) -> dict[str, Any]:
    """The keyword options of :func:`create_client`'s client for ``url``.

    Writes wait for MongoDB's journal (``j: true``) unless ``url`` names a write concern
    itself (``w=`` or ``journal=``): a send is acknowledged only once it is stored, and
    with MongoDB's default (``w: 1`` alone) a mongod crash can lose the last ~100 ms of
    acknowledged writes, which no client would ever send again.
    """
    defaults: dict[str, Any] = {
        "serverSelectionTimeoutMS": 3000,
        "connectTimeoutMS": 3000,
        "socketTimeoutMS": 10000,
        "retryWrites": False,  # a standalone mongod has no retryable writes
        "appname": "chat-worker",
    }
    # PyMongo lets keyword options override the URL's: the URL's own choices win here.
    named = {name.lower() for name in _url_options(url)}
    options = {name: value for name, value in defaults.items() if name.lower() not in named}
    if not names_write_concern(url):
        options["journal"] = True
    options.update(kwargs)
    return options


def _url_options(url: str) -> dict[str, Any]:
    query = url.partition("?")[2]
    return dict(split_options(query)) if query else {}


def names_write_concern(url: str) -> bool:
    """True when the MongoDB URI's options set ``w`` or ``journal`` (read by PyMongo's
    own option parser: case-insensitive names, ``&`` or ``;`` between options)."""
    options = _url_options(url)
    return "w" in options or "journal" in options


def wire_client(
    client: AsyncMongoClient[Doc], settings: Settings, calls: str = "inserts and history pages"
) -> WireClient | None:
    """The lean connection for the hot-path ``calls``, when MONGO_WIRE is on and the URL
    allows it (logged either way: which client makes them matters when reading a profile
    or a MongoDB log)."""
    if not settings.mongo_wire:
        log.info("MONGO_WIRE is off: PyMongo makes every MongoDB call")
        return None
    reason = unsupported(settings.mongo_url)
    if reason is not None:
        log.info("MONGO_URL asks for %s: PyMongo makes every MongoDB call", reason)
        return None
    log.info("%s go over the lean MongoDB connection (MONGO_WIRE)", calls)
    return WireClient(client, settings.mongo_url, settings.mongo_database)


class HistoryReader:
    """Reads pages of history: over the lean connection when there is one, else PyMongo."""

    def __init__(self, messages: AsyncCollection[Doc], wire: WireClient | None = None) -> None:
        self.messages = messages
        self.wire = wire

    async def history(
        self,
        chat_id: str,
        *,
        limit: int,
        before: int | None = None,
        after: int | None = None,
        upto: int | None = None,
    ) -> list[Doc]:
        """A page of a chat, oldest first: after ``after`` (ascending) or the latest before
        ``before`` (or the latest of all); nothing above ``upto`` when it is given."""
        query: Doc = {"chat_id": chat_id}
        bounds: Doc = {}
        if after is not None:
            bounds["$gt"] = after
        if upto is not None and (before is None or upto < before):
            bounds["$lte"] = upto
        elif before is not None:
            bounds["$lt"] = before
        if bounds:
            query["seq"] = bounds
        order = ASCENDING if after is not None else DESCENDING
        if self.wire is not None:
            page = await self.wire.find(self.messages.name, query, sort={"seq": order}, limit=limit)
        else:
            # to_list takes the whole batch in one await; iterating the cursor costs a
            # coroutine step per document (~10 % of the client CPU of a page of 50).
            page = await self.messages.find(query).sort("seq", order).limit(limit).to_list()
        if order == DESCENDING:
            page.reverse()
        return page

    async def by_ids(self, ids: list[str]) -> list[Doc]:
        """The stored messages among ``ids`` (event ids, the messages' ``_id``)."""
        return await find_by_ids(self.messages, ids, self.wire)


async def find_by_ids(
    collection: AsyncCollection[Doc],
    ids: list[str],
    wire: WireClient | None,
    projection: Doc | None = None,
) -> list[Doc]:
    """The documents of ``collection`` among ``ids`` (their ``_id``), in ``_id`` order,
    over the lean connection when there is one, else through PyMongo."""
    query: Doc = {"_id": {"$in": ids}}
    if wire is not None:
        return await wire.find(
            collection.name, query, sort={"_id": 1}, limit=len(ids), projection=projection
        )
    return await collection.find(query, projection).sort("_id", ASCENDING).to_list()
