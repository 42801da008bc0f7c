"""The backlog benchmark (tests/scale/backlog.py) runs end to end and checks each reply."""

from __future__ import annotations

from tests.scale.backlog import run


async def test_a_worker_started_to_a_backlog_answers_every_send_with_its_next_id() -> None:
    (result,) = await run(chats=40, history=3, rounds=1)
    assert result.chats == 40 and result.right == 40
    assert 0 < result.ready_s <= result.answered_s
    assert "40 of 40 right" in result.line()
