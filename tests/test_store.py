"""The MongoDB client's settings (pure: building a client opens no connection)."""

from __future__ import annotations

import pytest

from shared.mongo import client_options, create_client, names_write_concern


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # Nothing said: an acknowledged write is in the journal.
        ("mongodb://127.0.0.1:27017/chat", {"j": True}),
        ("mongodb://127.0.0.1:27017/chat?appname=x", {"j": True}),
        # The URL's own write concern is the operator's choice, taken as it is.
        ("mongodb://127.0.0.1:27017/chat?journal=false", {"j": False}),
        ("mongodb://h1,h2/chat?replicaSet=rs&w=majority", {"w": "majority"}),
        ("mongodb://127.0.0.1:27017/chat?W=1", {"w": 1}),
    ],
)
async def test_writes_wait_for_the_journal_unless_the_url_says_otherwise(
    url: str, expected: dict[str, object]
) -> None:
    client = create_client(url)
    try:
        assert client.write_concern.document == expected
        assert client["chat"]["messages"].write_concern.document == expected
    finally:
        await client.close()


def test_names_write_concern() -> None:
    assert not names_write_concern("mongodb://h/chat")
    assert not names_write_concern("mongodb://h/chat?wtimeoutMS=100&readPreference=primary")
    assert names_write_concern("mongodb://h/chat?Journal=true")
    assert names_write_concern("mongodb://h/chat?appname=x;w=1")
    assert names_write_concern("mongodb+srv://u:p@h/chat?retryWrites=true&w=majority")


def test_the_urls_own_options_win_over_the_workers_defaults() -> None:
    options = client_options("mongodb://h/chat?socketTimeoutMS=300&APPNAME=x&retryWrites=true")
    assert "socketTimeoutMS" not in options and "appname" not in options
    assert "retryWrites" not in options
    assert options["connectTimeoutMS"] == 3000 and options["journal"] is True
    assert client_options("mongodb://h/chat")["socketTimeoutMS"] == 10000
