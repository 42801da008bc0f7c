"""End to end on real Redis and MongoDB: the seed protocol, errors, history, fan-out."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

import worker.consumer
from shared import protocol
from shared.codec import StreamEntry, token_digest
from shared.config import Settings
from shared.keys import Keys, partition_of
from tests.conftest import Servers
from tests.support import ROOT, Seeder, Stack, alice_and_bob

SEED_TOKEN = "b58f7d184743106a8a66028b7a28937c"
SEED_DOC = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "seed" / "000_b59bcf65193a2fc4.txt"
)
MESSAGE_FIELDS = {
    "id", "chat_id", "user_id", "username", "avatar", "created_at", "type", "text", "file_url", "is_my",
}  # fmt: skip


async def seed_ivan(seed: Seeder) -> None:
    """The seed document's world: user 2 "Ivan Petrov" with its token, in chat 1."""
    await seed.store.users.insert_one(
        {"_id": "2", "username": "Ivan Petrov", "avatar": "/static_media/media/ivan_petrov.img"}
    )
    await seed.store.tokens.insert_one({"_id": token_digest(SEED_TOKEN), "user_id": "2"})
    await seed.store.chats.insert_one({"_id": "1", "member_ids": ["2"]})


def seed_examples() -> list[tuple[dict, dict]]:
    """(request, documented reply) pairs in the seed document, in order."""
    text = SEED_DOC.read_text() if SEED_DOC.exists() else ""
    blocks = [json.loads(b.split("```", 1)[0]) for b in text.split("```json")[1:]]
    return list(zip(blocks[0::2], blocks[1::2], strict=True))


@pytest.fixture
async def one_node(stack: Stack) -> str:
    await stack.worker()
    return await stack.gateway()


async def test_seed_examples_as_is(stack: Stack, seed: Seeder, one_node: str) -> None:
    examples = seed_examples()
    if not examples:
        pytest.skip(f"seed document not found at {SEED_DOC}")
    await seed_ivan(seed)
    client = await stack.client(one_node, path="")  # seed clients connect with no path
    for request, documented in examples:
        await client.send_raw(json.dumps(request))
        reply = await client.reply()
        assert set(reply) == set(documented), (request, reply)
        assert reply["type"] == documented["type"]
        assert reply["event_type"] == documented["event_type"]
        assert reply["detail"] == documented["detail"]
        if documented["messages"] is None:
            assert reply["messages"] is None
            continue
        for message in reply["messages"]:
            assert set(message) == MESSAGE_FIELDS
            assert message["user_id"] == "2" and message["username"] == "Ivan Petrov"
            assert message["avatar"] == "/static_media/media/ivan_petrov.img"
            assert isinstance(message["created_at"], int) and message["is_my"] is True
    # The send_file example really stored its message.
    history = await client.request("get_history", "1", token=SEED_TOKEN, plain=True)
    stored = history["messages"][-1]
    assert stored["type"] == "file" and stored["file_url"] == "/static_media/media/doc.xml"
    assert stored["text"] == "Hello" and stored["id"] == "1"


