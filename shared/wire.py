"""A lean MongoDB connection for the worker's hot path: ``insert`` and ``find`` on raw OP_MSG.

PyMongo's asynchronous client costs ~220-360 us of client CPU per call, most of it
whatever the call carries (docs/benchmarks.md, ninth round): it wraps every reply in two tasks and an
``asyncio.wait`` and every send in a ``wait_for``, and runs its session, retry and
monitoring machinery around each command. The worker makes one such call per batch of
sends (``insert``), one per page read and, for a batch with a token or chat not in its
cache, two or three look-ups (``find``), so that fixed cost is a large share of a batch.
These connections encode a command with ``bson``'s C encoder, write it, and match the
reply by its request id, for ~90-170 us a call.

It is deliberately small, and used only where it is sure to behave like PyMongo:

* the server is the one PyMongo's own topology selects for writes (``client.address``:
  the standalone, the replica set's primary, or the one mongos), asked again after
  every failure, so discovery, fail-over and server selection stay PyMongo's (its
  streaming monitor hears of a step-down at once);
* credentials: none, or SCRAM-SHA-256 / SCRAM-SHA-1 (RFC 5802, MongoDB's defaults);
* TLS as the URL's ``tls*`` options ask, with a context built by PyMongo's own option
  parser (the same CA, certificate, CRL and hostname checks as its connections);
* reads from the primary only, with the server's default read concern;
* no compression or load-balanced mode, no ``mongodb+srv``, not several mongoses:
  :func:`unsupported` names what a URL asks for that this connection does not do, and
  the worker then keeps PyMongo for these calls too.

Failures raise PyMongo's own exceptions, so callers handle both paths alike: a lost or
timed-out connection ``AutoReconnect`` / ``NetworkTimeout``, a server that is no longer
primary ``NotPrimaryError``, a failed command ``OperationFailure``, write errors
``BulkWriteError`` with the server's ``writeErrors``. Requests are not retried here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import os
import platform
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import bson
from pymongo import AsyncMongoClient
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
)
from pymongo.saslprep import saslprep
from pymongo.uri_parser import parse_uri

Doc = dict[str, Any]

OP_MSG = 2013
HEADER = struct.Struct("<iiii")
# Flag bits of a reply (the server sets them only when a request asked for them).
CHECKSUM_PRESENT = 1
MORE_TO_COME = 2
# The largest message a server sends (its hello's maxMessageSizeBytes; 48 MB in every
# release): a longer length in a header means the stream is out of step.
MAX_MESSAGE = 48_000_000
MAX_WRITE_BATCH = 100_000
# Connections per client when PyMongo's maxPoolSize is 0 (unbounded there).
MAX_POOL = 100
# Room left in a message for the command document beside the inserted documents.
COMMAND_ROOM = 16 * 1024
# TCP keepalive as PyMongo sets it: first probe after 120 s idle, then every 10 s, 9 times.
KEEPALIVE = {"TCP_KEEPIDLE": 120, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 9}
# Error codes that mean "not the primary (any more)" (the drivers' SDAM specification,
# as PyMongo lists them); without a code, these words in the message say the same.
NOT_PRIMARY_CODES = frozenset({10058, 10107, 13435, 13436, 189, 91, 11600, 11602})
NOT_PRIMARY_WORDS = ("not master", "node is recovering")
SCRAM = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-1": hashlib.sha1}
# URI options (parse_uri's validated names) that change how a command must be sent or
# where it may go: a URL that sets one keeps PyMongo's path.
UNSUPPORTED_OPTIONS = {
    "compressors": "wire compression",
    "loadBalanced": "load-balanced mode",
    "readConcernLevel": "a read concern",
}


def _options(url: str) -> dict[str, Any]:
    # Validated: canonical names, typed values (timeouts in seconds), ssl= read as tls=.
    return dict(parse_uri(url, warn=True))


def unsupported(url: str) -> str | None:
    """Why this connection cannot stand in for PyMongo with ``url`` (None: it can)."""
    if url.startswith("mongodb+srv://"):
        return "mongodb+srv (its DNS records are PyMongo's to follow)"
    parsed = _options(url)
    options = parsed["options"]
    for name, what in UNSUPPORTED_OPTIONS.items():
        if options.get(name):
            return what
    preference = options.get("readPreference", "primary")
    if preference != "primary":
        return f"read preference {preference}"
    mechanism = options.get("authMechanism", "DEFAULT")
    if mechanism != "DEFAULT" and mechanism not in SCRAM:
        return f"authentication mechanism {mechanism}"
    if len(parsed["nodelist"]) > 1 and not options.get("replicaSet"):
        # Perhaps several mongoses, among which PyMongo spreads calls and names no one
        # server (client.address refuses); a replica set is named with replicaSet=.
        return "several hosts without replicaSet="
    return None


def tls_context(options: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The TLS context for parse_uri's validated ``options`` (None: plain TCP).

    Built by PyMongo's own parser, so ``tls=`` and the ``tls*`` options that imply it
    mean here what they mean to PyMongo. A context of our own: PyMongo's is shared by
    its connections and changed by them (TLS session resumption per server).
    """
    from pymongo.client_options import _parse_ssl_options

    # It reads the lower-cased names (PyMongo's own option dictionary ignores case).
    context, _ = _parse_ssl_options({name.lower(): v for name, v in options.items()}, False)
    if context is not None and not isinstance(context, ssl.SSLContext):
        raise TypeError(f"PyMongo built a {type(context)!r}, not an ssl.SSLContext")
    return context


