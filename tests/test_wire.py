"""The lean MongoDB connection (shared/wire.py) against real mongod servers.

What it must do is what PyMongo does for the same call: the same documents stored and
read, the same exceptions for duplicates, lost connections and a primary stepping down,
SCRAM with the password PyMongo would use. A small TCP relay between the client and the
session's mongod cuts or stalls the connection; the relay only copies bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import bson
import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
)
from pymongo.uri_parser import parse_uri

from deploy.local.servers import LOOPBACK, LocalServer, free_port, mongo_server
from shared.config import Settings
from shared.mongo import HistoryReader, create_client, wire_client
from shared.wire import (
    COMMAND_ROOM,
    Doc,
    WireClient,
    WireConnection,
    not_primary,
    tls_context,
    unsupported,
)
from tests.conftest import Servers
from tests.scale.common import with_query
from tests.support import Relay, message_docs
from worker.processor import _duplicate_index
from worker.store import Store

pytestmark = pytest.mark.timeout(120)


def _docs(chat: str, first: int, count: int) -> list[Doc]:
    return message_docs(chat, first, count, text="message {seq} ✓ ünïcode")


@contextlib.asynccontextmanager
async def _stores(url: str, database: str) -> AsyncIterator[tuple[Store, Store, WireClient]]:
    """The same database through PyMongo alone and through the lean connection."""
    client = create_client(url)
    wire = WireClient(client, url, database)
    try:
        yield Store(client[database]), Store(client[database], wire), wire
    finally:
        wire.close()
        await client.close()


async def _getmores(store: Store) -> int:
    """getMore commands the server has run so far."""
    return int((await store.db.command("serverStatus"))["opcounters"]["getmore"])


async def test_stored_and_read_as_pymongo_stores_and_reads(
    settings: Settings, cleanup: None
) -> None:
    async with _stores(settings.mongo_url, settings.mongo_database) as (plain, lean, wire):
        await plain.ensure_indexes()
        await lean.insert_messages(_docs("c1", 1, 120))
        await plain.insert_messages(_docs("c2", 1, 3))
        stored = await plain.messages.find({"chat_id": "c1"}).sort("seq", 1).to_list()
        assert stored == _docs("c1", 1, 120)
        for query in (
            {"limit": 50},
            {"limit": 50, "before": 40},
            {"limit": 20, "after": 100},
            {"limit": 200, "after": 0},
            {"limit": 5, "before": 1},
        ):
            before = await _getmores(plain)
            page = await lean.history("c1", **query)
            # A page is one round trip, full (50 of 120) or not.
            assert await _getmores(plain) == before, query
            assert page == await plain.history("c1", **query), query
        assert [d["seq"] for d in await lean.history("c1", limit=3, before=40)] == [37, 38, 39]
        assert await lean.history("nobody", limit=50) == []
        # Messages by their _id (a gateway's look-up of sends whose replies it missed).
        wanted = ["c1-7", "c2-3", "c1-999", "c1-120"]
        for reader in (HistoryReader(plain.messages), HistoryReader(lean.messages, wire)):
            found = sorted(await reader.by_ids(wanted), key=lambda d: d["_id"])
            assert found == sorted(
                [*_docs("c1", 7, 1), *_docs("c2", 3, 1), *_docs("c1", 120, 1)],
                key=lambda d: d["_id"],
            )


async def test_look_ups_read_as_pymongo_reads_them(settings: Settings, cleanup: None) -> None:
    """Tokens, users and chats by id, the same through both and in one round trip; a
    result longer than the server's first reply (101 documents) is read to its end."""
    async with _stores(settings.mongo_url, settings.mongo_database) as (plain, lean, wire):
        n = 150
        await plain.users.insert_many(
            [
                {"_id": f"u{i}", "username": f"User {i}", "avatar": None, "bio": "-"}
                for i in range(n)
            ]
        )
        await plain.tokens.insert_many([{"_id": f"t{i}", "user_id": f"u{i}"} for i in range(n)])
        await plain.chats.insert_many(
            [{"_id": f"c{i}", "title": "x", "member_ids": [f"u{i}", "u0"]} for i in range(n)]
        )
        digests = [f"t{i}" for i in range(n)] + ["unknown"]
        before = await _getmores(plain)
        tokens = await lean.tokens_by_digest(digests)
        assert await _getmores(plain) == before  # a look-up is one round trip
        assert tokens == await plain.tokens_by_digest(digests)
        assert len(tokens) == n and tokens["t7"] == {"_id": "t7", "user_id": "u7"}
        user_ids = [f"u{i}" for i in range(n)]
        before = await _getmores(plain)
        users = await lean.users_by_id(user_ids)  # every one found: the limit exactly
        assert await _getmores(plain) == before
        user_ids.append("unknown")
        users = await lean.users_by_id(user_ids)
        assert users == await plain.users_by_id(user_ids)
        assert len(users) == n and users["u7"] == {
            "_id": "u7",
            "username": "User 7",
            "avatar": None,
        }
        chat_ids = [f"c{i}" for i in range(n)] + ["unknown"]
        chats = await lean.chats_by_id(chat_ids)
        assert chats == await plain.chats_by_id(chat_ids)
        assert len(chats) == n and chats["c3"] == {"_id": "c3", "member_ids": ["u3", "u0"]}
        before = await _getmores(plain)
        by_name = await wire.find("users", {}, sort={"username": -1}, limit=n)  # no index
        assert await _getmores(plain) == before and len(by_name) == n
        everyone = await wire.find("users", {}, sort={"_id": 1})
        assert await _getmores(plain) > before  # past the server's first batch
        assert everyone == await plain.users.find({}).sort("_id", 1).to_list()
        assert len(everyone) == n


