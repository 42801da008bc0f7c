"""Internal wire formats between gateways and workers (never seen by clients).

Payloads that carry client frames put them after a JSON header, separated by a newline
(orjson never writes a raw newline), so a gateway hands the frame bytes to sockets as
they are, without decoding or re-encoding them.

The per-message records (:class:`StreamEntry`, :class:`Reply`, :class:`Grant`,
:class:`Push`) are plain slotted dataclasses, not frozen ones: one or more is built per
message on the hot paths, and a frozen dataclass's ``__init__`` (``object.__setattr__``
per field) costs ~4x as much. Nothing changes them after they are built.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

STREAM_FIELD = b"d"


def entry_payload(fields: list[bytes] | None) -> bytes | None:
    """The payload (``STREAM_FIELD``) of a stream entry's flat [field, value, ...] list
    (None: absent, or the entry was deleted while pending and Redis returned nil for its
    fields)."""
    if not fields:
        return None
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == STREAM_FIELD:
            return fields[i + 1]
    return None


def event_id(partition: int, entry_id: str) -> str:
    """A request's id across all partitions, from its stream entry: a stored message's
    ``_id`` (by which a worker finds a redelivered entry's message, and a gateway a send
    whose reply it missed)."""
    return f"{partition}-{entry_id}"


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a token: the only form a token is stored or sent in."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class StreamEntry:
    """A validated client request on its way from a gateway to a worker."""

    node: str
    conn: int
    req: int
    request_id: str | None
    chat_id: str
    token_digest: str
    event_type: str
    message: dict[str, Any] | None
    received_at: float
    # Seconds the gateway waits for the reply before it answers server_error itself
    # (None: no limit known, from a gateway that predates the field). A worker does not
    # spend work on a read nobody waits for any more.
    timeout: float | None = None
    # The gateway takes a stored send's reply from the message's push (see Push): a
    # gateway of an earlier release does not say so, and gets its reply on its node
    # channel as before.
    reply_on_push: bool = False
    # The gateway reads the age of a carried reply's grant (``Push.reply_age``, a fourth
    # element in the push's origin list): a gateway of an earlier release unpacks three.
    carried_age: bool = False
    # A get_history for the socket's grant only: the gateway reads the page itself once
    # the grant is renewed (a worker of an earlier release ignores it and sends a page,
    # which the gateway then forwards as before).
    grant_only: bool = False


def encode_stream_entry(entry: StreamEntry) -> bytes:
    """The value of the single stream field ``d``."""
    return orjson.dumps(
        {
            "n": entry.node,
            "c": entry.conn,
            "q": entry.req,
            "r": entry.request_id,
            "ch": entry.chat_id,
            "t": entry.token_digest,
            "e": entry.event_type,
            "m": entry.message,
            "ts": entry.received_at,
            "to": entry.timeout,
            **({"rp": 2 if entry.carried_age else 1} if entry.reply_on_push else {}),
            **({"go": 1} if entry.grant_only else {}),
        }
    )


def decode_stream_entry(data: bytes) -> StreamEntry:
    """Inverse of :func:`encode_stream_entry`; raises ValueError/KeyError when corrupt."""
    raw = orjson.loads(data)
    asks = raw.get("rp")
    return StreamEntry(
        node=raw["n"],
        conn=raw["c"],
        req=raw["q"],
        request_id=raw["r"],
        chat_id=raw["ch"],
        token_digest=raw["t"],
        event_type=raw["e"],
        message=raw["m"],
        received_at=raw["ts"],
        timeout=raw.get("to"),
        reply_on_push=bool(asks),
        carried_age=isinstance(asks, int) and asks >= 2,
        grant_only=bool(raw.get("go")),
    )


@dataclass(slots=True)
class Grant:
    """The worker's word that a user may receive a chat's pushes on a connection.

    ``head``: the last id whose push went out ahead of this reply, on the same pub/sub
    connection; pushes with higher ids follow it. For ``get_history`` it is the chat's
    last id when the request was handled; for a send, the id of the message the reply
    carries, except for a client's retry of a message stored earlier: the chat's last
    id then, and ``message_id`` names the (older) message.
    """

    chat_id: str
    user_id: str
    head: int
    # Unix seconds when the token that was checked expires (None: never). Pushes stop
    # then, whether or not the socket asks anything again.
    expires_at: float | None = None
    # The id of the message a send's reply carries when it is not ``head`` (None: it is).
    message_id: int | None = None
    # Seconds since the worker read from MongoDB the token and the chat's members it
    # decided on (its cache entries may be up to AUTH_CACHE_TTL_SECONDS old): a gateway
    # counts its own page reads' window from that read, not from the grant's arrival.
    age: float = 0.0

    @property
    def carries(self) -> int:
        """The id of the message a send's reply carries."""
        return self.head if self.message_id is None else self.message_id


@dataclass(slots=True)
class Reply:
    """A reply for one connection of one gateway node."""

    conn: int
    req: int
    frame: bytes
    grant: Grant | None = None
    revoke: str | None = None  # chat id whose authorisation on this connection ends