@pytest.mark.parametrize(
    ("frame", "reply_type", "detail_part"),
    [
        ("{not json", "bad_request", "Invalid JSON"),
        ("[1, 2]", "bad_request", "JSON object"),
        ('"text"', "bad_request", "JSON object"),
        ('{"chat_id": "1", "token": "t", "message": null}', "bad_request", "event_type"),
        ('{"chat_id": "1", "token": "t", "event_type": 5}', "bad_request", "event_type"),
        ('{"token": "t", "event_type": "get_history"}', "bad_request", "chat_id"),
        ('{"chat_id": [1], "token": "t", "event_type": "get_history"}', "bad_request", "chat_id"),
        ('{"chat_id": "1", "token": 7, "event_type": "get_history"}', "bad_request", "token"),
        ('{"chat_id": "1", "token": "t", "event_type": "send_message", "message": null}', "bad_request", "message"),
        ('{"chat_id": "1", "token": "t", "event_type": "send_message", "message": {"type": "text", "text": ""}}', "bad_request", "empty"),
        ('{"chat_id": "1", "token": "t", "event_type": "send_message", "message": {"type": "text", "text": 5}}', "bad_request", "text"),
        ('{"chat_id": "1", "token": "t", "event_type": "send_message", "message": {"type": "video", "text": "x"}}', "bad_request", "Unknown message type"),
        ('{"chat_id": "1", "token": "t", "event_type": "send_file", "message": {"type": "file", "text": "x"}}', "bad_request", "file_url"),
        ('{"chat_id": "1", "token": "t", "event_type": "send_file", "message": {"type": "gif", "file_url": "/a"}}', "bad_request", "Unknown message type"),
        ('{"chat_id": "1", "token": "t", "event_type": "get_history", "message": {"limit": 0}}', "bad_request", "limit"),
        ('{"chat_id": "1", "token": "t", "event_type": "get_history", "message": {"limit": 201}}', "bad_request", "limit"),
        ('{"chat_id": "1", "token": "t", "event_type": "get_history", "message": {"before_id": "x"}}', "bad_request", "before_id"),
        ('{"chat_id": "1", "token": "", "event_type": "get_history", "message": null}', "token_validation_error", "Token"),
        ('{"chat_id": "1", "event_type": "get_history", "message": null}', "token_validation_error", "Token"),
        ('{"chat_id": "1", "token": "t", "event_type": "delete_chat", "message": null}', "event_not_found", "Event delete_chat not found"),
    ],
)  # fmt: skip
async def test_gateway_rejects_bad_requests(
    stack: Stack, one_node: str, frame: str, reply_type: str, detail_part: str
) -> None:
    client = await stack.client(one_node)
    await client.send_raw(frame)
    reply = await client.reply()
    assert reply["type"] == reply_type, reply
    assert detail_part in reply["detail"]
    assert reply["messages"] is None
    # The socket stays open and still works.
    await client.send_raw('{"chat_id": "1", "token": "", "event_type": "get_history"}')
    assert (await client.reply())["type"] == "token_validation_error"


async def test_errors_decided_by_worker(stack: Stack, seed: Seeder, one_node: str) -> None:
    alice, token = await seed.user("Alice")
    bob, bob_token = await seed.user("Bob")
    chat = await seed.chat(alice)
    client = await stack.client(one_node, token)
    wrong = await client.request("get_history", chat, token="0" * 32)
    assert wrong["type"] == "token_validation_error" and wrong["messages"] is None
    missing = await client.request("send_message", "no-such-chat", {"type": "text", "text": "hi"})
    assert missing["type"] == "chat_not_exists"
    # A non-member gets exactly the same answer as for a chat that does not exist.
    outsider = await client.request("get_history", chat, token=bob_token)
    assert {k: v for k, v in outsider.items() if k != "request_id"} == {
        k: v for k, v in missing.items() if k != "request_id"
    } | {"event_type": "get_history"}
    ok = await client.request("get_history", chat)
    assert ok["type"] == "success" and ok["messages"] == [] and ok["detail"] is None
    assert bob  # created only to be an outsider


async def test_each_unanswered_request_times_out_at_its_own_deadline(
    stack: Stack, seed: Seeder
) -> None:
    """With no worker running, each request is answered server_error once its own
    REQUEST_TIMEOUT_SECONDS have passed: not sooner, not together with a later one, and
    in the order they were sent (the gateway keeps one timer for the oldest deadline)."""
    user, token = await seed.user("Alice")
    chat = await seed.chat(user)
    timeout = 1.0
    url = await stack.gateway(request_timeout=timeout)  # no worker: nothing is answered
    client = await stack.client(url, token)
    loop = asyncio.get_running_loop()
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    order: list[str] = []

    async def collect() -> None:
        for _ in range(3):
            reply = await client.reply(timeout=10 * timeout)
            assert reply["type"] == "server_error", reply
            assert reply["detail"] == protocol.DETAIL_TIMEOUT
            answered[reply["request_id"]] = loop.time()
            order.append(reply["request_id"])

    collector = asyncio.create_task(collect())
    for n, event in enumerate(("send_message", "get_history", "send_message")):
        request_id = f"late-{n}"
        message = {"type": "text", "text": "hi"} if event == "send_message" else None
        body = {"chat_id": chat, "token": token, "event_type": event, "message": message}
        sent[request_id] = loop.time()
        await client.ws.send_str(orjson.dumps(body | {"request_id": request_id}).decode())
        await asyncio.sleep(0.45 * timeout)
    await collector
    assert order == ["late-0", "late-1", "late-2"]
    for request_id, at in sent.items():
        assert answered[request_id] - at >= timeout - 0.01, (request_id, answered[request_id] - at)
    # Sent 0.45 s apart: answered apart too, each when its own time had come.
    assert answered["late-1"] - answered["late-0"] > 0.2 * timeout
    assert answered["late-2"] - answered["late-1"] > 0.2 * timeout


