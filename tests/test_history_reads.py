"""History pages a gateway reads from MongoDB itself (GATEWAY_READS_HISTORY), on real
Redis and MongoDB: which requests it serves, what its pages show, and that everything
else still goes to a worker, which decides as before."""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import pytest
from aiohttp import web

from gateway.app import DRAIN, HUB
from gateway.connection import ChatState, Connection
from gateway.hub import Hub, Pending
from shared import protocol
from shared.codec import Grant, StreamEntry, token_digest
from shared.config import Settings
from shared.metrics import GatewayMetrics
from tests.conftest import Servers
from tests.support import Client, Seeder, Stack, alice_and_bob, app_of, message_docs, sample

READS = "chat_gateway_history_reads_total"
# A gateway whose grants outlast any pause of a loaded test machine, where a test needs
# its pages read by the gateway (the tests' settings keep grants for 0.5 s).
LASTING = {"auth_cache_ttl": 30.0}


def ids(reply: dict) -> list[int]:
    return [int(m["id"]) for m in reply["messages"]]


async def ask_page_read_by_gateway(
    app: web.Application, client: Client, chat: str, rid: str
) -> None:
    """Send ``get_history`` and return once the gateway is reading it from MongoDB."""
    body = {"event_type": "get_history", "chat_id": chat, "token": client.token, "request_id": rid}
    await client.ws.send_str(orjson.dumps(body).decode())
    deadline = time.monotonic() + 5
    while not app[HUB].reading:
        assert time.monotonic() < deadline, "the page was not read by the gateway"
        await asyncio.sleep(0.005)


async def test_an_authorised_socket_gets_its_pages_from_its_gateway(
    stack: Stack, seed: Seeder
) -> None:
    """After a worker authorised the socket (its join), its pages are read by the
    gateway: the same frames a worker builds, and no request reaches the streams."""
    pair = await alice_and_bob(stack, seed, **LASTING)
    app = app_of(stack, pair.url)
    a = pair.a
    joined = await a.join(pair.chat)
    assert joined["messages"] == []
    for i in range(1, 8):
        await a.send_text(pair.chat, f"m{i}")
    assert sample(app, READS, by="worker") == 2  # the two joins
    page = await a.request("get_history", pair.chat, {"limit": 5}, request_id="h1")
    older = await a.request("get_history", pair.chat, {"before_id": "3"})
    newer = await a.request("get_history", pair.chat, {"after_id": "5"})
    assert sample(app, READS, by="gateway") == 3 and sample(app, READS, by="worker") == 2
    theirs = await pair.b.request("get_history", pair.chat, {"limit": 5})
    assert page["request_id"] == "h1" and page["type"] == "success" and page["detail"] is None
    assert ids(page) == [3, 4, 5, 6, 7] and ids(older) == [1, 2] and ids(newer) == [6, 7]
    assert all(m["is_my"] is True for m in page["messages"])
    assert all(m["is_my"] is False for m in theirs["messages"])
    # What a worker answers for the same page (a new socket is not authorised yet).
    fresh = await stack.client(pair.url, pair.a_token)
    by_worker = await fresh.request("get_history", pair.chat, {"limit": 5}, request_id="h1")
    assert sample(app, READS, by="worker") == 3 + (sample(app, READS, by="gateway") == 3)
    assert by_worker == page
    assert orjson.dumps(by_worker) == orjson.dumps(page)  # field order too


async def test_a_page_stops_at_the_last_message_pushed_to_the_socket(
    stack: Stack, seed: Seeder
) -> None:
    """A message stored but not yet pushed to the socket stays out of the pages its
    gateway reads for it, as out of a worker's page the push would have preceded."""
    pair = await alice_and_bob(stack, seed, **LASTING)
    app = app_of(stack, pair.url)
    await pair.a.send_text(pair.chat, "pushed")
    assert (await pair.b.push())["messages"][0]["id"] == "1"
    reader = await stack.client(pair.url, pair.a_token)
    assert ids(await reader.join(pair.chat)) == [1]  # a worker's page: authorised up to 1
    # As if stored by a worker whose push has not reached this gateway yet.
    await seed.store.messages.insert_many(message_docs(pair.chat, 2, 1))
    assert ids(await reader.request("get_history", pair.chat)) == [1]
    assert ids(await reader.request("get_history", pair.chat, {"after_id": "0"})) == [1]
    assert sample(app, READS, by="gateway") == 2
    fresh = await stack.client(pair.url, pair.a_token)  # a worker's page shows it
    assert ids(await fresh.request("get_history", pair.chat)) == [1, 2]