async def test_duplicates_fail_as_insert_many_fails(settings: Settings, cleanup: None) -> None:
    async with _stores(settings.mongo_url, settings.mongo_database) as (plain, lean, _):
        await plain.ensure_indexes()
        await plain.insert_messages(_docs("c1", 1, 2))
        failures: list[BulkWriteError] = []
        for store, chat in ((plain, "c1"), (lean, "c1")):
            # Ordered: the two before the duplicate go in, the one after does not.
            batch = [*_docs(chat, 10, 2), _docs(chat, 2, 1)[0] | {"_id": "other"}]
            batch.append(_docs(chat, 20, 1)[0])
            with pytest.raises(BulkWriteError) as caught:
                await store.insert_messages(batch)
            failures.append(caught.value)
            await plain.messages.delete_many({"seq": {"$gte": 10}})
        ours, theirs = failures[1].details, failures[0].details
        assert ours["nInserted"] == theirs["nInserted"] == 2
        assert [e["code"] for e in ours["writeErrors"]] == [11000]
        assert ours["writeErrors"][0]["keyPattern"] == theirs["writeErrors"][0]["keyPattern"]
        assert ours["writeErrors"][0]["index"] == theirs["writeErrors"][0]["index"] == 2
        assert _duplicate_index(failures[1]) == _duplicate_index(failures[0]) == "chat_seq_unique"


async def test_an_insert_too_large_for_one_message_goes_in_several(
    settings: Settings, cleanup: None
) -> None:
    async with _stores(settings.mongo_url, settings.mongo_database) as (plain, lean, wire):
        await plain.ensure_indexes()
        await plain.insert_messages([_docs("c", 40, 1)[0] | {"_id": "earlier"}])
        await lean.history("c", limit=1)  # opens the connection
        [conn] = wire._idle
        # As if the server took messages of ~3 documents: seq 40 is in the 14th.
        conn.max_message = COMMAND_ROOM + 3 * len(bson.encode(_docs("c", 1, 1)[0])) + 50
        with pytest.raises(BulkWriteError) as caught:
            await lean.insert_messages(_docs("c", 1, 60))
        assert caught.value.details["nInserted"] == 39
        assert [e["index"] for e in caught.value.details["writeErrors"]] == [39]
        assert _duplicate_index(caught.value) == "chat_seq_unique"
        stored = [d["seq"] for d in await plain.history("c", limit=200, after=0)]
        assert stored == list(range(1, 41))
        conn.max_write_batch = 7
        assert await wire.insert("messages", _docs("d", 1, 30), {}) == 30
        assert len(await plain.history("d", limit=200, after=0)) == 30