class _Protocol(asyncio.Protocol):
    """Frames replies and hands each to the request it answers."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = bytearray()
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 16:
            length, _, responds_to, opcode = HEADER.unpack_from(buffer)
            if not 21 <= length <= MAX_MESSAGE or opcode != OP_MSG:
                self._fail(AutoReconnect(f"MongoDB sent a malformed message (opcode {opcode})"))
                return
            if len(buffer) < length:
                return
            flags = int.from_bytes(buffer[16:20], "little")
            if flags & MORE_TO_COME or buffer[20] != 0:
                self._fail(AutoReconnect("MongoDB sent a reply this connection did not ask for"))
                return
            end = length - 4 if flags & CHECKSUM_PRESENT else length
            body = bytes(buffer[21:end])
            del buffer[:length]
            waiter = self.waiting.pop(responds_to, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(AutoReconnect(f"MongoDB closed the connection: {exc or 'end of stream'}"))

    def _fail(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        for waiter in self.waiting.values():
            if not waiter.done():
                waiter.set_exception(exc)
        self.waiting.clear()
        if self.transport is not None:
            self.transport.close()


class WireConnection:
    """One raw connection to one MongoDB server; requests may overlap."""

    def __init__(
        self, protocol: _Protocol, address: tuple[str, int], timeout: float | None
    ) -> None:
        self._protocol = protocol
        # Bound once: on Python 3.11 each asyncio.get_running_loop() is a getpid() call.
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self.address = address
        self.timeout = timeout
        # The server's limits, from its hello.
        self.max_message = MAX_MESSAGE
        self.max_write_batch = MAX_WRITE_BATCH

    @classmethod
    async def open(
        cls,
        address: tuple[str, int],
        *,
        connect_timeout: float | None,
        timeout: float | None,
        credentials: Credentials | None = None,
        appname: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> WireConnection:
        """Connect (over TLS with ``tls``), greet the server (``hello``), authenticate."""
        loop = asyncio.get_running_loop()
        host, port = address
        try:
            async with asyncio.timeout(connect_timeout):
                # The host name goes to the handshake, which checks the certificate's
                # names against it unless the context was told not to.
                transport, protocol = await loop.create_connection(
                    _Protocol, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise AutoReconnect(f"{host}:{port}: {exc or 'connect timed out'}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # PyMongo's keepalive: a connection a NAT or firewall dropped while idle is
            # noticed within ~3.5 minutes rather than at its next call's timeout.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in KEEPALIVE.items():
                if hasattr(socket, option):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        conn = cls(protocol, address, timeout)
        try:
            hello: Doc = {"hello": 1, "$db": "admin"}
            # Shown in the server's log and currentOp next to PyMongo's connections.
            hello["client"] = {
                "driver": {"name": "chat-worker-wire", "version": "1"},
                "os": {"type": platform.system()},
            }
            if appname:
                hello["client"]["application"] = {"name": appname}
            if credentials is not None and credentials.mechanism is None:
                hello["saslSupportedMechs"] = f"{credentials.source}.{credentials.username}"
            greeting = await conn.command(hello)
            conn.max_message = int(greeting.get("maxMessageSizeBytes", MAX_MESSAGE))
            conn.max_write_batch = int(greeting.get("maxWriteBatchSize", MAX_WRITE_BATCH))
            if credentials is not None:
                mechanisms = greeting.get("saslSupportedMechs") or []
                await credentials.authenticate(conn, mechanisms)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def closed(self) -> bool:
        """True once the connection failed or was closed: open another."""
        return self._protocol.lost is not None

    async def command(self, body: Doc, sequence: tuple[str, bytes] | None = None) -> Doc:
        """Run one command (``body`` names its ``$db``); ``sequence`` is an OP_MSG document
        sequence, e.g. ``("documents", encoded)`` for ``insert``, with the documents
        already encoded one after the other. Returns the reply document after checking
        ``ok``."""
        protocol = self._protocol
        if protocol.lost is not None:
            raise protocol.lost
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise AutoReconnect("connection closed")
        request_id = next(self._ids) & 0x7FFFFFFF
        parts = [b"\x00\x00\x00\x00\x00", bson.encode(body)]
        if sequence is not None:
            name, encoded = sequence
            label = name.encode() + b"\x00"
            parts.append(struct.pack("<Bi", 1, 4 + len(label) + len(encoded)))
            parts.append(label)
            parts.append(encoded)
        payload = b"".join(parts)
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        protocol.waiting[request_id] = waiter
        transport.write(HEADER.pack(16 + len(payload), request_id, 0, OP_MSG) + payload)
        try:
            async with asyncio.timeout(self.timeout):
                reply = bson.decode(await waiter)
        except TimeoutError as exc:
            # As in PyMongo, a connection that timed out is not trusted with another call.
            protocol._fail(NetworkTimeout(f"MongoDB did not answer within {self.timeout} s"))
            raise NetworkTimeout(f"{body_name(body)}: no reply within {self.timeout} s") from exc
        except BaseException:
            # Still waited for (not answered, the connection not failed): the call was
            # cancelled before its reply came. MongoDB answers a connection's requests
            # in turn, so the next call on it would queue behind this one.
            if protocol.waiting.pop(request_id, None) is not None:
                protocol._fail(AutoReconnect("a call was cancelled before its reply came"))
            raise
        if not reply.get("ok"):
            code = reply.get("code")
            message = reply.get("errmsg", "command failed")
            if not_primary(reply):
                protocol._fail(NotPrimaryError(message, reply))
                raise NotPrimaryError(message, reply)
            raise OperationFailure(message, code, reply)
        return reply

    def close(self) -> None:
        """Close the socket (idempotent); requests in flight fail with AutoReconnect."""
        self._protocol._fail(AutoReconnect("connection closed"))


def not_primary(error: Mapping[str, Any]) -> bool:
    """Whether a command's or write concern's error says the server is not (or no longer)
    the primary, as PyMongo reads it: by code, or by message when there is no code."""
    code = error.get("code")
    if code is not None:
        return code in NOT_PRIMARY_CODES
    message = str(error.get("errmsg", ""))
    return any(words in message for words in NOT_PRIMARY_WORDS)


def body_name(body: Mapping[str, Any]) -> str:
    """The command's name: its first key."""
    return next(iter(body), "command")