async def test_a_request_whose_time_ran_out_before_forwarding_is_not_forwarded(
    stack: Stack, seed: Seeder, settings: Settings, servers: Servers, redis: Redis
) -> None:
    """A send that waited past REQUEST_TIMEOUT_SECONDS for its chat's subscription
    (Redis stalled) is answered server_error when the wait ends and is not written to a
    stream: handled afterwards, it would be stored after its client was told it timed
    out (and to retry)."""
    user, token = await seed.user()
    chat = await seed.chat(user)
    timeout = 0.5
    url = await stack.gateway(request_timeout=timeout)  # no worker: nothing is read
    client = await stack.client(url, token)
    redis_server = servers.redis.process
    assert redis_server is not None
    redis_server.send_signal(signal.SIGSTOP)
    try:
        body = {"chat_id": chat, "token": token, "event_type": "send_message",
                "message": {"type": "text", "text": "late"}, "request_id": "late"}  # fmt: skip
        await client.ws.send_str(orjson.dumps(body).decode())
        await asyncio.sleep(3 * timeout)
    finally:
        redis_server.send_signal(signal.SIGCONT)
    reply = await client.reply()
    assert (reply["request_id"], reply["type"], reply["detail"]) == (
        "late", protocol.SERVER_ERROR, protocol.DETAIL_TIMEOUT,
    )  # fmt: skip
    stream = Keys(settings.redis_prefix).stream(partition_of(chat, settings.partitions))
    assert await redis.xlen(stream) == 0


async def test_integer_chat_id_and_request_id_echo(
    stack: Stack, seed: Seeder, one_node: str
) -> None:
    user, token = await seed.user()
    await seed.chat(user, chat_id="42")
    client = await stack.client(one_node, token)
    reply = await client.request(
        "send_message", 42, {"type": "text", "text": "hi"}, request_id="abc"
    )
    assert reply["request_id"] == "abc"
    assert reply["messages"][0]["chat_id"] == "42"
    plain = await client.request("get_history", "42", plain=True)
    assert "request_id" not in plain


async def test_send_file_and_image(stack: Stack, seed: Seeder, one_node: str) -> None:
    user, token = await seed.user("Ivan", avatar="/static_media/ivan.img")
    chat = await seed.chat(user)
    client = await stack.client(one_node, token)
    image = await client.request(
        "send_file", chat, {"type": "image", "file_url": "/media/a.png", "text": None}
    )
    assert image["type"] == "success" and image["event_type"] == "send_file"
    [stored] = image["messages"]
    assert stored["type"] == "image" and stored["text"] is None
    assert stored["file_url"] == "/media/a.png" and stored["avatar"] == "/static_media/ivan.img"
    file = await client.request(
        "send_file", chat, {"type": "file", "file_url": "/media/doc.xml", "text": "see this"}
    )
    assert file["messages"][0]["text"] == "see this"
    assert int(file["messages"][0]["id"]) == int(stored["id"]) + 1


async def test_history_order_paging_and_recovery(stack: Stack, seed: Seeder, one_node: str) -> None:
    user, token = await seed.user()
    chat = await seed.chat(user)
    client = await stack.client(one_node, token)
    for i in range(1, 121):
        reply = await client.send_text(chat, f"m{i}")
        assert reply["messages"][0]["id"] == str(i)
    latest = await client.request("get_history", chat)
    ids = [int(m["id"]) for m in latest["messages"]]
    assert ids == list(range(71, 121)), "latest page of 50, oldest first"
    page = await client.request("get_history", chat, {"before_id": "71", "limit": 30})
    assert [int(m["id"]) for m in page["messages"]] == list(range(41, 71))
    first = await client.request("get_history", chat, {"before_id": "3"})
    assert [int(m["id"]) for m in first["messages"]] == [1, 2]
    after = await client.request("get_history", chat, {"after_id": "100", "limit": 5})
    assert [int(m["id"]) for m in after["messages"]] == [101, 102, 103, 104, 105]
    rest = await client.request("get_history", chat, {"after_id": 118})
    assert [m["text"] for m in rest["messages"]] == ["m119", "m120"]
    big = await client.request("get_history", chat, {"limit": 200})
    assert len(big["messages"]) == 120
    empty = await client.request("get_history", chat, {"after_id": "120"})
    assert empty["messages"] == []