async def test_the_write_concern_goes_with_the_insert(settings: Settings, cleanup: None) -> None:
    client: AsyncMongoClient[Doc] = create_client(settings.mongo_url)
    wire = WireClient(client, settings.mongo_url, settings.mongo_database)
    try:
        assert await wire.insert("m", _docs("c", 1, 2), {"j": True}) == 2
        # A standalone mongod refuses to wait for two members: proof the concern is sent.
        with pytest.raises((BulkWriteError, OperationFailure)):
            await wire.insert("m", _docs("c", 3, 1), {"w": 2})
    finally:
        wire.close()
        await client.close()


# -- credentials ------------------------------------------------------------------


PASSWORD = "pä ss:w@rd,=1"


@pytest.fixture(scope="module")
def auth_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A mongod that requires authentication, with one user known by both mechanisms."""
    server = mongo_server(
        free_port(), tmp_path_factory.mktemp("auth-mongo"), extra=["--auth"]
    ).start(timeout=60)
    try:
        # The localhost exception lets the first user be created without credentials.
        with MongoClient(server.url, serverSelectionTimeoutMS=10000) as client:
            client.admin.command(
                "createUser",
                "ann",
                pwd=PASSWORD,
                roles=["root"],
                mechanisms=["SCRAM-SHA-1", "SCRAM-SHA-256"],
            )
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("mechanism", [None, "SCRAM-SHA-256", "SCRAM-SHA-1"])
async def test_scram_as_pymongo_authenticates(
    auth_mongo: LocalServer, mechanism: str | None
) -> None:
    password = urllib.parse.quote_plus(PASSWORD)
    url = f"mongodb://ann:{password}@{LOOPBACK}:{auth_mongo.port}/chat?authSource=admin"
    if mechanism:
        url += f"&authMechanism={mechanism}"
    assert unsupported(url) is None
    async with _stores(url, "chat") as (plain, lean, wire):
        await lean.insert_messages(_docs(f"c-{mechanism}", 1, 2))
        assert len(await plain.history(f"c-{mechanism}", limit=10)) == 2
        # A new connection proves the same password with the key derived the first time.
        wire.close()
        assert len(await lean.history(f"c-{mechanism}", limit=10)) == 2
    wrong = url.replace(password, "wrong")
    async with _stores(wrong, "chat") as (_, lean, wire):
        # PyMongo's own client (used to find the server) does not check credentials
        # until it runs a command; the lean connection refuses to go on.
        with pytest.raises(OperationFailure) as caught:
            await wire.find("messages", {}, sort={"seq": 1}, limit=1)
        assert caught.value.code == 18  # AuthenticationFailed


async def test_without_credentials_a_server_that_requires_them_refuses(
    auth_mongo: LocalServer,
) -> None:
    async with _stores(auth_mongo.url, "chat") as (_, _lean, wire):
        with pytest.raises(OperationFailure) as caught:
            await wire.insert("messages", _docs("c", 1, 1), {})
        assert caught.value.code == 13  # Unauthorized


# -- TLS --------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        reason = "openssl (Debian's openssl package) is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True)


def _certificate(cwd: Path, name: str, ca: str, *extensions: str) -> Path:
    """A key and a certificate signed by ``ca``, in one PEM file (as mongod takes them)."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text("".join(f"{line}\n" for line in extensions))
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
             "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip
    pem = cwd / f"{name}.pem"
    pem.write_bytes((cwd / f"{name}.key").read_bytes() + (cwd / f"{name}.crt").read_bytes())
    return pem


@dataclass
class TlsMongo:
    server: LocalServer
    ca: Path
    other_ca: Path
    client: Path


@pytest.fixture(scope="module")
def tls_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMongo]:
    """A mongod that takes TLS only, with a certificate for "localhost" (no IP address),
    and requires a client certificate from the same authority."""
    certs = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=certs)  # fmt: skip
    server_pem = _certificate(certs, "server", "ca", "subjectAltName=DNS:localhost")
    client_pem = _certificate(certs, "client", "ca", "extendedKeyUsage=clientAuth")
    tls = ["--tlsMode", "requireTLS", "--tlsCertificateKeyFile", str(server_pem)]
    tls += ["--tlsCAFile", str(certs / "ca.pem")]  # and so a client certificate is required
    server = mongo_server(free_port(), tmp_path_factory.mktemp("tls-mongo"), extra=tls)
    server.start(timeout=60)
    try:
        yield TlsMongo(server, certs / "ca.pem", certs / "other-ca.pem", client_pem)
    finally:
        server.stop()


