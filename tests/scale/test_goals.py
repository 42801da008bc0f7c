"""The report's goal verdicts, on hand-made steps (pure functions, no servers)."""

from __future__ import annotations

from typing import Any

from tests.scale import goals


def _lat(p50: float | None, p99: float | None) -> dict[str, Any]:
    return {"count": 1 if p50 is not None else 0, "p50": p50, "p99": p99}


def _step(
    offered: float,
    *,
    acked: float | None = None,
    p50: float = 2.0,
    p99: float = 10.0,
    passed: bool = True,
    members: int = 4,
    history: tuple[float, float, float] | None = None,
    cores: tuple[float, float] = (1.4, 0.4),
    sockets: int = 1000,
    kib: float = 15.5,
) -> dict[str, Any]:
    acked = offered if acked is None else acked
    server, loadgen = cores
    return {
        "offered_send_rate": offered,
        "offered_deliveries_per_s": offered * members,
        "offered_history_rate": history[0] if history else 0.0,
        "duration_s": 10.0,
        "sockets_connected": sockets,
        "passed": passed,
        "achieved": {"acked_per_s": acked, "deliveries_per_s": acked * members},
        "counts": {"sent": int(offered * 10)},
        "errors": {},
        "latency_ms": {
            "send_reply": _lat(p50, p99),
            "delivery": _lat(p50, p99),
            "history_reply": _lat(*(history[1:] if history else (None, None))),
            "send_lag": _lat(0.01, 0.5),
        },
        "cpu": {"server_cores": server, "loadgen_cores": loadgen, "other_cores": 0.02},
        "cpu_s_window": {"gateway": server * 6, "worker": server * 4, "loadgen": loadgen * 10},
        "memory": {"rss_kb_per_connection": {"gateway": kib}},
        "verification": {"failures": [] if passed else ["lost_deliveries"]},
    }


def _ours(*steps: dict[str, Any], target: str = "ours") -> dict[str, Any]:
    return {"target": target, "steps": list(steps)}


def _by_goal(verdicts: list[dict[str, str]], prefix: str) -> dict[str, str]:
    (hit,) = [v for v in verdicts if v["goal"].startswith(prefix)]
    return hit


def test_chat_sweep_short_of_the_goal_says_by_how_much_and_what_bound_it() -> None:
    steps = [_step(3000, p50=4.0, p99=30.0), _step(4500, acked=4400, p50=20.0, p99=95.0)]
    verdicts = goals.evaluate("chat", {}, [_ours(*steps)], 2, 20_000)
    rate = _by_goal(verdicts, "chat: >=")
    assert rate["status"] == goals.NOT_MET
    assert "3,000 sends/s sustained" in rate["measured"]
    assert "at 4,500 offered sends/s: send_reply p99 95 ms > 50 ms" in rate["measured"]
    assert rate["gap"].startswith("50 % of the goal (3,000 sends/s short)")
    assert rate["bound"].startswith("CPU-bound: the 2 cores were 91 % busy")
    half = _by_goal(verdicts, "chat at 3,000")
    assert half["status"] == goals.NOT_MET
    assert "p50 1.00 ms over" in half["gap"] and "p99 15.00 ms over (2.00x)" in half["gap"]


def test_chat_met_and_untested_goals() -> None:
    met = goals.evaluate("chat", {}, [_ours(_step(3000, p50=2.5, p99=12.0), _step(6000))], 2, 1)
    assert [v["status"] for v in met] == [goals.MET, goals.MET]
    low = goals.evaluate("chat", {}, [_ours(_step(500))], 2, 1)
    assert [v["status"] for v in low] == [goals.NOT_TESTED, goals.NOT_TESTED]
    assert "--sweep-rates 3000,4500,6000" in low[0]["bound"]
    # A loss fails the rate goal even below it, and the latency goal at that rate.
    lossy = goals.evaluate("chat", {}, [_ours(_step(3000, passed=False))], 2, 1)
    assert lossy[0]["status"] == goals.NOT_MET and "integrity" in lossy[0]["measured"]
    assert lossy[1]["status"] == goals.NOT_MET and "verification" in lossy[1]["measured"]