async def test_other_tokens_and_old_grants_go_to_a_worker(
    stack: Stack, seed: Seeder, settings: Settings
) -> None:
    """Only the token the worker authorised, and only within AUTH_CACHE_TTL_SECONDS of
    that: a token deleted from MongoDB is refused on a page as on a send."""
    pair = await alice_and_bob(stack, seed)
    app = app_of(stack, pair.url)
    b = pair.b
    bad = await b.request("get_history", pair.chat, token="not-a-token")
    assert bad["type"] == "token_validation_error"
    assert (await b.join(pair.chat))["type"] == "success"  # the refusal ended the grant
    _, c_token = await seed.user("Carol")
    outsider = await b.request("get_history", pair.chat, token=c_token)
    assert outsider["type"] == "chat_not_exists"
    assert sample(app, READS, by="gateway") == 0
    await b.join(pair.chat)
    assert (await b.request("get_history", pair.chat))["type"] == "success"
    assert sample(app, READS, by="gateway") == 1
    await seed.store.tokens.delete_one({"_id": token_digest(b.token or "")})
    await asyncio.sleep(settings.auth_cache_ttl + 0.2)
    gone = await b.request("get_history", pair.chat)
    assert gone["type"] == "token_validation_error"  # the worker's answer to the renewal
    assert sample(app, READS, by="gateway") == 1 and sample(app, RENEWALS) == 0


@pytest.mark.parametrize("late_grant", ["send", "page"])
async def test_a_change_made_straight_in_mongodb_reaches_the_gateways_pages_within_the_ttl(
    stack: Stack, seed: Seeder, late_grant: str
) -> None:
    """A member removed straight in MongoDB (not announced) gets no page from the
    gateway once AUTH_CACHE_TTL_SECONDS have passed since the worker read the chat, even
    after a grant the worker gave late in that window on its cached view: the gateway
    counts the window from the worker's read (the grant's age), not from the grant.
    Counted from the grant, the page below would be read by the gateway and succeed."""
    ttl = 4.0
    alice, _ = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat = await seed.chat(alice, bob)
    await stack.worker(auth_cache_ttl=ttl)
    url = await stack.gateway(auth_cache_ttl=ttl)
    app = app_of(stack, url)
    b = await stack.client(url, b_token)
    assert (await b.join(chat))["type"] == "success"  # the worker reads token and chat
    read = time.monotonic()  # they were read before this
    await seed.store.chats.update_one({"_id": chat}, {"$pull": {"member_ids": bob}})
    # Well inside the worker's cache of them, and before its refresher reads them again
    # (half a TTL before they expire).
    await asyncio.sleep(0.3 * ttl)
    asker = b
    if late_grant == "send":  # a carried reply's grant
        late = await b.send_text(chat, "allowed on the cached view")
    else:  # a worker's page: a grant on the node channel
        asker = await stack.client(url, b_token)
        late = await asker.join(chat)
    assert late["type"] == "success"
    await asyncio.sleep(max(0.0, read + ttl + 0.6 - time.monotonic()))
    refused = await asker.request("get_history", chat)
    assert refused["type"] == "chat_not_exists"
    assert sample(app, READS, by="gateway") == 0


RENEWALS = "chat_gateway_grant_renewals_total"