async def test_fan_out_on_one_node(stack: Stack, seed: Seeder, one_node: str) -> None:
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    carol, c_token = await seed.user("Carol")
    chat = await seed.chat(alice, bob)
    other_chat = await seed.chat(carol)
    a1 = await stack.client(one_node, a_token)
    a2 = await stack.client(one_node, a_token)
    b = await stack.client(one_node, b_token)
    c = await stack.client(one_node, c_token)
    for client in (a1, a2, b):
        await client.join(chat)
    await c.join(other_chat)
    reply = await a1.send_text(chat, "hello")
    assert reply["messages"][0]["is_my"] is True
    mine = await a2.push()
    theirs = await b.push()
    assert mine["messages"][0]["is_my"] is True and theirs["messages"][0]["is_my"] is False
    assert mine["messages"][0]["id"] == theirs["messages"][0]["id"] == reply["messages"][0]["id"]
    assert "request_id" not in mine and mine["event_type"] == "send_message"
    await a1.no_push()
    await c.no_push(0.1)


@pytest.mark.parametrize("gateway", ["this_release", "without_age", "previous_release"])
async def test_a_sends_reply_rides_on_its_push_unless_the_gateway_predates_it(
    stack: Stack,
    seed: Seeder,
    settings: Settings,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    gateway: str,
) -> None:
    """A stored send's reply comes from its push (one PUBLISH, nothing on the node
    channel) when the gateway asks for it. Stream entries without the ask, as a gateway
    of the previous release writes them, get their reply on the node channel as before.
    A gateway that asks for the reply but not for its grant's age (the release before
    the age) gets the three-element origin it unpacks. Clients see the same frames
    either way, with and without a request_id."""
    carried = gateway != "previous_release"
    if gateway != "this_release":
        read = worker.consumer.decode_stream_entry

        def earlier_release(data: bytes) -> StreamEntry:
            entry = read(data)
            entry.carried_age = False
            entry.reply_on_push = carried
            return entry

        monkeypatch.setattr(worker.consumer, "decode_stream_entry", earlier_release)
    pair = await alice_and_bob(stack, seed)
    chat, a1, b = pair.chat, pair.a, pair.b
    a2 = await stack.client(pair.url, pair.a_token)
    for client in (a1, a2):
        await client.join(chat)
    keys = Keys(settings.redis_prefix)
    watch = redis.pubsub()
    await watch.psubscribe(keys.node_channel("*"), keys.chat_channel("*"))
    try:
        reply = await a1.send_text(chat, "hello", request_id="r-1")
        plain = await a1.request(
            "send_message", chat, {"type": "text", "text": "plain"}, plain=True
        )
        seen: list[str] = []
        origins: list[object] = []
        deadline = asyncio.get_running_loop().time() + 5.0
        while len(seen) < (2 if carried else 4):
            assert asyncio.get_running_loop().time() < deadline, seen
            # None for the subscription's own confirmations, which are skipped.
            message = await watch.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                seen.append(message["channel"].decode().split(":")[-2])
                if seen[-1] == "room":
                    header = message["data"].split(b"\n", 1)[0]
                    origins.append(orjson.loads(header)[4])
        assert seen == (["room"] * 2 if carried else ["node", "room"] * 2)
        # [origin_conn, reply_req, expires_at(, age)] when carried, else origin_conn.
        shapes = [len(o) if isinstance(o, list) else 0 for o in origins]
        assert shapes == [{"this_release": 4, "without_age": 3}.get(gateway, 0)] * 2
    finally:
        await watch.aclose()
    assert reply["type"] == "success" and reply["request_id"] == "r-1"
    assert reply["messages"][0]["is_my"] is True and reply["detail"] == protocol.DETAIL_SUCCESS
    assert "request_id" not in plain and plain["messages"][0]["text"] == "plain"
    assert [int(r["messages"][0]["id"]) for r in (reply, plain)] == [1, 2]
    for other, is_my in ((a2, True), (b, False)):
        pushes = [await other.push(), await other.push()]
        assert [p["messages"][0]["id"] for p in pushes] == ["1", "2"]
        assert all(p["messages"][0]["is_my"] is is_my and "request_id" not in p for p in pushes)
    await a1.no_push()
    # A retry of a stored message pushes nothing, so its reply takes the node channel.
    again = await a1.send_text(chat, "hello", request_id="r-2", client_msg_id="k")
    retry = await a1.send_text(chat, "hello", request_id="r-3", client_msg_id="k")
    assert retry["request_id"] == "r-3" and retry["messages"] == again["messages"]
    await b.push()
    await b.no_push(0.2)


