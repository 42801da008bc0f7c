"""Property-based fuzzing (Hypothesis) of the request parser and of a live gateway.

The parser must turn any bytes into either a request that can be forwarded as it is, or
an error reply that is a short sentence; a live gateway must answer every random frame
exactly once, keep the socket open, keep serving normal clients, and hold no per-request
state afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import HUB
from gateway.subscriber import UNSUBSCRIBE_LINGER
from shared import protocol
from shared.codec import StreamEntry, encode_stream_entry
from tests.support import Seeder, Stack
from tests.test_security import OP_BINARY, OP_TEXT, RawSocket, app_of, rss_bytes, until

LIMITS = protocol.Limits(max_text_length=200)
FIELDS = ("chat_id", "token", "event_type", "message", "request_id")
MESSAGE_FIELDS = ("type", "text", "file_url", "client_msg_id", "limit", "before_id", "after_id")

# JSON values, including the awkward ones: big and negative integers, floats, unicode
# with NUL and surrogate-free astral characters, nesting.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=80),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=12), inner, max_size=5),
    ),
    max_leaves=20,
)


def request_like(tokens: list[str], chats: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Envelopes that are nearly right: real field names, sometimes real values."""
    message = st.one_of(
        json_values,
        st.fixed_dictionaries(
            {},
            optional={
                name: st.one_of(
                    json_values,
                    st.sampled_from(["text", "image", "file", "/a.png", "javascript:x", "12"]),
                )
                for name in MESSAGE_FIELDS
            },
        ),
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "chat_id": st.one_of(st.sampled_from(chats), json_values),
            "token": st.one_of(st.sampled_from(tokens), json_values),
            "event_type": st.one_of(st.sampled_from(sorted(protocol.EVENTS)), json_values),
            "message": message,
            "request_id": json_values,
            "extra": json_values,
        },
    )