class Credentials:
    """A user name and password, and how to prove them (SCRAM)."""

    def __init__(self, username: str, password: str, source: str, mechanism: str | None) -> None:
        self.username = username
        self.password = password
        self.source = source
        self.mechanism = mechanism
        # PBKDF2 takes milliseconds by design: a pool that reconnects derives once.
        self._salted: dict[tuple[str, str, int], bytes] = {}

    async def authenticate(self, conn: WireConnection, offered: Sequence[str]) -> None:
        """Run a SCRAM conversation (RFC 5802) on ``conn``; raises OperationFailure."""
        mechanism = self.mechanism or (
            "SCRAM-SHA-256" if "SCRAM-SHA-256" in offered else "SCRAM-SHA-1"
        )
        digest = SCRAM[mechanism]
        if mechanism == "SCRAM-SHA-256":
            secret = saslprep(self.password).encode()
        else:
            # SCRAM-SHA-1 in MongoDB proves the old MONGODB-CR digest, not the password.
            login = f"{self.username}:mongo:{self.password}".encode()
            secret = hashlib.md5(login, usedforsecurity=False).hexdigest().encode()
        user = self.username.replace("=", "=3D").replace(",", "=2C")
        nonce = base64.b64encode(os.urandom(24)).decode()
        first_bare = f"n={user},r={nonce}"
        start = await conn.command(
            {
                "saslStart": 1,
                "mechanism": mechanism,
                "payload": bson.Binary(b"n,," + first_bare.encode()),
                "autoAuthorize": 1,
                "options": {"skipEmptyExchange": True},
                "$db": self.source,
            }
        )
        server_first = bytes(start["payload"]).decode()
        fields = dict(item.split("=", 1) for item in server_first.split(","))
        server_nonce, salt, iterations = fields["r"], fields["s"], int(fields["i"])
        if not server_nonce.startswith(nonce) or iterations < 4096:
            raise OperationFailure("MongoDB's SCRAM answer is not valid", 18)
        key = (mechanism, salt, iterations)
        salted = self._salted.get(key)
        if salted is None:
            salted = hashlib.pbkdf2_hmac(digest().name, secret, base64.b64decode(salt), iterations)
            self._salted[key] = salted
        client_key = hmac.digest(salted, b"Client Key", digest)
        without_proof = f"c=biws,r={server_nonce}"
        message = f"{first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(digest(client_key).digest(), message, digest)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        final = f"{without_proof},p={base64.b64encode(proof).decode()}"
        reply = await conn.command(
            {
                "saslContinue": 1,
                "conversationId": start["conversationId"],
                "payload": bson.Binary(final.encode()),
                "$db": self.source,
            }
        )
        server_key = hmac.digest(salted, b"Server Key", digest)
        expected = base64.b64encode(hmac.digest(server_key, message, digest)).decode()
        answer = dict(item.split("=", 1) for item in bytes(reply["payload"]).decode().split(","))
        if not hmac.compare_digest(answer.get("v", ""), expected):
            raise OperationFailure("MongoDB's SCRAM server signature does not match", 18)
        while not reply.get("done"):
            reply = await conn.command(
                {
                    "saslContinue": 1,
                    "conversationId": reply["conversationId"],
                    "payload": bson.Binary(b""),
                    "$db": self.source,
                }
            )