def _tls_url(tls: TlsMongo, *, client_cert: bool = True, **options: str) -> str:
    query = {"tls": "true", "tlsCAFile": str(tls.ca)}
    if client_cert:
        query["tlsCertificateKeyFile"] = str(tls.client)
    query.update(options)
    return f"mongodb://localhost:{tls.server.port}/chat?{urllib.parse.urlencode(query)}"


async def test_tls_as_pymongo_connects(tls_mongo: TlsMongo) -> None:
    url = _tls_url(tls_mongo)
    assert unsupported(url) is None
    async with _stores(url, "chat") as (plain, lean, wire):
        await lean.insert_messages(_docs("tls", 1, 2))
        assert [d["seq"] for d in await lean.history("tls", limit=10)] == [1, 2]
        assert len(await plain.history("tls", limit=10)) == 2
        [conn] = wire._idle
        transport = conn._protocol.transport
        assert transport is not None and transport.get_extra_info("ssl_object") is not None


async def _open(url: str, address: tuple[str, int]) -> WireConnection:
    options = parse_uri(url, warn=True)["options"]
    return await WireConnection.open(
        address, connect_timeout=5, timeout=5, tls=tls_context(options)
    )


async def test_tls_checks_the_certificate_and_its_names(tls_mongo: TlsMongo) -> None:
    port = tls_mongo.server.port
    # The certificate names "localhost", not 127.0.0.1, and PyMongo's client would refuse.
    with pytest.raises(AutoReconnect, match=r"IP address mismatch|certificate verify failed"):
        await _open(_tls_url(tls_mongo), (LOOPBACK, port))
    conn = await _open(_tls_url(tls_mongo, tlsAllowInvalidHostnames="true"), (LOOPBACK, port))
    conn.close()
    with pytest.raises(AutoReconnect, match="certificate verify failed"):
        await _open(_tls_url(tls_mongo, tlsCAFile=str(tls_mongo.other_ca)), ("localhost", port))
    # Without a client certificate the server ends the connection.
    with pytest.raises(AutoReconnect):
        await _open(_tls_url(tls_mongo, client_cert=False), ("localhost", port))


# -- failures ---------------------------------------------------------------------


@pytest.fixture
async def relay(servers: Servers) -> AsyncIterator[Relay]:
    started = Relay(servers.mongo.port)
    await started.start()
    try:
        yield started
    finally:
        await started.close()


async def test_a_cut_connection_fails_what_is_in_flight_and_is_opened_again(
    settings: Settings, cleanup: None, relay: Relay
) -> None:
    url = relay.url(settings.mongo_database)
    async with _stores(url, settings.mongo_database) as (plain, lean, _):
        await lean.insert_messages(_docs("c", 1, 1))
        pending = await relay.stall(lean.insert_messages(_docs("c", 2, 1)))
        relay.cut()
        with pytest.raises(AutoReconnect):
            await pending
        relay.flowing.set()
        # The next call opens a new connection (PyMongo's client names the server).
        await lean.insert_messages(_docs("c", 3, 1))
        assert [d["seq"] for d in await plain.history("c", limit=10)] in ([1, 3], [1, 2, 3])


async def test_a_server_that_stops_answering_times_out(
    settings: Settings, cleanup: None, relay: Relay
) -> None:
    url = relay.url(settings.mongo_database, "socketTimeoutMS=300")
    async with _stores(url, settings.mongo_database) as (_, lean, wire):
        await lean.insert_messages(_docs("c", 1, 1))
        relay.flowing.clear()
        started = time.monotonic()
        with pytest.raises(NetworkTimeout):
            await lean.history("c", limit=10)
        assert time.monotonic() - started < 5
        relay.flowing.set()
        # As PyMongo does, a connection that timed out is closed; the next call opens one.
        assert [d["seq"] for d in await lean.history("c", limit=10)] == [1]
        assert wire.connections == 1