def test_rooms_against_peers() -> None:
    def rooms(*p99_by_rate: tuple[float, float], target: str = "ours") -> dict[str, Any]:
        return _ours(*(_step(r, members=199, p99=p) for r, p in p99_by_rate), target=target)

    ours = rooms((25, 9.0), (50, 9.0), (302, 33.0))
    peer = rooms((25, 40.0), (50, 120.0), target="socketio")
    verdicts = goals.evaluate("rooms", {"slo_p99_ms": 50.0}, [ours, peer], 2, 1)
    assert _by_goal(verdicts, "rooms: >= 60")["status"] == goals.MET
    ratio = _by_goal(verdicts, "rooms: >= 3x")
    assert ratio["status"] == goals.MET and "(12.1x)" in ratio["measured"]
    # Slower than the peer at a load both ran: not met, whatever the ratio.
    slow = rooms((25, 45.0), (50, 9.0), (302, 33.0))
    verdict = _by_goal(
        goals.evaluate("rooms", {"slo_p99_ms": 50.0}, [slow, peer], 2, 1), "rooms: >= 3x"
    )
    assert verdict["status"] == goals.NOT_MET
    assert verdict["gap"] == "at 25 sends/s ours' p99 45 ms > socketio's 40 ms"
    # In rounds, each side's round with the median p99 at a rate is compared.
    rounds = rooms((25, 45.0), (25, 9.0), (25, 10.0), (50, 9.0), (302, 33.0))
    peer_rounds = rooms((25, 40.0), (25, 8.0), (25, 41.0), (50, 120.0), target="socketio")
    verdict = _by_goal(
        goals.evaluate("rooms", {"slo_p99_ms": 50.0}, [rounds, peer_rounds], 2, 1), "rooms: >= 3x"
    )
    assert verdict["status"] == goals.MET
    # Too small a ratio.
    near = rooms((25, 9.0), (50, 9.0))
    verdict = _by_goal(
        goals.evaluate("rooms", {"slo_p99_ms": 50.0}, [near, peer], 2, 1), "rooms: >= 3x"
    )
    assert verdict["status"] == goals.NOT_MET and verdict["gap"] == "2.0x of the 3x asked"
    # The peer never failed a step: its limit is unknown, so no ratio is claimed.
    easy_peer = rooms((25, 40.0), target="socketio")
    verdicts = goals.evaluate("rooms", {"slo_p99_ms": 50.0}, [ours, easy_peer], 2, 1)
    assert _by_goal(verdicts, "rooms: >= 3x")["status"] == goals.NOT_TESTED
    swamped = rooms((25, 90.0), target="socketio")
    verdicts = goals.evaluate("rooms", {"slo_p99_ms": 50.0}, [ours, swamped], 2, 1)
    assert _by_goal(verdicts, "rooms: >= 3x")["status"] == goals.NOT_TESTED
    alone = goals.evaluate("rooms", {"slo_p99_ms": 50.0}, [rooms((100, 9.0))], 2, 1)
    assert _by_goal(alone, "rooms: >= 60")["status"] == goals.NOT_TESTED
    assert _by_goal(alone, "rooms: >= 3x")["status"] == goals.NOT_TESTED


def test_idle_blocked_by_the_descriptor_limit_and_memory_judged() -> None:
    step = _step(0, sockets=39_000, kib=15.5)
    verdicts = goals.evaluate("idle", {"gateways": 2}, [_ours(step)], 2, 20_000)
    count = _by_goal(verdicts, "idle: >= 50,000")
    assert count["status"] == goals.BLOCKED and "hard limit is 20,000" in count["bound"]
    assert _by_goal(verdicts, "idle: <= 16")["status"] == goals.MET
    roomy = goals.evaluate("idle", {"gateways": 1}, [_ours(_step(0, kib=17.0))], 2, 1 << 20)
    assert _by_goal(roomy, "idle: >= 50,000")["status"] == goals.NOT_TESTED
    fat = _by_goal(roomy, "idle: <= 16")
    assert fat["status"] == goals.NOT_MET and fat["gap"] == "1.0 KiB over (1.06x)"