async def test_revoked_token_and_removed_member(
    stack: Stack, seed: Seeder, one_node: str, settings: Settings
) -> None:
    user, token = await seed.user()
    chat = await seed.chat(user)
    client = await stack.client(one_node, token)
    assert (await client.send_text(chat, "before"))["type"] == "success"
    await seed.store.tokens.delete_one({"_id": token_digest(token)})
    await asyncio.sleep(settings.auth_cache_ttl + 0.2)
    assert (await client.send_text(chat, "after"))["type"] == "token_validation_error"
    _, second = await seed.user()
    await seed.store.tokens.update_one({"_id": token_digest(second)}, {"$set": {"user_id": user}})
    assert (await client.send_text(chat, "new token", token=second))["type"] == "success"
    await seed.store.chats.update_one({"_id": chat}, {"$pull": {"member_ids": user}})
    await asyncio.sleep(settings.auth_cache_ttl + 0.2)
    assert (await client.send_text(chat, "gone", token=second))["type"] == "chat_not_exists"


async def test_retry_that_authorises_again_pushes_only_what_follows(
    stack: Stack, seed: Seeder, one_node: str
) -> None:
    """A socket whose grant ended and that retries an old send (same ``client_msg_id``)
    is authorised again from the chat's head: messages it had before are not pushed again."""
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat = await seed.chat(alice, bob)
    a = await stack.client(one_node, a_token)
    b = await stack.client(one_node, b_token)
    await b.join(chat)
    first = await a.send_text(chat, "first", client_msg_id="k1")
    later = [await a.send_text(chat, f"later {i}") for i in range(3)]
    assert [int(r["messages"][0]["id"]) for r in [first, *later]] == [1, 2, 3, 4]
    # A refused request ends the socket's grant for the chat.
    refused = await a.request("get_history", chat, token="0" * 32)
    assert refused["type"] == "token_validation_error"
    retry = await a.send_text(chat, "first", client_msg_id="k1")
    assert retry["type"] == "success" and retry["messages"][0]["id"] == "1"
    news = await b.send_text(chat, "news")
    assert news["messages"][0]["id"] == "5"
    pushed = await a.push()
    assert pushed["messages"][0]["id"] == "5", pushed
    await a.no_push()
    assert [int(p["messages"][0]["id"]) for p in [await b.push() for _ in range(4)]] == [1, 2, 3, 4]
    await b.no_push(0.1)


async def test_admin_cli(settings: Settings, seed: Seeder, stack: Stack, one_node: str) -> None:
    env = {
        "PYTHONPATH": str(ROOT),
        "MONGO_URL": settings.mongo_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "PATH": "/usr/bin:/bin",
    }

    def admin_sync(*args: str) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "worker.admin", *args],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return orjson.loads(result.stdout)

    async def admin(*args: str) -> dict:
        return await asyncio.to_thread(admin_sync, *args)

    ivan = await admin(
        "create-user", "--username", "Ivan Petrov", "--avatar", "/static_media/i.img"
    )
    assert len(ivan["token"]) == 32 and int(ivan["token"], 16) >= 0
    assert await seed.store.tokens.find_one({"_id": ivan["token"]}) is None, "only digests stored"
    anna = await admin("create-user", "--username", "Anna", "--user-id", "anna")
    assert anna["user_id"] == "anna"
    chat = (await admin("create-chat", "--title", "T", "--member", ivan["user_id"]))["chat_id"]
    second = await admin("issue-token", "--user-id", ivan["user_id"])
    await admin("add-member", "--chat-id", chat, "--user-id", "anna")
    ivan_ws = await stack.client(one_node, second["token"])
    anna_ws = await stack.client(one_node, anna["token"])
    await anna_ws.join(chat)
    sent = await ivan_ws.send_text(chat, "Privet")
    assert sent["messages"][0]["username"] == "Ivan Petrov"
    assert (await anna_ws.push())["messages"][0]["text"] == "Privet"
    revoked = await admin("revoke-token", "--token", second["token"])
    assert revoked == {"revoked": True, "announced": True}
    await asyncio.sleep(settings.auth_cache_ttl + 0.2)
    assert (await ivan_ws.send_text(chat, "x"))["type"] == "token_validation_error"
    failed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker.admin", "create-chat", "--member", "nobody"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert failed.returncode == 1 and "nobody" in failed.stdout


