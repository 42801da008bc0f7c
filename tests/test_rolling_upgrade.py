"""A rolling upgrade, as processes: this release's gateways and workers beside the
previous release's (its code taken from git), on the same Redis and MongoDB.

The previous release is the one before a send's reply rode on its push (7e9c5a7): its
gateways do not ask for that, and its workers answer every request on the asking
gateway's node channel. Either kind of process may be rolled first (README, *One change
to ARCHITECTURE.md: a send's reply rides on its push*), so both mixes are run.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.config import Settings
from shared.keys import Keys
from tests.support import ROOT, Client, Seeder, Stack

PREVIOUS_RELEASE = "7e9c5a71ba4f8860e12fce15b1865028703782b2"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The previous release's code, extracted from this repository's history."""
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if shallow.returncode != 0:
        pytest.skip("not a git checkout: the previous release's code is not at hand")
    if shallow.stdout.strip() == "true":
        pytest.skip("a shallow clone: the previous release's commit is not in it")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", PREVIOUS_RELEASE, "gateway", "worker", "shared"],
        cwd=ROOT, capture_output=True, check=True,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    assert "reply_req" not in (root / "shared" / "codec.py").read_text()  # the one before
    yield root


async def _chat_between(
    stack: Stack, seed: Seeder, a_url: str, b_url: str
) -> tuple[str, Client, Client, Client]:
    """Alice on ``a_url`` (two sockets, one of them silent) and Bob on ``b_url``, in one chat."""
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat = await seed.chat(alice, bob)
    a1 = await stack.client(a_url, a_token)
    a2 = await stack.client(a_url, a_token)
    b = await stack.client(b_url, b_token)
    for client in (a1, a2, b):
        await client.join(chat)
    return chat, a1, a2, b


async def _node_replies(redis: Redis, settings: Settings, send: Awaitable[Any]) -> int:
    """How many replies went on a node channel while ``send`` ran."""
    watch = redis.pubsub()
    await watch.psubscribe(Keys(settings.redis_prefix).node_channel("*"))
    try:
        await send
        seen = 0
        until = asyncio.get_running_loop().time() + 0.3
        while (left := until - asyncio.get_running_loop().time()) > 0:
            # None for the subscription's own confirmation, which is skipped.
            seen += (
                await watch.get_message(ignore_subscribe_messages=True, timeout=left) is not None
            )
        return seen
    finally:
        await watch.aclose()


async def _converse(
    chat: str, a1: Client, a2: Client, b: Client, redis: Redis, settings: Settings
) -> tuple[int, int]:
    """Sends from both sides, with and without request ids, a retry and pages: every
    client sees what it would see with one release throughout. Returns how many of the
    first send of each side went on a node channel (1) rather than on its push (0)."""
    replies: list[dict[str, Any]] = []

    async def first_send(client: Client, text: str, request_id: str) -> None:
        replies.append(await client.send_text(chat, text, request_id=request_id))

    via_node_a = await _node_replies(redis, settings, first_send(a1, "from A", "a-1"))
    first = replies[0]
    assert first["type"] == "success" and first["request_id"] == "a-1"
    assert first["messages"][0]["is_my"] is True and first["messages"][0]["id"] == "1"
    via_node_b = await _node_replies(redis, settings, first_send(b, "from B", "b-1"))
    assert replies[1]["request_id"] == "b-1" and replies[1]["messages"][0]["id"] == "2"
    plain = await b.request("send_message", chat, {"type": "text", "text": "plain"}, plain=True)
    assert "request_id" not in plain and plain["messages"][0]["id"] == "3"
    again = await b.send_text(chat, "keyed", request_id="b-2", client_msg_id="k")
    retry = await b.send_text(chat, "keyed", request_id="b-3", client_msg_id="k")
    assert retry["request_id"] == "b-3" and retry["messages"] == again["messages"]
    assert again["messages"][0]["id"] == "4"
    for client, expected in ((a2, ["1", "2", "3", "4"]), (a1, ["2", "3", "4"]), (b, ["1"])):
        pushes = [await client.push() for _ in expected]
        assert [p["messages"][0]["id"] for p in pushes] == expected
        assert all("request_id" not in p and p["type"] == "success" for p in pushes)
    for client in (a1, a2, b):
        await client.no_push(0.2)
    page_a = await a1.request("get_history", chat)
    page_b = await b.request("get_history", chat)
    assert [m["id"] for m in page_a["messages"]] == ["1", "2", "3", "4"]
    assert [m["is_my"] for m in page_a["messages"]] == [True, False, False, False]
    assert [m["is_my"] for m in page_b["messages"]] == [False, True, True, True]
    return via_node_a, via_node_b


@pytest.mark.parametrize(
    ("old", "via_node"),
    [
        # Gateways rolled one at a time: the old gateway's send is answered on its node
        # channel, the new one's on its push, by a new worker.
        ("gateway", (1, 0)),
        # Gateways rolled first: the old worker answers every send on the node channel.
        ("worker", (1, 1)),
    ],
    ids=["old_gateway_beside_a_new_one", "old_worker_behind_new_gateways"],
)
async def test_the_previous_release_beside_this_one(
    stack: Stack,
    seed: Seeder,
    log_dir: Path,
    previous_release: Path,
    redis: Redis,
    settings: Settings,
    old: str,
    via_node: tuple[int, int],
) -> None:
    """Two gateways and a worker, one of them ``old``: Alice on the first gateway, Bob on
    the second."""
    release = {old: previous_release}
    _, gw_1 = stack.spawn("gateway", log_dir, root=release.get("gateway", ROOT))
    _, gw_2 = stack.spawn("gateway", log_dir)
    _, wk = stack.spawn("worker", log_dir, root=release.get("worker", ROOT))
    for url in (gw_1, gw_2, wk):
        await stack.wait_ready(url)
    chat, a1, a2, b = await _chat_between(stack, seed, gw_1, gw_2)
    assert await _converse(chat, a1, a2, b, redis, settings) == via_node