@pytest.mark.parametrize("worker_release", ["this", "earlier"])
async def test_a_socket_back_after_the_ttl_gets_its_page_read_here_once_a_worker_renewed_its_grant(
    stack: Stack, seed: Seeder, settings: Settings, monkeypatch: pytest.MonkeyPatch,
    worker_release: str,
) -> None:  # fmt: skip
    """A socket that asks for a page after its grant got older than the TTL (most of a
    fleet: history now and then): a worker checks its token and the chat again and
    renews the grant without reading the page; the gateway reads it, the same page a
    worker gives. A worker of an earlier release, which does not know the ask, answers
    with its own page, which goes out as before. The socket's next request waits for the
    page, so its replies keep their order."""
    if worker_release == "earlier":
        import worker.consumer

        read = worker.consumer.decode_stream_entry

        def earlier(data: bytes) -> StreamEntry:
            entry = read(data)
            entry.grant_only = False
            return entry

        monkeypatch.setattr(worker.consumer, "decode_stream_entry", earlier)
    pair = await alice_and_bob(stack, seed)
    app = app_of(stack, pair.url)
    a = pair.a
    await a.join(pair.chat)
    for i in range(1, 5):
        await a.send_text(pair.chat, f"m{i}")
    await asyncio.sleep(settings.auth_cache_ttl + 0.1)
    before = sample(app, READS, by="gateway"), sample(app, READS, by="worker")
    page = await a.request("get_history", pair.chat, {"limit": 3}, request_id="h")
    fresh = await stack.client(pair.url, pair.a_token)  # not authorised: a worker's page
    by_worker = await fresh.request("get_history", pair.chat, {"limit": 3}, request_id="h")
    assert orjson.dumps(page) == orjson.dumps(by_worker) and ids(page) == [2, 3, 4]
    if worker_release == "this":
        assert sample(app, RENEWALS) == 1
        assert sample(app, READS, by="gateway") == before[0] + 1
        assert sample(app, READS, by="worker") == before[1] + 1  # the fresh socket's join
    else:
        assert sample(app, RENEWALS) == 0
        assert sample(app, READS, by="worker") == before[1] + 2
    # The renewed grant stands: the next page is read here without a worker.
    again = await a.request("get_history", pair.chat, {"after_id": "3"})
    assert ids(again) == [4]
    assert sample(app, READS, by="gateway") == before[0] + (2 if worker_release == "this" else 1)
    # Pipelined: a page then a send, their replies in that order, the page without it.
    await asyncio.sleep(settings.auth_cache_ttl + 0.1)
    for body in (
        {"event_type": "get_history", "chat_id": pair.chat, "token": a.token},
        {"event_type": "send_message", "chat_id": pair.chat, "token": a.token,
         "message": {"type": "text", "text": "m5"}},
    ):  # fmt: skip
        await a.send_raw(orjson.dumps(body).decode())
    first, second = await a.reply(), await a.reply()
    assert first["event_type"] == "get_history" and ids(first)[-1] == 4
    assert second["event_type"] == "send_message" and second["messages"][0]["id"] == "5"


async def test_a_page_asked_while_a_send_is_in_flight_shows_the_send(
    stack: Stack, seed: Seeder
) -> None:
    """Read-your-writes: a page asked right behind a send, before its reply, goes to the
    worker behind the send, so it shows the message."""
    pair = await alice_and_bob(stack, seed, **LASTING)
    b = pair.b
    for round_ in range(5):
        send = {
            "event_type": "send_message",
            "chat_id": pair.chat,
            "token": b.token,
            "request_id": f"s{round_}",
            "message": {"type": "text", "text": f"t{round_}"},
        }
        read = {
            "event_type": "get_history",
            "chat_id": pair.chat,
            "token": b.token,
            "request_id": f"h{round_}",
        }
        await b.ws.send_str(orjson.dumps(send).decode())
        await b.ws.send_str(orjson.dumps(read).decode())
        replies = {r["request_id"]: r for r in (await b.reply(), await b.reply())}
        stored = replies[f"s{round_}"]["messages"][0]["id"]
        assert ids(replies[f"h{round_}"])[-1] == int(stored)
    # With nothing in flight, the same socket's page is read by the gateway.
    app = app_of(stack, pair.url)
    assert sample(app, READS, by="gateway") == 0
    assert ids(await b.request("get_history", pair.chat))[-1] == 5
    assert sample(app, READS, by="gateway") == 1


async def test_a_gateway_that_cannot_read_mongodb_lets_a_worker_answer(
    stack: Stack, seed: Seeder
) -> None:
    """A failed read costs the client nothing but time: the worker answers it, and the
    next pages go to the workers at once for a while."""
    user, token = await seed.user()
    chat = await seed.chat(user)
    await stack.worker()
    # Nothing listens on port 9: the gateway's reads fail, the worker's succeed.
    url = await stack.gateway(
        mongo_url="mongodb://127.0.0.1:9/nowhere?serverSelectionTimeoutMS=300", **LASTING
    )
    app = app_of(stack, url)
    client = await stack.client(url, token)
    await client.send_text(chat, "hello")
    page = await client.request("get_history", chat)
    assert ids(page) == [1] and page["type"] == "success"
    assert sample(app, "chat_gateway_history_read_errors_total") == 1
    assert ids(await client.request("get_history", chat)) == [1]
    assert sample(app, "chat_gateway_history_read_errors_total") == 1
    assert sample(app, READS, by="worker") == 2 and sample(app, READS, by="gateway") == 0