def well_typed(tokens: list[str], chats: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Requests with the right shapes and random contents: most reach the worker."""
    text = st.text(min_size=1, max_size=250)
    url = st.one_of(st.sampled_from(["/a.png", "/static_media/doc.xml"]), text)
    ids = st.one_of(st.integers(min_value=0, max_value=2**63), st.text(max_size=20))
    send_text = st.fixed_dictionaries(
        {"type": st.just("text"), "text": text}, optional={"client_msg_id": st.text(max_size=70)}
    )
    send_file = st.fixed_dictionaries(
        {"type": st.sampled_from(["image", "file"]), "file_url": url},
        optional={"text": st.one_of(st.none(), text)},
    )
    query = st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {}, optional={"limit": st.integers(0, 300), "before_id": ids, "after_id": ids}
        ),
    )
    event_and_message = st.one_of(
        st.tuples(st.just(protocol.SEND_MESSAGE), send_text),
        st.tuples(st.just(protocol.SEND_FILE), send_file),
        st.tuples(st.just(protocol.GET_HISTORY), query),
        st.tuples(st.sampled_from(sorted(protocol.EVENTS)), st.one_of(send_text, send_file, query)),
    )
    # The real chat and token most of the time, so that sends are stored and pushed.
    chat_ids = st.one_of(st.sampled_from(chats), st.text(max_size=70), ids)
    return st.builds(
        lambda chat, token, pair, extra: {
            "chat_id": chat, "token": token, "event_type": pair[0], "message": pair[1], **extra
        },
        chat_ids,
        st.sampled_from(tokens),
        event_and_message,
        st.fixed_dictionaries({}, optional={"request_id": st.text(max_size=70)}),
    )  # fmt: skip


def frames(tokens: list[str], chats: list[str]) -> st.SearchStrategy[tuple[int, bytes]]:
    """One client frame: (opcode, payload)."""
    payload = st.one_of(
        st.binary(max_size=300),  # mostly invalid JSON, often invalid UTF-8
        st.text(max_size=300).map(str.encode),
        json_values.map(orjson.dumps),
        request_like(tokens, chats).map(orjson.dumps),
        well_typed(tokens, chats).map(orjson.dumps),
        well_typed(tokens, chats).map(orjson.dumps),  # twice as likely: the worker's paths
    )
    opcode = st.sampled_from([OP_TEXT] * 9 + [OP_BINARY])
    return st.tuples(opcode, payload)


def check_outcome(data: bytes) -> protocol.Request | protocol.ProtocolError:
    """Parse ``data``; assert the result is forwardable or a well-formed error."""
    try:
        request = protocol.parse_request(data, LIMITS)
    except protocol.ProtocolError as exc:
        reply = orjson.loads(exc.to_frame())
        assert reply["type"] in protocol.REPLY_TYPES and reply["messages"] is None
        assert isinstance(reply["detail"], str) and 0 < len(reply["detail"]) <= 200
        assert "Traceback" not in reply["detail"]
        return exc
    assert request.event_type in protocol.EVENTS
    assert 0 < len(request.chat_id) <= protocol.MAX_ID_LENGTH and request.chat_id.isprintable()
    assert 0 < len(request.token) <= protocol.MAX_TOKEN_LENGTH and "\x00" not in request.token
    message = request.message
    if request.event_type in protocol.SEND_EVENTS:
        assert message is not None
        assert set(message) <= {"type", "text", "file_url", "client_msg_id"}
        text = message["text"]
        assert text is None or (0 < len(text) <= LIMITS.max_text_length and "\x00" not in text)
        if message["type"] == protocol.TEXT:
            assert text is not None and text.strip()
        else:
            assert protocol.check_media_url(message["file_url"], LIMITS.file_url_prefixes) is None
    elif message is not None:
        assert set(message) <= {"limit", "before_id", "after_id"}
        assert all(type(v) is int and 0 <= v <= protocol.MAX_SEQ for v in message.values())
    # Whatever was accepted can be forwarded as it is.
    encode_stream_entry(
        StreamEntry("n", 1, 1, request.request_id, request.chat_id, "d", request.event_type,
                    message, 0.0)
    )  # fmt: skip
    return request


def gateway_objects() -> Counter[str]:
    """Live objects of the gateway's own types and of asyncio's per-request kinds."""
    kinds: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        module = kind.__dict__.get("__module__")  # metaclass instances have odd ones
        if not isinstance(module, str):
            continue
        if isinstance(obj, asyncio.Handle) and obj.cancelled():
            continue  # cancelled timers wait in the loop's heap until their time comes
        if module.startswith(("gateway.", "shared.", "aiohttp.")) or kind in ASYNC_KINDS:
            kinds[f"{module}.{kind.__qualname__}"] += 1
    return kinds


ASYNC_KINDS = (asyncio.Task, asyncio.Future, asyncio.TimerHandle, asyncio.Handle)


@given(st.binary(max_size=1000))
def test_parser_on_random_bytes(data: bytes) -> None:
    check_outcome(data)


@given(json_values)
def test_parser_on_random_json(value: Any) -> None:
    check_outcome(orjson.dumps(value))


@given(request_like(["t" * 32, "", "\x00"], ["1", "c1", "x" * 65]))
def test_parser_on_near_requests(body: dict[str, Any]) -> None:
    outcome = check_outcome(orjson.dumps(body))
    if isinstance(outcome, protocol.ProtocolError) and isinstance(body.get("request_id"), str):
        # An error reply carries the request_id whenever the id itself was valid.
        if protocol.normalise_id(body["request_id"]) == body["request_id"] and isinstance(
            body.get("event_type"), str
        ):
            assert outcome.request_id == body["request_id"]


@given(st.text(max_size=300))
def test_media_url_check_never_admits_a_scheme_or_another_host(url: str) -> None:
    prefixes = protocol.normalise_url_prefixes(["/", "https://cdn.example.com"])
    if protocol.check_media_url(url, prefixes) is None:
        assert (url.startswith("/") and not url.startswith("//")) or url.lower().startswith(
            "https://cdn.example.com/"
        )
        assert "\\" not in url and url.isprintable()


async def test_live_gateway_survives_random_frames(
    stack: Stack, seed: Seeder, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat = await seed.chat(alice, bob)
    await stack.worker()
    # No rate limit (it would close the fuzzer), and a request timeout far above any
    # reply time on a loaded machine: a timed-out send's message still gets stored, and
    # this test counts exactly one reply per frame.
    url = await stack.gateway(rate_limit_per_second=0, max_text_length=200, request_timeout=30.0)
    observer = await stack.client(url, b_token)
    await observer.join(chat)
    fuzz = await RawSocket.connect(url)
    try:
        await fuzz_live(stack, url, fuzz, observer, chat, a_token, capsys)
    finally:
        fuzz.close()  # before the stack stops: a socket left open holds up its shutdown


async def fuzz_live(
    stack: Stack,
    url: str,
    fuzz: RawSocket,
    observer: Any,
    chat: str,
    a_token: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The body of :func:`test_live_gateway_survives_random_frames`."""
    hub = app_of(stack, url)[HUB]
    loop = asyncio.get_running_loop()
    counts: dict[str, Any] = {"frames": 0, "types": {}}
    stored: set[str] = set()  # ids of stored messages (a retried client_msg_id adds none)

    async def exchange(batch: list[tuple[int, bytes]]) -> None:
        for opcode, payload in batch:
            await fuzz.send(payload, opcode)
        for _ in batch:
            reply = await fuzz.reply()
            kind = reply["type"]
            assert kind in protocol.REPLY_TYPES, reply
            assert reply["messages"] is None or isinstance(reply["messages"], list)
            assert reply["detail"] is None or "Traceback" not in reply["detail"]
            counts["types"][kind] = counts["types"].get(kind, 0) + 1
            if kind == "success" and reply["event_type"] in protocol.SEND_EVENTS:
                stored.add(reply["messages"][0]["id"])
        counts["frames"] += len(batch)

    tokens = [a_token, a_token, a_token, "f" * 32, ""]
    chats = [chat, chat, chat, "c999", "0"]

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(frames(tokens, chats), min_size=10, max_size=30))
    def fuzz_batches(batch: list[tuple[int, bytes]]) -> None:
        # Hypothesis runs in a worker thread; the gateway keeps running on the loop.
        asyncio.run_coroutine_threadsafe(exchange(batch), loop).result(timeout=60)

    channels_before = hub.subscriber.chat_channels
    objects_before = gateway_objects()
    # Two runs: Hypothesis itself grows the process by some 30 MB the first time it
    # generates these strategies, and hardly at all after; so the process's growth is
    # measured over the second run only.
    await asyncio.to_thread(fuzz_batches)
    gc.collect()
    first_run = counts["frames"]
    rss_before = rss_bytes()
    await asyncio.to_thread(fuzz_batches)
    gc.collect()
    rss_after = rss_bytes()
    # Every frame got exactly one reply, and nothing else arrived.
    extra = None
    with contextlib.suppress(TimeoutError):
        extra = await fuzz.frame(timeout=0.3)
    assert extra is None, (extra, counts)
    assert counts["frames"] >= 2000
    # The observer got a push for every message the fuzzer stored, once, in order.
    pushed = [await observer.push() for _ in stored]
    ids = [p["messages"][0]["id"] for p in pushed]
    assert ids == sorted(stored, key=int)
    await observer.no_push(0.3)
    # No per-request state is left behind: in-flight requests, channel references.
    await until(lambda: not hub.pending, "no request in flight")
    assert len(hub.connections) == 2
    assert hub.subscriber.chat_channels <= channels_before + 1  # the fuzzer may have joined
    assert set(hub.chats) <= {chat}
    # The fuzzed socket and a brand-new client are served normally.
    await fuzz.send(orjson.dumps({"chat_id": chat, "token": a_token, "event_type": "get_history"}))
    assert (await fuzz.reply())["type"] == "success"
    fresh = await stack.client(url, a_token)
    sent = await fresh.send_text(chat, "normal service")
    assert sent["type"] == "success"
    assert (await observer.push())["messages"][0]["text"] == "normal service"
    await asyncio.sleep(UNSUBSCRIBE_LINGER + 0.5)  # let lingering channels go
    await fresh.close()
    await until(lambda: len(hub.connections) == 2, "fresh client gone")
    gc.collect()
    objects_after = gateway_objects()
    grown = {
        kind: objects_after[kind] - objects_before.get(kind, 0)
        for kind in objects_after
        if objects_after[kind] > objects_before.get(kind, 0)
    }
    growth = rss_after - rss_before
    second_run = counts["frames"] - first_run
    with capsys.disabled():
        print(
            f"\nfuzz: {counts['frames']} frames, replies by type {counts['types']}, "
            f"{len(stored)} stored; gateway objects grown {grown or 'none'}; "
            f"process RSS over the second run ({second_run} frames) "
            f"{rss_before / 1e6:.1f} MB -> {rss_after / 1e6:.1f} MB"
        )
    # Per-request state (pending requests, tasks, futures, timers, messages, frames held
    # for sockets) would grow with the number of frames; a few objects may not.
    assert sum(grown.values()) <= 50, grown
    # Nothing waits in any socket's queue or transport buffer once the clients are idle.
    assert all(
        c.queued == (0, 0) and (c.transport is None or c.transport.get_write_buffer_size() == 0)
        for c in hub.connections.values()
    )
    # The whole process (gateway, worker, clients, Hypothesis) is measured by RSS, which
    # moves in steps of allocator arenas: a guard against gross leaks only. Small ones
    # are caught by the object counts above.
    assert growth < 32 * 1024 * 1024, (growth, second_run)
