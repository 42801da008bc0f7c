"""Log lines: JSON objects, and errors described without the payloads they carry."""

from __future__ import annotations

import logging

import orjson
from pymongo.errors import BulkWriteError, DuplicateKeyError, ServerSelectionTimeoutError

from shared.logs import JsonFormatter, describe_error


def test_mongo_write_errors_lose_their_documents() -> None:
    bulk = BulkWriteError(
        {
            "writeErrors": [
                {
                    "code": 11000,
                    "errmsg": "dup key: { text: 'secret text' }",
                    "op": {"text": "secret text"},
                }
            ]
        }
    )
    dup = DuplicateKeyError(
        "E11000 dup key: { client_msg_id: 'k' } text 'secret text'", 11000, {"code": 11000}
    )
    for exc in (bulk, dup):
        described = describe_error(exc)
        assert "secret" not in described and "11000" in described


def test_other_errors_keep_a_bounded_message() -> None:
    described = describe_error(ConnectionError("x" * 1000))
    assert described.startswith("ConnectionError: ") and len(described) < 230
    # Its details are the servers tried (a list), not a server's reply.
    selection = ServerSelectionTimeoutError("127.0.0.1:9: connection refused", [{"x": 1}])
    described = describe_error(selection)
    assert described == "ServerSelectionTimeoutError: 127.0.0.1:9: connection refused"


def test_json_formatter_one_object_per_line_with_extra_fields() -> None:
    record = logging.LogRecord("chat", logging.WARNING, __file__, 1, "hello %s", ("there",), None)
    record.partition = 3
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["msg"] == "hello there" and entry["level"] == "warning" and entry["partition"] == 3