async def test_a_page_read_that_hangs_does_not_lengthen_its_request_timeout(
    stack: Stack, seed: Seeder, servers: Servers
) -> None:
    """A page whose read hangs goes to a worker with only what is left of its
    REQUEST_TIMEOUT_SECONDS: its client hears server_error when that time is up counted
    from its request, also when a request forwarded before it is due later."""
    timeout = 2.0  # the read is given min(1 s, half of it)
    pair = await alice_and_bob(stack, seed, request_timeout=timeout, **LASTING)
    app = app_of(stack, pair.url)
    loop = asyncio.get_running_loop()
    mongod = servers.mongo.process
    assert mongod is not None
    mongod.send_signal(signal.SIGSTOP)  # neither the gateway nor the worker gets an answer
    try:
        page_sent = loop.time()
        await ask_page_read_by_gateway(app, pair.b, pair.chat, "page")
        # While the read hangs, a send is forwarded: due after the page, ahead of it in
        # the gateway's queue of requests (the page is forwarded when its read gives up).
        await asyncio.sleep(0.4)
        send_sent = loop.time()
        await pair.a.ws.send_str(
            orjson.dumps(
                {"event_type": "send_message", "chat_id": pair.chat, "token": pair.a_token,
                 "message": {"type": "text", "text": "hi"}, "request_id": "send"}
            ).decode()
        )  # fmt: skip

        async def answered(client: Client) -> tuple[dict, float]:
            reply = await client.reply(timeout=3 * timeout)
            return reply, loop.time()

        (page, page_answered), (send, send_answered) = await asyncio.gather(
            answered(pair.b), answered(pair.a)
        )
    finally:
        mongod.send_signal(signal.SIGCONT)
    assert (page["request_id"], page["type"], page["detail"]) == (
        "page", protocol.SERVER_ERROR, protocol.DETAIL_TIMEOUT,
    )  # fmt: skip
    assert (send["request_id"], send["type"]) == ("send", protocol.SERVER_ERROR)
    assert sample(app, "chat_gateway_history_read_errors_total") == 1
    # Each at its own deadline: the page not half a timeout late (its read took 1 s of
    # it), nor held back until the send's deadline, 0.4 s after its own.
    assert timeout - 0.01 <= page_answered - page_sent < timeout + 0.6
    assert timeout - 0.01 <= send_answered - send_sent < timeout + 0.6
    assert send_answered - page_answered > 0.1  # 0.4 s apart, as their deadlines


async def test_a_drain_waits_for_a_page_being_read(
    stack: Stack, seed: Seeder, servers: Servers
) -> None:
    """A page the gateway is reading when it starts draining is owed like a forwarded
    request: the socket gets it before its 1001."""
    pair = await alice_and_bob(stack, seed, **LASTING)
    app = app_of(stack, pair.url)
    b = pair.b
    mongod = servers.mongo.process
    assert mongod is not None
    mongod.send_signal(signal.SIGSTOP)  # the read waits (well under its 1 s bound)
    try:
        await ask_page_read_by_gateway(app, b, pair.chat, "owed")
        drain = asyncio.create_task(app[DRAIN].run(app[HUB]))
        await asyncio.sleep(0.3)
        assert not b.closed.done(), "closed while a page was still owed"
    finally:
        mongod.send_signal(signal.SIGCONT)
    reply = await b.reply()
    assert reply["request_id"] == "owed" and reply["type"] == "success"
    await drain
    assert (await b.closed)[0] == 1001
    assert sample(app, READS, by="gateway") == 1


async def test_gateways_read_nothing_with_the_setting_off(stack: Stack, seed: Seeder) -> None:
    user, token = await seed.user()
    chat = await seed.chat(user)
    await stack.worker()
    url = await stack.gateway(gateway_reads_history=False)
    app = app_of(stack, url)
    assert app[HUB].reader is None
    client = await stack.client(url, token)
    await client.send_text(chat, "hello")
    assert ids(await client.request("get_history", chat)) == [1]
    assert sample(app, READS, by="worker") == 1 and sample(app, READS, by="gateway") == 0


# -- the decision alone (no server: a hub with nothing behind it) -------------------


class _NoSubscriber:
    chat_channels = 0

    def release(self, channel: str) -> None:
        pass


class _Socket:
    compress = False