async def test_concurrent_calls_get_connections_of_their_own_up_to_the_pool_size(
    settings: Settings, cleanup: None, relay: Relay
) -> None:
    url = relay.url(settings.mongo_database, "maxPoolSize=2")
    async with _stores(url, settings.mongo_database) as (_, lean, wire):
        await lean.insert_messages(_docs("c", 1, 3))
        assert wire.connections == 1
        relay.flowing.clear()
        reads = [asyncio.create_task(lean.history("c", limit=n)) for n in (1, 2, 3, 4)]
        await asyncio.sleep(0.3)
        assert wire.connections == 2  # two wait for a free connection
        relay.flowing.set()
        pages = await asyncio.gather(*reads)
        assert [len(p) for p in pages] == [1, 2, 3, 3]
        assert wire.connections == 2


async def test_a_timed_out_call_closes_its_own_connection_only(
    settings: Settings, cleanup: None
) -> None:
    url = with_query(settings.mongo_url, "socketTimeoutMS=500")
    async with _stores(url, settings.mongo_database) as (_, lean, wire):
        await lean.insert_messages(_docs("c", 1, 1))
        await asyncio.gather(lean.history("c", limit=1), lean.history("c", limit=1))
        assert wire.connections == 2  # both idle now
        # One slow query (the server sleeps in it) outlasts socketTimeoutMS.
        slow = {"chat_id": "c", "$where": "sleep(2000) || true"}
        with pytest.raises(NetworkTimeout):
            await wire.find("messages", slow, sort={"seq": 1}, limit=1)
        assert wire.connections == 1  # the other stays open (PyMongo keeps its pool too)
        assert [d["seq"] for d in await lean.history("c", limit=1)] == [1]
        assert wire.connections == 1


async def test_a_connection_lost_while_idle_is_forgotten(
    settings: Settings, cleanup: None, relay: Relay
) -> None:
    url = relay.url(settings.mongo_database)
    async with _stores(url, settings.mongo_database) as (_, lean, wire):
        await lean.insert_messages(_docs("c", 1, 1))
        relay.cut()  # while the connection sits idle in the pool
        await asyncio.sleep(0.2)
        await lean.insert_messages(_docs("c", 2, 1))
        assert wire.connections == 1  # the new one; the dead one is not counted or kept


async def test_a_call_cancelled_before_its_reply_closes_its_connection(
    settings: Settings, cleanup: None, relay: Relay
) -> None:
    url = relay.url(settings.mongo_database)
    async with _stores(url, settings.mongo_database) as (plain, lean, wire):
        await lean.insert_messages(_docs("c", 1, 1))
        pending = await relay.stall(lean.history("c", limit=1))
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        # Reused, the connection would make the next call wait behind the old reply.
        assert wire.connections == 0
        relay.flowing.set()
        await lean.insert_messages(_docs("c", 2, 1))
        assert [d["seq"] for d in await plain.history("c", limit=10)] == [1, 2]
        assert wire.connections == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"code": 10107, "errmsg": "not primary"}, True),
        ({"code": 10058, "errmsg": "not master"}, True),  # LegacyNotPrimary
        ({"code": 91, "errmsg": "shutting down"}, True),
        ({"errmsg": "not master and secondaryOk=false"}, True),  # no code: by the words
        ({"errmsg": "node is recovering"}, True),
        ({"code": 11000, "errmsg": "E11000 duplicate key: not master"}, False),  # code wins
        ({"code": 64, "errmsg": "waiting for replication timed out"}, False),
        ({"errmsg": "command failed"}, False),
    ],
)
def test_not_primary_is_read_as_pymongo_reads_it(error: Doc, expected: bool) -> None:
    assert not_primary(error) is expected