def test_history_judged_only_at_the_goals_rate_and_chat_size() -> None:
    step = _step(100, history=(500.0, 2.7, 8.4), cores=(0.96, 0.12))
    verdict = goals.evaluate("history", {"history_prefill": 1_000_000}, [_ours(step)], 2, 1)[0]
    assert verdict["status"] == goals.NOT_MET
    assert verdict["gap"] == "p50 0.70 ms over (1.35x)"
    assert verdict["bound"].startswith("not CPU-saturated: the 2 cores were 55 % busy")
    assert "cores by process kind: gateway 0.58, worker 0.38, loadgen 0.12" in verdict["bound"]
    small = goals.evaluate("history", {"history_prefill": 20_000}, [_ours(step)], 2, 1)[0]
    assert small["status"] == goals.NOT_TESTED
    fast = _step(100, history=(500.0, 1.8, 9.0))
    ok = goals.evaluate("history", {"history_prefill": 1_000_000}, [_ours(fast)], 2, 1)[0]
    assert ok["status"] == goals.MET
    # How often each reader comes back is part of what was measured.
    params = {"history_prefill": 1_000_000, "history_readers": 5000}
    fleet = goals.evaluate("history", params, [_ours(fast)], 2, 1)[0]
    assert fleet["measured"] == "p50 1.8 ms, p99 9 ms (5,000 readers, each asking every 10 s)"
    # With the chain floor in the run: what its pages took at the goal's rate.
    floor = _ours(_step(100, history=(500.0, 1.74, 5.53), cores=(0.71, 0.12)), target="chain")
    both = goals.evaluate("history", {"history_prefill": 1_000_000}, [_ours(step), floor], 2, 1)
    assert both[0]["bound"].endswith(
        "; chain (the same hops without ours' features) in this run: get_history p50 1.74 ms, "
        "p99 5.53 ms on 0.71 server cores"
    )


def test_a_latency_goal_not_met_says_what_a_request_costs_alone() -> None:
    """The probe's medians go into the bound of a latency goal not met: the floor the
    request stands on, and the stages under it."""

    medians = {
        "gateway": 0.17, "worker": 0.82, "get_history": 1.75, "send_message": 2.04, "push": 2.11,
    }  # fmt: skip
    kinds = {k: {"n": 200, "wrong_replies": {}, "p50": v} for k, v in medians.items()}
    alone = {"rounds": 200, "gap_ms": 2.0, "kinds": kinds}
    step = _step(100, history=(500.0, 2.7, 8.4), cores=(0.96, 0.12))
    ours = {**_ours(step), "probe": alone}
    verdict = goals.evaluate("history", {"history_prefill": 1_000_000}, [ours], 2, 1)[0]
    assert verdict["bound"].endswith(
        "; one request at a time after the load (2 ms apart), a get_history of 50 (the "
        "latest page) took 1.75 ms at the median: the gateway alone answers in 0.17, "
        "through Redis and the worker without MongoDB in 0.82"
    )
    slow = {**_ours(_step(3000, p50=9.0, p99=20.0)), "probe": alone}
    half = _by_goal(goals.evaluate("chat", {}, [slow], 2, 1), "chat at")
    assert (
        "a send_message (to its push at another member) took 2.11 ms at the median" in half["bound"]
    )
    # No probe, or one that failed: the bound says nothing about it.
    plain = goals.evaluate("history", {"history_prefill": 1_000_000}, [_ours(step)], 2, 1)[0]
    assert "one request at a time" not in plain["bound"]
    failed = {**_ours(step), "probe": {"error": "ConnectionError()"}}
    assert (
        "one request at a time"
        not in goals.evaluate("history", {"history_prefill": 1_000_000}, [failed], 2, 1)[0]["bound"]
    )


def test_a_chat_median_not_met_names_what_the_floor_took_at_that_rate() -> None:
    """With the chain target in the run, the bound of the chat latency goal says what the
    same hops took without ours' features, at the goal's rate only."""
    ours = _ours(_step(3000, p50=5.3, p99=14.0, cores=(1.37, 0.35)))
    floor = _ours(
        _step(1500, p50=1.9), _step(3000, p50=2.8, p99=8.5, cores=(1.26, 0.35)), target="chain"
    )
    half = _by_goal(goals.evaluate("chat", {}, [ours, floor], 2, 1), "chat at")
    assert half["status"] == goals.NOT_MET
    assert half["bound"].endswith(
        "; chain (the same hops without ours' features) in this run: delivery p50 2.8 ms, "
        "p99 8.5 ms on 1.26 server cores"
    )
    # The rate goal: what the floor sustained in the same sweep.
    sweep = _ours(_step(3000, p50=5.3), _step(4500, p50=11.0), _step(6000, p99=110.0))
    fast = _ours(
        _step(3000, p50=2.9), _step(4500, p50=5.1), _step(6000, p50=9.0, p99=31.0), target="chain"
    )
    rate = _by_goal(goals.evaluate("chat", {}, [sweep, fast], 2, 1), "chat: >=")
    assert rate["status"] == goals.NOT_MET
    assert rate["bound"].endswith(
        "; chain (the same hops without ours' features) in this run: 6,000 sends/s sustained "
        "(delivery p99 31 ms)"
    )
    # A floor that failed its run, or none: nothing is said of it.
    failed = _ours(_step(3000, p50=2.8, passed=False), target="chain")
    for others in ([], [failed]):
        for verdict in goals.evaluate("chat", {}, [sweep, *others], 2, 1):
            assert "without ours' features" not in verdict["bound"]
    # The goal met: no bound to explain.
    met = _by_goal(
        goals.evaluate("chat", {}, [_ours(_step(3000, p50=2.0)), floor], 2, 1),
        "chat at",
    )
    assert met["status"] == goals.MET


