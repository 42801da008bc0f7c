"""Workloads: who connects where, which chats each socket joins, who sends how fast.

A :class:`Scenario` is pure data: users (one socket each), chats with their members,
per-socket send and history timetables. The harness turns it into MongoDB documents
(for the gateway) and into one plan file per load generator process.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field
from typing import Any

HISTORY_CHAT = "h0"
PREFILL_USER = "u-prefill"


@dataclass
class Scenario:
    """One workload at one offered rate."""

    workload: str
    clients: list[dict[str, Any]]
    chats: dict[str, list[str]]  # chat id -> member user ids
    send_rate: float  # offered send_message per second, all sockets together
    history_rate: float = 0.0  # offered get_history per second
    prefill: dict[str, int] = field(default_factory=dict)  # chat -> messages to insert
    # Deliveries a send produces (members - 1), averaged over senders.
    fanout: float = 0.0
    description: str = ""

    @property
    def offered_deliveries(self) -> float:
        return self.send_rate * self.fanout


def _client(gid: int, chats: list[str], url: int) -> dict[str, Any]:
    return {
        "gid": gid,
        "user_id": f"u{gid}",
        "token": secrets.token_hex(16),
        "url": url,
        "chats": chats,
        "sends": [],
        "history": [],
    }


def _phase(rng: random.Random, rate: float) -> float:
    return rng.random() / rate


def chat_workload(
    sockets: int, chat_size: int, rate: float, endpoints: int, seed: int = 1
) -> Scenario:
    """``sockets`` users in chats of ``chat_size``; every member sends, ``rate`` in total."""
    chat_size = max(2, chat_size)
    n_chats = max(1, sockets // chat_size)
    sockets = n_chats * chat_size
    rng = random.Random(seed)
    per_sender = rate / sockets if rate > 0 else 0.0
    clients = []
    chats: dict[str, list[str]] = {}
    for gid in range(sockets):
        chat = f"c{gid // chat_size}"
        client = _client(gid, [chat], gid % endpoints)
        chats.setdefault(chat, []).append(client["user_id"])
        if per_sender > 0:
            client["sends"].append([chat, per_sender, _phase(rng, per_sender)])
        clients.append(client)
    return Scenario(
        "chat",
        clients,
        chats,
        rate,
        fanout=chat_size - 1,
        description=f"{sockets} sockets in {n_chats} chats of {chat_size}; every member sends; "
        f"{rate:g} sends/s in total ({per_sender:.3g}/s per socket)",
    )


def rooms_workload(
    sockets: int, room_size: int, senders_per_room: int, rate: float, endpoints: int, seed: int = 2
) -> Scenario:
    """Fan-out: ``sockets`` users in rooms of ``room_size``; a few senders per room."""
    room_size = max(2, room_size)
    n_rooms = max(1, sockets // room_size)
    sockets = n_rooms * room_size
    senders_per_room = max(1, min(senders_per_room, room_size))
    rng = random.Random(seed)
    per_sender = rate / (n_rooms * senders_per_room) if rate > 0 else 0.0
    clients = []
    chats: dict[str, list[str]] = {}
    for gid in range(sockets):
        room, index = divmod(gid, room_size)
        chat = f"r{room}"
        client = _client(gid, [chat], gid % endpoints)
        chats.setdefault(chat, []).append(client["user_id"])
        if index < senders_per_room and per_sender > 0:
            client["sends"].append([chat, per_sender, _phase(rng, per_sender)])
        clients.append(client)
    return Scenario(
        "rooms",
        clients,
        chats,
        rate,
        fanout=room_size - 1,
        description=f"{sockets} sockets in {n_rooms} rooms of {room_size}; {senders_per_room} "
        f"senders per room; {rate:g} sends/s in total ({per_sender:.3g}/s per sender)",
    )


def idle_workload(per_endpoint: int, endpoints: int, chat_size: int, join: bool) -> Scenario:
    """Idle sockets: connect (and join one chat each), then send nothing."""
    sockets = per_endpoint * endpoints
    scenario = chat_workload(sockets, chat_size, 0.0, endpoints)
    if not join:
        for client in scenario.clients:
            client["chats"] = []
    scenario.workload = "idle"
    scenario.fanout = 0.0
    scenario.description = (
        f"{len(scenario.clients)} idle sockets ({per_endpoint} per server process), "
        + ("each joined to one chat" if join else "not joined to any chat")
    )
    return scenario


def history_workload(
    prefill: int,
    readers: int,
    history_rate: float,
    writers: int,
    write_rate: float,
    chat_size: int,
    endpoints: int,
    seed: int = 3,
) -> Scenario:
    """``get_history`` of a page from a chat prefilled with ``prefill`` messages, at
    ``history_rate`` in total, while ``writers`` sockets send ``write_rate`` in other chats."""
    scenario = (
        chat_workload(writers, chat_size, write_rate, endpoints)
        if writers
        else Scenario("chat", [], {}, 0.0)
    )
    rng = random.Random(seed)
    base = len(scenario.clients)
    per_reader = history_rate / readers if readers and history_rate > 0 else 0.0
    members = [PREFILL_USER]
    for i in range(readers):
        gid = base + i
        client = _client(gid, [HISTORY_CHAT], gid % endpoints)
        if per_reader > 0:
            client["history"].append([HISTORY_CHAT, per_reader, _phase(rng, per_reader), prefill])
        members.append(client["user_id"])
        scenario.clients.append(client)
    scenario.chats[HISTORY_CHAT] = members
    scenario.workload = "history"
    scenario.history_rate = history_rate
    scenario.prefill = {HISTORY_CHAT: prefill}
    scenario.description = (
        f"{readers} sockets read pages of 50 before a random id from a chat of {prefill} "
        f"messages, {history_rate:g} get_history/s in total, while {len(scenario.clients) - readers} "
        f"sockets send {write_rate:g} messages/s in chats of {chat_size}"
    )
    return scenario


def with_rate(scenario: Scenario, rate: float, seed: int = 7) -> Scenario:
    """The same sockets and chats with every sender's rate scaled to ``rate`` in total."""
    if scenario.send_rate <= 0:
        raise ValueError("cannot scale a workload that sends nothing")
    factor = rate / scenario.send_rate
    rng = random.Random(seed)
    clients = []
    for client in scenario.clients:
        copy = dict(client)
        copy["sends"] = [
            [chat, r * factor, _phase(rng, r * factor)] for chat, r, _phase_s in client["sends"]
        ]
        clients.append(copy)
    return Scenario(
        scenario.workload,
        clients,
        scenario.chats,
        rate,
        scenario.history_rate,
        scenario.prefill,
        scenario.fanout,
        scenario.description,
    )
