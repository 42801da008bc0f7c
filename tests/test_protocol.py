"""Pure unit tests of the protocol and codec (no servers)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import protocol
from shared.codec import (
    Admission,
    Grant,
    Push,
    Reply,
    Revocation,
    StreamEntry,
    decode_control,
    decode_push,
    decode_reply_envelope,
    decode_stream_entry,
    encode_control,
    encode_push,
    encode_reply_envelope,
    encode_stream_entry,
    entry_payload,
    token_digest,
)
from shared.keys import Keys, partition_of

LIMITS = protocol.Limits(max_text_length=100)


def parse(body: object) -> protocol.Request:
    return protocol.parse_request(orjson.dumps(body), LIMITS)


def test_seed_send_message_parses() -> None:
    req = parse(
        {"chat_id": "1", "token": "abc", "event_type": "send_message",
         "message": {"type": "text", "text": "Hello"}}
    )  # fmt: skip
    assert req.chat_id == "1" and req.event_type == "send_message"
    assert req.message == {"type": "text", "text": "Hello", "file_url": None}


def test_integer_chat_id_is_normalised_and_bool_is_not() -> None:
    assert parse({"chat_id": 7, "token": "t", "event_type": "get_history"}).chat_id == "7"
    with pytest.raises(protocol.ProtocolError):
        parse({"chat_id": True, "token": "t", "event_type": "get_history"})


def test_unknown_fields_ignored_and_client_msg_id_kept() -> None:
    req = parse(
        {"chat_id": "1", "token": "t", "event_type": "send_file", "extra": [1],
         "message": {"type": "image", "file_url": "/a.png", "client_msg_id": "k1", "x": 1}}
    )  # fmt: skip
    assert req.message == {
        "type": "image",
        "text": None,
        "file_url": "/a.png",
        "client_msg_id": "k1",
    }


@pytest.mark.parametrize(
    "message",
    [
        {"type": "text", "text": "x" * 101},
        {"type": "text", "text": "a\x00b"},
        {"type": "text", "text": "   "},
        {"type": "text", "text": "ok", "client_msg_id": "k" * 65},
        {"type": "text", "text": "ok", "client_msg_id": 5},
    ],
)
def test_text_limits(message: dict) -> None:
    with pytest.raises(protocol.ProtocolError) as caught:
        parse({"chat_id": "1", "token": "t", "event_type": "send_message", "message": message})
    assert caught.value.reply_type == protocol.BAD_REQUEST


def test_event_not_found_matches_seed_reply() -> None:
    with pytest.raises(protocol.ProtocolError) as caught:
        parse(
            {"chat_id": "1", "token": "t", "event_type": "send_file_and_message", "message": None}
        )
    assert orjson.loads(caught.value.to_frame()) == {
        "type": "event_not_found",
        "event_type": "send_file_and_message",
        "messages": None,
        "detail": "Event send_file_and_message not found",
    }


def test_history_query_normalised() -> None:
    req = parse(
        {"chat_id": "1", "token": "t", "event_type": "get_history",
         "message": {"limit": 10, "before_id": "20", "after_id": 3}}
    )  # fmt: skip
    assert req.message == {"limit": 10, "before_id": 20, "after_id": 3}
    assert (
        parse({"chat_id": "1", "token": "t", "event_type": "get_history", "message": {}}).message
        is None
    )


@given(st.binary(max_size=300))
def test_parser_never_raises_anything_but_protocol_errors(data: bytes) -> None:
    try:
        protocol.parse_request(data, LIMITS)
    except protocol.ProtocolError as exc:
        assert exc.reply_type in protocol.REPLY_TYPES
        frame = orjson.loads(exc.to_frame())
        assert frame["messages"] is None and isinstance(frame["detail"], str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "chat_id": json_values,
            "token": json_values,
            "event_type": st.sampled_from(["get_history", "send_message", "send_file", "x"])
            | json_values,
            "message": json_values,
            "request_id": json_values,
        },
    )
)
def test_parser_on_random_envelopes(body: dict) -> None:
    try:
        # json, not orjson: it writes integers beyond 64 bits, which clients may send.
        req = protocol.parse_request(json.dumps(body), LIMITS)
    except protocol.ProtocolError:
        return
    assert req.event_type in protocol.EVENTS and isinstance(req.chat_id, str) and req.token


def test_codec_round_trips() -> None:
    entry = StreamEntry(
        "n1", 3, 9, "r", "c1", token_digest("t"), "send_message", {"text": "x"}, 1.5
    )
    assert decode_stream_entry(encode_stream_entry(entry)) == entry
    frame = protocol.encode_reply("success", "get_history", [], None)
    reply = Reply(4, 5, frame, grant=Grant("c\n1", "u", 7))
    assert decode_reply_envelope(encode_reply_envelope(reply)) == reply
    push = Push("c1", 3, "u1", "n1", 2, 1.25, b'{"a":"x\\ny"}', b'{"b":1}')
    assert decode_push(encode_push(push)) == push
    expiring = Reply(4, 6, frame, grant=Grant("c1", "u", 8, 1_900_000_000.5))
    assert decode_reply_envelope(encode_reply_envelope(expiring)) == expiring
    retry = Reply(4, 7, frame, grant=Grant("c1", "u", 9, message_id=3))
    assert decode_reply_envelope(encode_reply_envelope(retry)) == retry
    aged = Reply(4, 8, frame, grant=Grant("c1", "u", 9, 1_900_000_000.5, age=2.25))
    assert decode_reply_envelope(encode_reply_envelope(aged)) == aged
    # The age has a key of its own: the grant's list keeps the previous release's shape.
    assert orjson.loads(encode_reply_envelope(aged).split(b"\n")[0])["g"] == [
        "c1",
        "u",
        9,
        1_900_000_000.5,
    ]
    assert (Grant("c1", "u", 9, message_id=3).carries, Grant("c1", "u", 8).carries) == (3, 8)
    # A worker of the previous version sends grants without an expiry.
    old_grant = b'{"c":4,"q":5,"g":["c1","u",7]}\n' + frame
    assert decode_reply_envelope(old_grant).grant == Grant("c1", "u", 7, None)
    for control in (
        Revocation(chat_id="c1", user_ids=("u1", "u2")),
        Revocation(token_digests=(token_digest("t"),)),
        Admission(chat_id="c1", user_ids=("u1",)),
    ):
        assert decode_control(encode_control(control)) == control
    assert decode_control(b'{"k":"something-newer"}') is None
    # The wire form of a revocation is the one the previous version reads.
    assert orjson.loads(encode_control(Revocation(chat_id="c", user_ids=("u",)))) == {
        "k": "revoke",
        "ch": "c",
        "u": ["u"],
        "t": [],
    }


def test_a_push_that_carries_a_reply_still_reads_as_a_push_to_the_previous_release() -> None:
    """The reply rides in the origin_conn place of a six-field header: a gateway of the
    previous release unpacks the header as it always did, and gets the same frames."""
    carrying = Push("c1", 3, "u1", "n1", 2, 1.25, b'{"a":"x\\ny"}', b'{"b":1}', 17, 1.9e9)
    data = encode_push(carrying)
    assert decode_push(data) == carrying
    assert (
        decode_push(encode_push(Push("c1", 3, "u1", "n1", 2, 1.5, b"{}", b"{}", 4))).reply_req == 4
    )
    # The previous release's decoding, as it was.
    first = data.index(b"\n")
    second = data.index(b"\n", first + 1)
    chat_id, seq, author, node, _conn, stored_at = orjson.loads(data[:first])
    assert (chat_id, seq, author, node, stored_at) == ("c1", 3, "u1", "n1", 1.25)
    assert (data[first + 1 : second], data[second + 1 :]) == (carrying.mine, carrying.other)
    # And the previous release's pushes read here without a reply.
    old = orjson.dumps(["c1", 3, "u1", "n1", 2, 1.25]) + b"\n{}\n{}"
    assert decode_push(old) == Push("c1", 3, "u1", "n1", 2, 1.25, b"{}", b"{}")


def test_a_carried_replys_grant_age_goes_only_to_a_gateway_that_reads_it() -> None:
    """A gateway that asks for carried replies without their age (the release before
    the age) unpacks a three-element origin list; one that asks for the age gets four."""
    aged = Push("c1", 3, "u1", "n1", 2, 1.25, b"{}", b"{}", 17, None, 1.5)
    assert decode_push(encode_push(aged)) == aged
    first = encode_push(aged).index(b"\n")
    assert orjson.loads(encode_push(aged)[:first])[4] == [2, 17, None, 1.5]
    unaged = Push("c1", 3, "u1", "n1", 2, 1.25, b"{}", b"{}", 17, None)
    data = encode_push(unaged)
    _conn, reply_req, expires_at = orjson.loads(data[: data.index(b"\n")])[4]
    assert (reply_req, expires_at) == (17, None)
    assert decode_push(data).reply_age is None
    entry = StreamEntry("n", 1, 2, None, "c", "d", "send_message", None, 1.0, 5.0, True, True)
    encoded = encode_stream_entry(entry)
    assert orjson.loads(encoded)["rp"] == 2 and decode_stream_entry(encoded) == entry
    # The release before reads any true "rp" as asking for the carried reply.
    entry.carried_age = False
    assert orjson.loads(encode_stream_entry(entry))["rp"] == 1
    assert decode_stream_entry(encode_stream_entry(entry)) == entry


def test_a_stream_entry_asks_for_its_reply_on_the_push_only_when_it_says_so() -> None:
    asking = StreamEntry("n", 1, 2, None, "c", "d", "send_message", None, 1.0, 5.0, True)
    assert decode_stream_entry(encode_stream_entry(asking)).reply_on_push is True
    asking.reply_on_push = False
    plain = encode_stream_entry(asking)
    assert b'"rp"' not in plain and decode_stream_entry(plain).reply_on_push is False


@given(st.text(min_size=1, max_size=64), st.text(max_size=200))
def test_a_reply_built_from_a_push_is_the_reply_the_worker_would_send(
    request_id: str, text: str
) -> None:
    view = {"id": "1", "chat_id": "c", "text": text, "is_my": True}
    frame = protocol.encode_reply("success", "send_message", [view], protocol.DETAIL_SUCCESS)
    assert protocol.with_request_id(frame, request_id) == protocol.encode_reply(
        "success", "send_message", [view], protocol.DETAIL_SUCCESS, request_id
    )


def test_partitions_are_stable_and_keys_tagged() -> None:
    assert partition_of("chat-1", 16) == partition_of("chat-1", 16)
    assert {partition_of(str(i), 16) for i in range(200)} == set(range(16))
    keys = Keys("chat")
    assert keys.stream(3) == "chat:stream:{p3}" and keys.stream_partition(keys.stream(3)) == 3
    assert keys.chat_from_channel(keys.chat_channel("a:b")) == "a:b"
    assert keys.chat_from_channel(keys.node_channel("n")) is None
    assert keys.chat_from_channel(keys.control_channel) is None


def test_entry_payload_finds_the_payload_field_of_a_stream_entry() -> None:
    assert entry_payload([b"x", b"1", b"d", b"payload"]) == b"payload"
    assert entry_payload([b"x", b"1"]) is None
    assert entry_payload([b"d"]) is None  # a field without its value
    # Redis answers nil for an entry deleted while pending.
    assert entry_payload(None) is None and entry_payload([]) is None


def test_a_stream_entry_asks_for_a_grant_alone_only_when_it_says_so() -> None:
    """``go`` only on a get_history sent for its grant; an entry without it (a gateway
    of an earlier release) asks for the page as before."""
    entry = StreamEntry("n", 1, 2, None, "c", "d", "get_history", None, 1.0, 5.0, True, True)
    assert b'"go"' not in encode_stream_entry(entry)
    entry.grant_only = True
    encoded = encode_stream_entry(entry)
    assert orjson.loads(encoded)["go"] == 1 and decode_stream_entry(encoded) == entry