def test_no_verdicts_without_ours() -> None:
    assert goals.evaluate("chat", {}, [_ours(_step(100), target="aiohttp")], 2, 1) == []


def test_a_late_generator_says_how_long_its_own_collector_paused() -> None:
    """A generator that ran late says how much of that was its own collector, when it
    measured it (results from before the meter have no ``loadgen_gc``)."""
    step = _step(3000)
    step["latency_ms"]["send_lag"] = _lat(0.01, 304.4)
    assert goals.load_text(step, 2).endswith(
        "; the load generator itself ran late (send_lag p99 304.4 ms)"
    )
    step["loadgen_gc"] = {"collections": 12, "pause_ms_max": 420.5, "pause_ms_total": 1800.0}
    assert goals.load_text(step, 2).endswith(
        "(send_lag p99 304.4 ms; its longest collector pause 420.5 ms, 1800 ms in all)"
    )
    step["latency_ms"]["send_lag"] = _lat(0.01, 0.5)  # on time: nothing said
    assert "ran late" not in goals.load_text(step, 2)


def test_rounds_are_judged_on_their_median_and_a_failed_round_fails_the_goal() -> None:
    """--rounds: the chat median goal judged on the round with the median p50 (each
    round's p50 said), the floor's figure likewise; a round with loss is the one judged."""
    ours = _ours(_step(3000, p50=5.0), _step(3000, p50=2.5), _step(3000, p50=3.5))
    floor = _ours(
        _step(3000, p50=2.9), _step(3000, p50=2.7, p99=8.0), _step(3000, p50=2.6), target="chain"
    )
    half = _by_goal(goals.evaluate("chat", {}, [ours, floor], 2, 1), "chat at")
    assert half["status"] == goals.NOT_MET
    assert half["measured"] == (
        "p50 3.5 ms, p99 10 ms (the median of 3 rounds by p50; each round's p50: 5, 2.5, 3.5 ms)"
    )
    assert half["gap"] == "p50 0.50 ms over (1.17x)"
    assert (
        "delivery p50 2.7 ms, p99 8 ms on 1.4 server cores (the median of 3 rounds"
        in (half["bound"])
    )
    lossy = _ours(_step(3000, p50=2.0), _step(3000, p50=2.1, passed=False), _step(3000, p50=2.2))
    verdict = _by_goal(goals.evaluate("chat", {}, [lossy], 2, 1), "chat at")
    assert verdict["status"] == goals.NOT_MET
    assert "failed verification" in verdict["measured"]
    assert (
        goals.median_step(lossy["steps"][::2], "delivery")["latency_ms"]["delivery"]["p50"] == 2.0
    )


def test_a_rate_run_in_rounds_is_sustained_when_most_of_its_rounds_were() -> None:
    rate_goal = "chat: >="
    half = _ours(*[_step(3000, p99=p99) for p99 in (20.0, 80.0, 30.0, 90.0)])
    verdict = _by_goal(goals.evaluate("chat", {}, [half], 2, 1), rate_goal)
    assert verdict["status"] == goals.NOT_MET
    assert verdict["measured"].startswith("no step was sustainable; at 3,000 offered sends/s")
    assert verdict["measured"].endswith("(sustainable in 2 of 4 rounds)")
    rounds = ((2990, 20), (3000, 80), (2995, 30), (3000, 25))
    most = _ours(*[_step(3000, acked=a, p99=p) for a, p in rounds])
    verdict = _by_goal(goals.evaluate("chat", {}, [most], 2, 1), rate_goal)
    assert verdict["status"] == goals.NOT_TESTED
    assert verdict["measured"].startswith("2,995 sends/s sustained")
