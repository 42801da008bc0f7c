"""Integrity checks of one measured step: acknowledged vs stored vs delivered.

Inputs are the load generators' per-client logs (what each socket was acknowledged and
what it received, per chat, in arrival order) and, for the gateway, the messages stored
in MongoDB for this step (found by the step's ``client_msg_id`` prefix).

* ours: every acknowledged message is stored with the acknowledged id and
  ``client_msg_id``; ids of a chat are contiguous and unique; every member socket other
  than the sender received every stored message of its chats exactly once, in id order.
* peers (nothing stored): every acknowledged message reached every other member of the
  room exactly once, and the messages of one sender arrived in the order it sent them.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

from tests.scale.common import split_key

# How many examples of each problem are kept in the report.
EXAMPLES = 5


def _sender_of_cmid(cmid: str | None) -> tuple[int, int] | None:
    """(gid, k) from ``<tag>-<gid>-<k>``."""
    if not cmid:
        return None
    parts = cmid.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[1]), int(parts[2])


def verify(
    results: list[dict[str, Any]],
    stored: dict[str, list[tuple[int, str | None]]] | None,
) -> dict[str, Any]:
    """Counts of acknowledged, stored and delivered messages and of every violation."""
    clients = [c for r in results for c in r["clients"]]
    out: dict[str, Any] = defaultdict(int)
    examples: dict[str, list[Any]] = defaultdict(list)

    def problem(name: str, count: int, example: Any) -> None:
        if count <= 0:
            return
        out[name] += count
        if len(examples[name]) < EXAMPLES:
            examples[name].append(example)

    out["sockets"] = len(clients)
    out["sockets_connected"] = sum(1 for c in clients if c["connected"])
    for r in results:
        counts = r["counts"]
        out["connect_failed"] += counts.get("connect_failed", 0)
        out["join_failed"] += counts.get("join_failed", 0)
        out["disconnects"] += counts.get("disconnects", 0)
        out["sent"] += counts.get("sent", 0)
        out["history_wrong_page"] += counts.get("history_wrong", 0)
        for n in r.get("unanswered", {}).values():
            out["unanswered"] += n

    # Acknowledged messages, per chat: key -> (id, cmid).
    acked: dict[str, dict[int, tuple[int | None, str | None]]] = defaultdict(dict)
    for c in clients:
        for chat, mid, cmid, key in c["acked"]:
            out["acked"] += 1
            if key in acked[chat]:
                problem("acked_twice", 1, [chat, mid, cmid])
            acked[chat][key] = (mid, cmid)

    # What each chat should have delivered: key -> id (None for peers without ids).
    published: dict[str, dict[int, int | None]] = {}
    if stored is not None:
        for chat, rows in stored.items():
            by_key: dict[int, int | None] = {}
            seqs = sorted(seq for seq, _ in rows)
            out["stored"] += len(rows)
            unique = set(seqs)
            problem("stored_duplicate_id", len(seqs) - len(unique), chat)
            if seqs:
                problem(
                    "stored_id_gap",
                    (seqs[-1] - seqs[0] + 1) - len(unique),
                    [chat, seqs[0], seqs[-1]],
                )
            seen_cmid: set[str] = set()
            for seq, cmid in rows:
                sk = _sender_of_cmid(cmid)
                if cmid in seen_cmid:
                    problem("stored_duplicate_client_msg_id", 1, [chat, cmid])
                    continue
                if cmid is not None:
                    seen_cmid.add(cmid)
                if sk is not None:
                    by_key[(sk[0] << 24) | sk[1]] = seq
            published[chat] = by_key
        stored_ids = {chat: {seq for seq, _ in rows} for chat, rows in stored.items()}
        for chat, keys in acked.items():
            table = published.get(chat, {})
            for key, (mid, cmid) in keys.items():
                seq = table.get(key)
                if seq is None:
                    problem("acked_not_stored", 1, [chat, mid, cmid])
                elif mid is not None and mid != seq:
                    problem("acked_id_mismatch", 1, [chat, mid, seq, cmid])
        acked_keys = {(chat, key) for chat, keys in acked.items() for key in keys}
        out["stored_not_acked"] = sum(
            1 for chat, table in published.items() for key in table if (chat, key) not in acked_keys
        )
    else:
        stored_ids = {}
        for chat, keys in acked.items():
            published[chat] = {key: mid for key, (mid, _cmid) in keys.items()}

    # Deliveries, per socket and chat.
    for c in clients:
        if not c["connected"]:
            continue
        gid = c["gid"]
        for chat in c["chats"]:
            ids = c["recv_ids"].get(chat, [])
            keys = c["recv_keys"].get(chat, [])
            out["delivered"] += len(keys)
            table = published.get(chat, {})
            expected = {key for key in table if split_key(key)[0] != gid}
            out["expected_deliveries"] += len(expected)
            got = set(keys)
            problem(
                "pushed_to_sender",
                sum(1 for key in keys if split_key(key)[0] == gid),
                [gid, chat],
            )
            problem("duplicate_deliveries", len(keys) - len(got), [gid, chat])
            missing = expected - got
            problem("lost_deliveries", len(missing), [gid, chat, sorted(missing)[:3]])
            if stored is not None:
                extra = got - set(table)
                problem("deliveries_not_stored", len(extra), [gid, chat, sorted(extra)[:3]])
                known = stored_ids.get(chat, set())
                problem(
                    "delivered_id_not_stored",
                    sum(1 for i in ids if i not in known),
                    [gid, chat],
                )
            # Order: ids strictly increasing where the server assigns ids; per sender always.
            if ids and all(i >= 0 for i in ids):
                bad = sum(1 for a, b in itertools.pairwise(ids) if b <= a)
                problem("out_of_order_ids", bad, [gid, chat])
            last_k: dict[int, int] = {}
            bad_fifo = 0
            for key in keys:
                sender, k = split_key(key)
                if k <= last_k.get(sender, 0):
                    bad_fifo += 1
                last_k[sender] = k
            problem("out_of_order_per_sender", bad_fifo, [gid, chat])

    failures = [
        name
        for name in (
            "connect_failed",
            "join_failed",
            "history_wrong_page",
            "disconnects",
            "unanswered",
            "acked_twice",
            "acked_not_stored",
            "acked_id_mismatch",
            "stored_duplicate_id",
            "stored_id_gap",
            "stored_duplicate_client_msg_id",
            "duplicate_deliveries",
            "lost_deliveries",
            "pushed_to_sender",
            "deliveries_not_stored",
            "delivered_id_not_stored",
            "out_of_order_ids",
            "out_of_order_per_sender",
        )
        if out.get(name, 0) > 0
    ]
    result = dict(out)
    result["examples"] = dict(examples)
    result["failures"] = failures
    result["passed"] = not failures
    result["storage_checked"] = stored is not None
    return result