def encode_reply_envelope(reply: Reply) -> bytes:
    """Node-channel payload: header line, then the client frame."""
    header: dict[str, Any] = {"c": reply.conn, "q": reply.req}
    grant = reply.grant
    if grant is not None:
        header["g"] = [grant.chat_id, grant.user_id, grant.head]
        if grant.expires_at is not None:
            header["g"].append(grant.expires_at)
        if grant.message_id is not None:
            # A key of its own, so that the grant's list keeps its shape for a gateway of
            # the previous release (which then takes the chat's head for the message's id).
            header["s"] = grant.message_id
        if grant.age:
            header["a"] = round(grant.age, 3)
    if reply.revoke is not None:
        header["x"] = reply.revoke
    return orjson.dumps(header) + b"\n" + reply.frame


def decode_reply_envelope(data: bytes) -> Reply:
    """Inverse of :func:`encode_reply_envelope`."""
    cut = data.index(b"\n")
    header = orjson.loads(data[:cut])
    grant = None
    if "g" in header:
        chat_id, user_id, head, *expiry = header["g"]
        grant = Grant(
            chat_id,
            user_id,
            head,
            expiry[0] if expiry else None,
            header.get("s"),
            header.get("a", 0.0),
        )
    return Reply(
        conn=header["c"],
        req=header["q"],
        frame=data[cut + 1 :],
        grant=grant,
        revoke=header.get("x"),
    )


@dataclass(slots=True)
class Push:
    """A stored message for every socket of a chat: one frame per ``is_my`` variant.

    When ``reply_req`` is set, the push also answers its author's request number
    ``reply_req`` on node ``origin_node``: that gateway builds the reply from ``mine``
    (adding the request's ``request_id``) and takes the grant it stands for from the
    push itself (the chat, the author, ``seq``, and ``reply_expires_at``). A send then
    costs one PUBLISH instead of two, and its gateway one pub/sub message.
    """

    chat_id: str
    seq: int
    author: str
    origin_node: str
    origin_conn: int
    stored_at: float
    mine: bytes
    other: bytes
    reply_req: int | None = None
    # When the author's token expires (Unix seconds; None: never), for the grant.
    reply_expires_at: float | None = None
    # The grant's age (Grant.age), for a gateway that reads it (StreamEntry.carried_age);
    # None: not sent.
    reply_age: float | None = None


def encode_push(push: Push) -> bytes:
    """Chat-channel payload: header line, the ``is_my: true`` frame, the ``false`` frame.

    The header has six fields. A carried reply goes in the fifth one's place, as
    ``[origin_conn, reply_req, reply_expires_at]``, and ``reply_age`` after them when
    set: a gateway of the previous release unpacks exactly six fields, and reads the
    fifth only when the push comes from a request of its own, which a gateway that asks
    for carried replies never is; one that asks without ``carried_age`` unpacks three.
    """
    origin: int | list[Any] = push.origin_conn
    if push.reply_req is not None:
        origin = [push.origin_conn, push.reply_req, push.reply_expires_at]
        if push.reply_age is not None:
            origin.append(round(push.reply_age, 3))
    header = orjson.dumps(
        [push.chat_id, push.seq, push.author, push.origin_node, origin, push.stored_at]
    )
    return b"\n".join((header, push.mine, push.other))


def decode_push(data: bytes) -> Push:
    """Inverse of :func:`encode_push`."""
    first = data.index(b"\n")
    second = data.index(b"\n", first + 1)
    chat_id, seq, author, node, origin, stored_at = orjson.loads(data[:first])
    reply_req = expires_at = age = None
    if isinstance(origin, list):
        origin, reply_req, expires_at, *more = origin
        if more:
            age = more[0]
    return Push(
        chat_id=chat_id,
        seq=seq,
        author=author,
        origin_node=node,
        origin_conn=origin,
        stored_at=stored_at,
        mine=data[first + 1 : second],
        other=data[second + 1 :],
        reply_req=reply_req,
        reply_expires_at=expires_at,
        reply_age=age,
    )


@dataclass(frozen=True, slots=True)
class Revocation:
    """Access that ended, announced on the control channel to every gateway and worker.

    ``user_ids`` left chat ``chat_id``; ``token_digests`` were revoked. A gateway drops
    the matching sockets' grants at once, so they get no more pushes of those chats.
    """

    chat_id: str | None = None
    user_ids: tuple[str, ...] = ()
    token_digests: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Admission:
    """Users added to a chat, announced on the control channel.

    A gateway forgets an earlier removal of theirs, so a grant for them counts again at
    once rather than after the window a revocation is remembered for; a worker reads the
    chat's members again on its next request instead of within its cache's TTL.
    """

    chat_id: str
    user_ids: tuple[str, ...]


ControlMessage = Revocation | Admission


def encode_control(message: ControlMessage) -> bytes:
    """Control-channel payload."""
    if isinstance(message, Admission):
        return orjson.dumps({"k": "admit", "ch": message.chat_id, "u": list(message.user_ids)})
    return orjson.dumps(
        {
            "k": "revoke",
            "ch": message.chat_id,
            "u": list(message.user_ids),
            "t": list(message.token_digests),
        }
    )


def decode_control(data: bytes) -> ControlMessage | None:
    """Inverse of :func:`encode_control`; None for a message of another kind (from a
    newer version); raises ValueError/KeyError/TypeError when corrupt."""
    raw = orjson.loads(data)
    kind = raw.get("k")
    if kind == "revoke":
        return Revocation(
            chat_id=raw["ch"],
            user_ids=tuple(str(u) for u in raw["u"]),
            token_digests=tuple(str(t) for t in raw["t"]),
        )
    if kind == "admit":
        return Admission(chat_id=str(raw["ch"]), user_ids=tuple(str(u) for u in raw["u"]))
    return None
