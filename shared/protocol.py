"""The client protocol: request parsing and validation, reply and message shapes.

The seed document's frames are a public contract (see PROTOCOL.md): field names, event
names and reply types here must not change. Extensions (``request_id``,
``client_msg_id``, history paging, ``bad_request``, ``rate_limited``) are optional, and
an old client that never sends them sees exactly the seed's shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

# Event types (seed).
GET_HISTORY: Final = "get_history"
SEND_MESSAGE: Final = "send_message"
SEND_FILE: Final = "send_file"
EVENTS: Final = frozenset({GET_HISTORY, SEND_MESSAGE, SEND_FILE})
SEND_EVENTS: Final = frozenset({SEND_MESSAGE, SEND_FILE})

# Reply types (seed, then our extensions).
SUCCESS: Final = "success"
SERVER_ERROR: Final = "server_error"
EVENT_NOT_FOUND: Final = "event_not_found"
TOKEN_VALIDATION_ERROR: Final = "token_validation_error"
CHAT_NOT_EXISTS: Final = "chat_not_exists"
BAD_REQUEST: Final = "bad_request"
RATE_LIMITED: Final = "rate_limited"
REPLY_TYPES: Final = (
    SUCCESS,
    SERVER_ERROR,
    EVENT_NOT_FOUND,
    TOKEN_VALIDATION_ERROR,
    CHAT_NOT_EXISTS,
    BAD_REQUEST,
    RATE_LIMITED,
)

# Message types (seed).
TEXT: Final = "text"
IMAGE: Final = "image"
FILE: Final = "file"
FILE_TYPES: Final = frozenset({IMAGE, FILE})

HISTORY_DEFAULT_LIMIT: Final = 50
HISTORY_MAX_LIMIT: Final = 200
MAX_ID_LENGTH: Final = 64
MAX_TOKEN_LENGTH: Final = 256
MAX_URL_LENGTH: Final = 2_048
# Sequence ids fit in a signed 64-bit MongoDB integer.
MAX_SEQ: Final = 2**63 - 1

DETAIL_SUCCESS: Final = "Success"
DETAIL_TIMEOUT: Final = "Request timed out, retry with the same client_msg_id"
DETAIL_BAD_TOKEN: Final = "Token is empty or invalid"
DETAIL_NO_CHAT: Final = "Chat not found"
DETAIL_SERVER_ERROR: Final = "Server error, retry later"


@dataclass(frozen=True, slots=True)
class Limits:
    """Validation limits taken from settings."""

    max_text_length: int = 4_096
    # Normalised by normalise_url_prefixes; "/" admits every rooted path on our host.
    file_url_prefixes: tuple[str, ...] = ("/",)


class ProtocolError(Exception):
    """A request that gets an error reply from the gateway itself."""

    def __init__(
        self,
        reply_type: str,
        detail: str,
        event_type: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.reply_type = reply_type
        self.detail = detail
        self.event_type = event_type
        self.request_id = request_id

    def to_frame(self) -> bytes:
        """The reply frame for this error."""
        return encode_reply(self.reply_type, self.event_type, None, self.detail, self.request_id)


@dataclass(slots=True)
class Request:
    """A request that passed envelope validation; ``message`` is normalised.

    Not frozen, as the records of shared.codec: one is built per frame received."""

    event_type: str
    chat_id: str
    token: str
    message: dict[str, Any] | None
    request_id: str | None


def parse_request(data: str | bytes, limits: Limits) -> Request:
    """Parse and validate one client frame; raise :class:`ProtocolError` when it is bad.

    Unknown fields are ignored. Checks run in the order a reader of the frame would:
    JSON, object, ``request_id``, ``event_type``, ``chat_id``, ``token``, ``message``.
    """
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(BAD_REQUEST, f"Invalid JSON: {_json_reason(exc)}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(BAD_REQUEST, "The request must be a JSON object")

    request_id = raw.get("request_id")
    if request_id is not None and not _is_short_id(request_id):
        raise ProtocolError(BAD_REQUEST, "request_id must be a string of 1 to 64 characters")

    event_type = raw.get("event_type")
    if not isinstance(event_type, str):
        raise ProtocolError(
            BAD_REQUEST, "event_type is required and must be a string", None, request_id
        )
    if event_type not in EVENTS:
        shown = event_type if len(event_type) <= MAX_ID_LENGTH else event_type[:MAX_ID_LENGTH] + "…"
        raise ProtocolError(EVENT_NOT_FOUND, f"Event {shown} not found", shown, request_id)

    def bad(detail: str) -> ProtocolError:
        return ProtocolError(BAD_REQUEST, detail, event_type, request_id)

    chat_id = normalise_id(raw.get("chat_id"))
    if chat_id is None:
        raise bad("chat_id is required: a string or integer of at most 64 characters")

    token = raw.get("token")
    if token is None or token == "":
        raise ProtocolError(TOKEN_VALIDATION_ERROR, DETAIL_BAD_TOKEN, event_type, request_id)
    if not isinstance(token, str):
        raise bad("token must be a string")
    if len(token) > MAX_TOKEN_LENGTH or "\x00" in token:
        raise ProtocolError(TOKEN_VALIDATION_ERROR, DETAIL_BAD_TOKEN, event_type, request_id)

    message = raw.get("message")
    if event_type == GET_HISTORY:
        normalised = _history_query(message, bad)
    elif event_type == SEND_MESSAGE:
        normalised = _text_message(message, limits, bad)
    else:
        normalised = _file_message(message, limits, bad)
    return Request(event_type, chat_id, token, normalised, request_id)


def normalise_id(value: Any) -> str | None:
    """A chat or user id as its canonical string, or None when it is not a usable id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    if isinstance(value, str) and _is_short_id(value) and value.isprintable():
        return value
    return None