@pytest.fixture(scope="module")
def replica_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A one-member replica set, so a real primary can step down."""
    server = mongo_server(
        free_port(), tmp_path_factory.mktemp("rs-mongo"), extra=["--replSet", "rs0"]
    ).start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


async def test_a_primary_that_steps_down_is_not_primary_and_then_found_again(
    replica_set: LocalServer,
) -> None:
    port = replica_set.port
    direct: AsyncMongoClient[Doc] = AsyncMongoClient(
        f"mongodb://{LOOPBACK}:{port}/?directConnection=true", serverSelectionTimeoutMS=20000
    )
    try:
        with contextlib.suppress(OperationFailure):  # already initiated (module fixture)
            await direct.admin.command(
                "replSetInitiate",
                {"_id": "rs0", "members": [{"_id": 0, "host": f"{LOOPBACK}:{port}"}]},
            )
        url = f"mongodb://{LOOPBACK}:{port}/chat?replicaSet=rs0&serverSelectionTimeoutMS=30000"
        async with _stores(url, "chat") as (plain, lean, wire):
            await lean.insert_messages(_docs("rs", 1, 1))
            # Force: a lone member has no secondary to catch up; it may stand again at once.
            with contextlib.suppress(AutoReconnect):
                await direct.admin.command("replSetStepDown", 1, force=True)
            with pytest.raises(NotPrimaryError):
                await lean.insert_messages(_docs("rs", 2, 1))
            # PyMongo's topology waits for the member to be elected again.
            deadline = time.monotonic() + 30
            while True:
                try:
                    await lean.insert_messages(_docs("rs", 3, 1))
                    break
                except AutoReconnect:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            assert [d["seq"] for d in await plain.history("rs", limit=10)] == [1, 3]
            assert wire.connections >= 1
    finally:
        await direct.close()


# -- which URLs it serves ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mongodb://127.0.0.1:27017/chat", None),
        ("mongodb://u:p@h1,h2/chat?replicaSet=rs&w=majority&journal=true", None),
        ("mongodb://u:p@h/chat?authMechanism=SCRAM-SHA-1&authSource=admin", None),
        ("mongodb://h/chat?readPreference=primary&appname=x&socketTimeoutMS=5", None),
        ("mongodb://h/chat?compressors=zlib", "wire compression"),
        ("mongodb://h/chat?tls=false&ssl=false", None),
        ("mongodb://h/chat?tls=true&tlsAllowInvalidHostnames=true", None),
        ("mongodb+srv://u:p@cluster.example.com/chat", "mongodb+srv"),
        ("mongodb://h/chat?loadBalanced=true", "load-balanced mode"),
        ("mongodb://h/chat?readPreference=secondaryPreferred", "read preference"),
        ("mongodb://h/chat?readConcernLevel=majority", "a read concern"),
        ("mongodb://h/chat?authMechanism=MONGODB-X509", "authentication mechanism"),
        ("mongodb://mongos1,mongos2/chat", "several hosts without replicaSet="),
        ("mongodb://h1:27017,h2:27017/chat?replicaSet=rs0", None),
    ],
)
def test_which_urls_it_serves(url: str, reason: str | None) -> None:
    found = unsupported(url)
    if reason is None:
        assert found is None
    else:
        assert found is not None and found.startswith(reason)


@pytest.mark.parametrize(
    ("url", "enabled", "lean"),
    [
        ("mongodb://127.0.0.1:27017/chat", True, True),
        ("mongodb://127.0.0.1:27017/chat", False, False),
        ("mongodb://127.0.0.1:27017/chat?compressors=zlib", True, False),
    ],
)
async def test_the_worker_takes_the_lean_path_only_where_it_may(
    url: str, enabled: bool, lean: bool, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(mongo_url=url, mongo_wire=enabled)
    client = create_client(url)
    try:
        with caplog.at_level(logging.INFO, logger="shared.mongo"):
            wire = wire_client(client, settings)
        assert (wire is not None) == lean
        assert ("lean MongoDB connection" in caplog.text) == lean
    finally:
        await client.close()


async def test_the_server_sees_the_lean_connections_by_name(
    settings: Settings, cleanup: None
) -> None:
    async with _stores(settings.mongo_url, settings.mongo_database) as (plain, lean, _):
        await lean.history("c", limit=1)
        ops = await plain.db.client.admin.aggregate(
            [
                {"$currentOp": {"allUsers": True, "idleConnections": True}},
                {"$match": {"clientMetadata.driver.name": "chat-worker-wire"}},
            ]
        )
        mine = await ops.to_list()
        assert mine, "no lean connection in currentOp"
        assert {op.get("appName") for op in mine} == {"chat-worker"}


async def test_sockets_are_set_up_as_pymongo_sets_them_up(
    settings: Settings, cleanup: None
) -> None:
    async with _stores(settings.mongo_url, settings.mongo_database) as (_, lean, wire):
        await lean.history("c", limit=1)
        [conn] = wire._idle
        transport = conn._protocol.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 120
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 9