async def test_two_gateways_two_workers_as_processes(
    stack: Stack, seed: Seeder, log_dir: Path
) -> None:
    """Point 4 of the issue with real `python -m gateway` / `python -m worker` processes."""
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    eve, e_token = await seed.user("Eve")
    chats = [await seed.chat(alice, bob) for _ in range(6)]
    _, gw_a = stack.spawn("gateway", log_dir)
    _, gw_b = stack.spawn("gateway", log_dir)
    _, wk_1 = stack.spawn("worker", log_dir)
    _, wk_2 = stack.spawn("worker", log_dir)
    for url in (gw_a, gw_b, wk_1, wk_2):
        await stack.wait_ready(url)
    # Both workers share the partitions (fair share: 2 each of 4), so both handle traffic.
    owned = await wait_balanced(stack, wk_1, wk_2)
    assert sorted(len(parts) for parts in owned) == [2, 2]
    a_on_a = await stack.client(gw_a, a_token)
    a_on_b = await stack.client(gw_b, a_token)
    b_on_a = await stack.client(gw_a, b_token)
    b_on_b = await stack.client(gw_b, b_token)
    eve_on_b = await stack.client(gw_b, e_token)
    for chat in chats:
        for client in (a_on_a, a_on_b, b_on_a, b_on_b):
            await client.join(chat)
        assert (await eve_on_b.request("get_history", chat))["type"] == "chat_not_exists"
    for chat in chats:
        reply = await a_on_a.send_text(chat, f"hello {chat}")
        assert reply["type"] == "success", stack.logs()
        sent = reply["messages"][0]
        for client, is_my in ((a_on_b, True), (b_on_a, False), (b_on_b, False)):
            push = await client.push()
            got = push["messages"][0]
            assert (got["id"], got["chat_id"], got["is_my"]) == (sent["id"], chat, is_my)
    await a_on_a.no_push(0.3)
    await eve_on_b.no_push(0.1)
    assert not any("request_id" not in f for f in a_on_a.frames), "sender got one reply, no copy"
    assert eve


async def worker_partitions(stack: Stack, url: str) -> list[int]:
    async with stack.session.get(url + "readyz") as resp:
        return list((await resp.json())["partitions"])


async def wait_balanced(stack: Stack, *urls: str, timeout: float = 20.0) -> list[list[int]]:
    """Wait until together the workers hold every partition, in fair shares (no two
    differ by more than one). While a worker that just started is taking its share, every
    worker can hold some and all be held at 1 + 3 (seen once in a full run)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        owned = [await worker_partitions(stack, url) for url in urls]
        every = sorted(p for parts in owned for p in parts)
        counts = [len(parts) for parts in owned]
        if every == list(range(stack.settings.partitions)) and max(counts) - min(counts) <= 1:
            return owned
        assert asyncio.get_running_loop().time() < deadline, f"not balanced: {owned}"
        await asyncio.sleep(0.1)


async def test_replies_keep_request_order_within_a_batch(
    stack: Stack, seed: Seeder, one_node: str
) -> None:
    """Seed clients match replies by order: history reads (run concurrently by the
    worker), worker-decided errors and sends sent back to back are answered in order."""
    user, token = await seed.user()
    chat = await seed.chat(user)
    client = await stack.client(one_node, token)
    frames = []
    for n in range(30):
        kind = n % 3
        if kind == 0:
            frames.append(
                {
                    "chat_id": chat,
                    "token": token,
                    "event_type": "get_history",
                    "message": {"limit": 1},
                }
            )
        elif kind == 1:
            frames.append(
                {"chat_id": chat, "token": "f" * 32, "event_type": "get_history", "message": None}
            )
        else:
            frames.append(
                {"chat_id": chat, "token": token, "event_type": "send_message",
                 "message": {"type": "text", "text": f"m{n}"}}
            )  # fmt: skip
    for frame in frames:
        await client.send_raw(json.dumps(frame))
    replies = [await client.reply() for _ in frames]
    expected = ["success", "token_validation_error", "success"] * 10
    assert [r["type"] for r in replies] == expected
    assert [r["event_type"] for r in replies] == [f["event_type"] for f in frames]
    # Each history read sees exactly the sends before it.
    for n in range(3, 30, 3):
        assert replies[n]["messages"][-1]["text"] == f"m{n - 1}"