class WireClient:
    """``insert`` and ``find`` on the server PyMongo's client writes to, over lean
    connections opened as calls need them and opened again after a failure."""

    def __init__(self, client: AsyncMongoClient[Doc], url: str, database: str) -> None:
        parsed = _options(url)
        options = parsed["options"]
        self._client = client
        self._database = database
        # The timeouts and name the PyMongo client itself runs with.
        pool = client.options.pool_options
        self._connect_timeout = pool.connect_timeout
        self._timeout = pool.socket_timeout or None
        self._appname: str = pool.appname or ""
        self._tls = tls_context(options)
        self._credentials: Credentials | None = None
        mechanism = options.get("authMechanism", "DEFAULT")
        if parsed.get("username") is not None:
            self._credentials = Credentials(
                parsed["username"],
                parsed.get("password") or "",
                options.get("authSource") or parsed.get("database") or "admin",
                None if mechanism == "DEFAULT" else mechanism,
            )
        # Connections are opened as concurrent calls need them (each runs one request at
        # a time, so MongoDB can run several at once), up to PyMongo's maxPoolSize.
        self._slots = asyncio.Semaphore(int(pool.max_pool_size) or MAX_POOL)
        self._idle: list[WireConnection] = []
        self._open: set[WireConnection] = set()
        self._opening = 0

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[WireConnection]:
        async with self._slots:
            conn = None
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if candidate.closed:  # lost while idle (a restart, a cut)
                    self._open.discard(candidate)
                else:
                    conn = candidate
            if conn is None:
                # PyMongo's topology picks the server (and notices a new primary).
                self._opening += 1
                try:
                    address = await self._client.address
                    if address is None:
                        raise AutoReconnect("no writable MongoDB server")
                    conn = await WireConnection.open(
                        address,
                        connect_timeout=self._connect_timeout,
                        timeout=self._timeout,
                        credentials=self._credentials,
                        appname=self._appname,
                        tls=self._tls,
                    )
                finally:
                    self._opening -= 1
                self._open.add(conn)
            try:
                yield conn
            except NetworkTimeout:
                # One slow call: that connection is closed (it is not trusted with
                # another), the others stay, as in PyMongo's pool.
                raise
            except AutoReconnect:
                # The server went away or stepped down: so did its other connections
                # (PyMongo resets its pool likewise).
                self._reset()
                raise
            finally:
                if conn.closed:
                    self._open.discard(conn)
                else:
                    self._idle.append(conn)

    def _reset(self) -> None:
        for conn in self._idle:
            conn.close()
            self._open.discard(conn)
        self._idle.clear()

    async def insert(
        self, collection: str, docs: Sequence[Doc], write_concern: Mapping[str, Any]
    ) -> int:
        """Insert in order, stopping at the first failure; the count inserted.

        Documents that do not fit the server's limits for one message go in several, one
        after the other, as PyMongo's ``insert_many`` sends them. A failure raises
        BulkWriteError with the server's ``writeErrors`` (their ``index`` counted from the
        first document of ``docs``) and ``writeConcernErrors``; unlike PyMongo, a write
        concern error also stops the messages after it (the worker retries the batch).
        """
        body: Doc = {"insert": collection, "ordered": True, "$db": self._database}
        if write_concern:
            body["writeConcern"] = dict(write_concern)
        encoded = [bson.encode(doc) for doc in docs]
        async with self._connection() as conn:
            return await self._insert(conn, body, encoded)

    async def _insert(self, conn: WireConnection, body: Doc, encoded: list[bytes]) -> int:
        room = conn.max_message - COMMAND_ROOM
        inserted = 0
        start = 0
        while start < len(encoded):
            end, size = start, 0
            while end < len(encoded) and end - start < conn.max_write_batch:
                if end > start and size + len(encoded[end]) > room:
                    break
                size += len(encoded[end])
                end += 1
            reply = await conn.command(body, ("documents", b"".join(encoded[start:end])))
            inserted += int(reply.get("n", 0))
            errors = reply.get("writeErrors") or []
            concern_error = reply.get("writeConcernError")
            if errors or concern_error:
                if concern_error and not_primary(concern_error):
                    conn.close()
                raise BulkWriteError(
                    {
                        "writeErrors": [{**e, "index": e.get("index", 0) + start} for e in errors],
                        "writeConcernErrors": [concern_error] if concern_error else [],
                        "nInserted": inserted,
                        "nUpserted": 0,
                        "nMatched": 0,
                        "nModified": 0,
                        "nRemoved": 0,
                        "upserted": [],
                    }
                )
            start = end
        return inserted

    async def find(
        self,
        collection: str,
        query: Doc,
        *,
        sort: Doc | None = None,
        limit: int = 0,
        projection: Doc | None = None,
    ) -> list[Doc]:
        """The documents matching ``query``, in ``sort`` order and at most ``limit`` when
        it is above 0, read from the primary: in one reply when they fit in one (16 MB)."""
        body: Doc = {"find": collection, "filter": query, "$db": self._database}
        if sort is not None:
            body["sort"] = sort
        if projection is not None:
            body["projection"] = projection
        if limit > 0:
            body["limit"] = limit
            # One more than the limit: given a batch of exactly ``limit``, a sort done in
            # memory leaves the cursor open, and closing it costs a getMore round trip.
            body["batchSize"] = limit + 1
        async with self._connection() as conn:
            cursor = (await conn.command(body))["cursor"]
            docs: list[Doc] = cursor["firstBatch"]
            while cursor["id"]:
                more: Doc = {"getMore": cursor["id"], "collection": collection}
                more["$db"] = self._database
                cursor = (await conn.command(more))["cursor"]
                docs.extend(cursor["nextBatch"])
        return docs

    def close(self) -> None:
        """Close every connection (idempotent); calls in flight fail with AutoReconnect."""
        for conn in self._open:
            conn.close()
        self._open.clear()
        self._idle.clear()

    @property
    def connections(self) -> int:
        """Connections open or being opened now."""
        return len(self._open) + self._opening