@pytest.fixture
def hub(settings: Settings) -> Hub:
    return Hub(settings, None, GatewayMetrics(), lambda hub: _NoSubscriber(), reader=object())  # type: ignore[arg-type]


def _socket(hub: Hub) -> Connection:
    conn = Connection(
        hub.new_connection_id(), _Socket(), None, "peer", max_messages=1, max_bytes=1,  # type: ignore[arg-type]
        on_slow=lambda c: None,
    )  # fmt: skip
    conn.chats["c"] = ChatState("u", 5, token_digest("t"), None, time.monotonic())
    return conn


def _ask(token: str = "t") -> protocol.Request:
    frame = orjson.dumps({"event_type": "get_history", "chat_id": "c", "token": token})
    return protocol.parse_request(frame, protocol.Limits())


def test_the_gateway_reads_only_for_a_fresh_grant_of_the_same_token(
    hub: Hub, settings: Settings
) -> None:
    digest = token_digest("t")
    conn = _socket(hub)
    assert hub._reads_here(conn, _ask(), digest)
    assert not hub._reads_here(conn, _ask("other"), token_digest("other"))
    other_chat = protocol.parse_request(
        orjson.dumps({"event_type": "get_history", "chat_id": "d", "token": "t"}),
        protocol.Limits(),
    )
    assert not hub._reads_here(conn, other_chat, digest)
    state = conn.chats["c"]
    cases = {
        "request in flight": lambda: setattr(conn, "in_flight", 1),
        "frame held back": lambda: state.hold(7, b"{}"),
        "gap being filled": lambda: hub._fills.__setitem__("c", None),
        "grant older than the auth cache": lambda: setattr(
            state, "granted_at", time.monotonic() - settings.auth_cache_ttl - 0.01
        ),
        "token expired": lambda: setattr(state, "expires_at", time.time() - 1),
        "member removed": lambda: hub._revoked.__setitem__(("c", "u"), time.monotonic() + 60),
        "token revoked": lambda: hub._revoked.__setitem__(digest, time.monotonic() + 60),
        "reads paused after a failure": lambda: setattr(
            hub, "_reader_off_until", time.monotonic() + 60
        ),
        "too many reads at once": lambda: hub.reading.update(range(1000, 1100)),
        "no reader": lambda: setattr(hub, "reader", None),
    }
    for name, spoil in cases.items():
        conn = _socket(hub)
        state = conn.chats["c"]
        saved = (hub.reader, dict(hub._fills), dict(hub._revoked), set(hub.reading))
        hub._reader_off_until = 0.0
        assert hub._reads_here(conn, _ask(), digest), name
        assert not hub._reads_here(conn, _ask(), digest, stale=True), name
        spoil()
        assert not hub._reads_here(conn, _ask(), digest), name
        # A grant only too old is renewed by a worker for a page read here; nothing
        # else that keeps the page from this node is.
        stale = name == "grant older than the auth cache"
        assert hub._reads_here(conn, _ask(), digest, stale=True) is stale, name
        hub.reader, hub._fills, hub._revoked, hub.reading = (
            saved[0], saved[1], saved[2], saved[3],
        )  # fmt: skip


async def test_a_renewed_grant_counts_its_socket_as_read_for_until_its_page_is(
    hub: Hub, settings: Settings
) -> None:
    """The renewal's reply records the grant and marks the socket as owed a page at
    once, before the task that reads the page resumes: a drain that looks in between
    does not close the socket. A worker's page (an earlier release) is sent instead."""
    conn = _socket(hub)
    state = conn.chats["c"]
    state.granted_at = time.monotonic() - settings.auth_cache_ttl - 1
    digest = token_digest("t")
    renewed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    pending = Pending(conn, "c", "get_history", None, 0.0, digest, 0.0, renewal=renewed)
    hub._answer(pending, b"", Grant("c", "u", 5, None), None)
    assert renewed.result() is True and conn.conn_id in hub.reading
    assert hub._reads_here(conn, _ask(), digest)  # fresh again
    # A worker's own page (a worker of an earlier release) answers the request as
    # before: the socket is owed nothing more.
    other = _socket(hub)
    page: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    frame = b'{"type":"success","event_type":"get_history"}'
    answer = Pending(other, "c", "get_history", None, 0.0, digest, 0.0, renewal=page)
    hub._answer(answer, frame, Grant("c", "u", 5, None), None)
    assert page.result() is False and other.conn_id not in hub.reading