def _is_short_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and "\x00" not in value


def _seq(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_SEQ else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        number = int(value)
        return number if number <= MAX_SEQ else None
    return None


def _history_query(message: Any, bad: Any) -> dict[str, Any] | None:
    if message is None:
        return None
    if not isinstance(message, dict):
        raise bad("message must be null or an object for get_history")
    query: dict[str, Any] = {}
    limit = message.get("limit")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise bad(f"limit must be an integer from 1 to {HISTORY_MAX_LIMIT}")
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            raise bad(f"limit must be an integer from 1 to {HISTORY_MAX_LIMIT}")
        query["limit"] = limit
    for name in ("before_id", "after_id"):
        if message.get(name) is not None:
            seq = _seq(message[name])
            if seq is None:
                raise bad(f"{name} must be a message id (a non-negative decimal string)")
            query[name] = seq
    return query or None


def _client_msg_id(message: dict[str, Any], bad: Any) -> str | None:
    value = message.get("client_msg_id")
    if value is None:
        return None
    if not _is_short_id(value):
        raise bad("client_msg_id must be a string of 1 to 64 characters")
    assert isinstance(value, str)
    return value


def _check_text(text: str, limits: Limits, bad: Any) -> None:
    if len(text) > limits.max_text_length:
        raise bad(f"text is longer than {limits.max_text_length} characters")
    if "\x00" in text:
        raise bad("text must not contain NUL characters")


def _text_message(message: Any, limits: Limits, bad: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad("message must be an object with type and text")
    kind = message.get("type", TEXT)
    if not isinstance(kind, str):
        raise bad("message.type must be a string")
    if kind in FILE_TYPES:
        raise bad(f"send_message carries text only; send type {kind} with send_file")
    if kind != TEXT:
        raise bad(f"Unknown message type {kind[:MAX_ID_LENGTH]}")
    text = message.get("text")
    if not isinstance(text, str):
        raise bad("message.text is required and must be a string")
    if not text.strip():
        raise bad("message.text must not be empty")
    _check_text(text, limits, bad)
    normalised: dict[str, Any] = {"type": TEXT, "text": text, "file_url": None}
    client_msg_id = _client_msg_id(message, bad)
    if client_msg_id is not None:
        normalised["client_msg_id"] = client_msg_id
    return normalised


def _file_message(message: Any, limits: Limits, bad: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad("message must be an object with type and file_url")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise bad("message.type is required: image or file")
    if kind not in FILE_TYPES:
        raise bad(f"Unknown message type {kind[:MAX_ID_LENGTH]} for send_file: use image or file")
    file_url = message.get("file_url")
    if not isinstance(file_url, str) or not file_url.strip():
        raise bad("message.file_url is required and must be a non-empty string")
    problem = check_media_url(file_url, limits.file_url_prefixes)
    if problem is not None:
        raise bad(f"file_url {problem}")
    text = message.get("text")
    if text is not None and not isinstance(text, str):
        raise bad("message.text must be a string or null")
    if text is not None:
        _check_text(text, limits, bad)
        if not text.strip():
            text = None
    normalised: dict[str, Any] = {"type": kind, "text": text, "file_url": file_url}
    client_msg_id = _client_msg_id(message, bad)
    if client_msg_id is not None:
        normalised["client_msg_id"] = client_msg_id
    return normalised


def _json_reason(exc: orjson.JSONDecodeError) -> str:
    # orjson's messages are short and carry no input echo beyond a position.
    reason = str(exc.msg)[:120] if hasattr(exc, "msg") else "malformed"
    if reason.startswith("str is not valid UTF-8"):
        # orjson says "surrogates not allowed" for any invalid byte sequence.
        return "the frame is not valid UTF-8"
    if reason.startswith("depth limit exceeded"):
        return "nested too deeply (depth limit exceeded)"
    if reason.startswith("number is infinity"):
        return "number out of range"
    return reason


def normalise_url_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """Check and normalise ``FILE_URL_PREFIXES``; raise ValueError naming a bad entry.

    An entry is either a path prefix (``/`` or ``/static_media/``: URLs on the host that
    serves the client) or an ``http(s)://host[:port][/path]`` prefix. An absolute prefix
    without a path gets ``/`` appended, so ``https://cdn.example.com`` never admits
    ``https://cdn.example.com.evil.org/``. Scheme and host are lower-cased.
    """
    normalised: list[str] = []
    for prefix in prefixes:
        if prefix.startswith("/"):
            if prefix.startswith("//") or "\\" in prefix or not prefix.isprintable():
                raise ValueError(f"{prefix!r}: a path prefix starts with a single /")
            normalised.append(prefix)
            continue
        absolute = _absolute_url(prefix)
        if absolute is None:
            raise ValueError(f"{prefix!r}: use a path (/...) or an http(s)://host/ prefix")
        scheme, host, rest = absolute
        if "?" in rest or "#" in rest:
            raise ValueError(f"{prefix!r}: a prefix has no query or fragment")
        normalised.append(f"{scheme}://{host}{rest or '/'}")
    if not normalised:
        raise ValueError("at least one prefix is required (/ admits every path on this host)")
    return tuple(normalised)


def check_media_url(url: str, prefixes: tuple[str, ...]) -> str | None:
    """Why ``url`` may not be shown to other users as a link or image, or None when it may.

    Accepted: a path starting with one of the path prefixes (never ``//``, which a
    browser reads as another host), or an http(s) URL starting with one of the absolute
    prefixes. Everything else is refused, so ``javascript:``, ``data:``, ``vbscript:``
    and protocol-relative URLs never reach a client. ``prefixes`` come from
    :func:`normalise_url_prefixes`.
    """
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    if not url.isprintable() or "\\" in url:
        # Browsers drop tabs and newlines inside URLs and read \ as /: refuse both.
        return "must not contain control characters or backslashes"
    if url.startswith("/"):
        if url.startswith("//"):
            return "must not be protocol-relative (//host)"
        if any(p.startswith("/") and url.startswith(p) for p in prefixes):
            return None
        return "is not under an allowed path"
    absolute = _absolute_url(url)
    if absolute is not None:
        scheme, host, rest = absolute
        candidate = f"{scheme}://{host}{rest}"
        if any(not p.startswith("/") and candidate.startswith(p) for p in prefixes):
            return None
        return "is not under an allowed URL prefix"
    return "must be a path starting with / or an allowed http(s) URL"


def _absolute_url(url: str) -> tuple[str, str, str] | None:
    """(scheme, host, rest) of an ``http(s)://host...`` URL, lower-cased; else None."""
    scheme, sep, after = url.partition("://")
    if not sep or scheme.lower() not in {"http", "https"}:
        return None
    cut = len(after)
    for mark in "/?#":
        found = after.find(mark)
        if found != -1:
            cut = min(cut, found)
    host, rest = after[:cut], after[cut:]
    # No user info: "https://cdn.example.com@evil.org/" must not look like the CDN.
    if not host or "@" in host or not host.isprintable() or " " in host:
        return None
    return scheme.lower(), host.lower(), rest


def encode_reply(
    reply_type: str,
    event_type: str | None,
    messages: list[dict[str, Any]] | None,
    detail: str | None,
    request_id: str | None = None,
) -> bytes:
    """One reply frame in the seed's field order; ``request_id`` only when given."""
    frame: dict[str, Any] = {
        "type": reply_type,
        "event_type": event_type,
        "messages": messages,
        "detail": detail,
    }
    if request_id is not None:
        frame["request_id"] = request_id
    return orjson.dumps(frame)


def with_request_id(frame: bytes, request_id: str) -> bytes:
    """``frame``, made by :func:`encode_reply` without a ``request_id``, as it would
    have been made with one (the field comes last, so it is appended).

    A gateway builds a send's reply this way from the push that carries it.
    """
    return b'%s,"request_id":%s}' % (frame[:-1], orjson.dumps(request_id))


def message_view(doc: Mapping[str, Any], is_my: bool) -> dict[str, Any]:
    """A stored message as the client sees it (the seed's fields, plus ``client_msg_id``)."""
    view: dict[str, Any] = {
        "id": str(doc["seq"]),
        "chat_id": doc["chat_id"],
        "user_id": doc["user_id"],
        "username": doc["username"],
        "avatar": doc.get("avatar"),
        "created_at": doc["created_at"],
        "type": doc["type"],
        "text": doc.get("text"),
        "file_url": doc.get("file_url"),
        "is_my": is_my,
    }
    if doc.get("client_msg_id") is not None:
        view["client_msg_id"] = doc["client_msg_id"]
    return view


def history_frame(page: Sequence[Mapping[str, Any]], user_id: str, request_id: str | None) -> bytes:
    """The reply to a ``get_history``: ``page`` (stored messages, oldest first) as
    ``user_id`` sees it. Built by a worker, or by a gateway that read the page itself."""
    messages = [message_view(doc, doc["user_id"] == user_id) for doc in page]
    return encode_reply(SUCCESS, GET_HISTORY, messages, None, request_id)
