"""The MongoDB call benchmark (tests/scale/mongo_calls.py) runs both paths end to end."""

from __future__ import annotations

import re

from shared.config import Settings
from tests.scale.mongo_calls import run
from tests.support import mongo_store


async def test_both_paths_are_measured_and_store_what_they_measure(
    settings: Settings, cleanup: None
) -> None:
    lines = await run(settings.mongo_url, settings.mongo_database, 3, [2], 5)
    assert len(lines) == 8  # (insert, page) x (pymongo, lean) x 2 rounds
    for path in ("pymongo", "lean"):
        mine = [line for line in lines if f"{path}:" in line]
        assert len(mine) == 4
        for line in mine:
            cpu, wall = map(float, re.findall(r"(\d+) µs", line))
            assert cpu > 0 and wall > 0
    client, store = await mongo_store(settings)
    try:
        # 3 inserts of 2 documents, per path and round, each path in chats of its own.
        for path in ("pymongo", "lean"):
            stored = await store.messages.count_documents({"chat_id": {"$regex": f"^{path}-"}})
            assert stored == 12
    finally:
        await client.close()
