"""Checks of the scale harness itself: its verifier, wire codecs, workloads, and one
short end-to-end run against the in-memory aiohttp peer (no Redis, no MongoDB)."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.scale import harness, machine
from tests.scale import report as reporting
from tests.scale.common import (
    LatencyLog,
    encode_hist,
    make_text,
    merge_encoded,
    msg_key,
    new_hist,
    parse_text,
    record,
    slowest_seconds,
    split_key,
    summarize,
    with_query,
)
from tests.scale.procs import TREE_TTL, Supervisor, descendants, process_tree
from tests.scale.verify import verify
from tests.scale.workloads import chat_workload, rooms_workload, with_rate

ROOT = Path(__file__).resolve().parents[2]


def _client(gid: int, chats: list[str], **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "gid": gid,
        "user_id": f"u{gid}",
        "connected": True,
        "chats": chats,
        "recv_ids": {c: [] for c in chats},
        "recv_keys": {c: [] for c in chats},
        "acked": [],
    }
    base.update(kw)
    return base


def _result(clients: list[dict[str, Any]], **counts: int) -> dict[str, Any]:
    return {"clients": clients, "counts": {"sent": 0, **counts}, "unanswered": {}}


def test_text_round_trip_and_keys() -> None:
    text = make_text(123456789, 42, 7, 10)
    assert parse_text(text) == (123456789, 42, 7)
    assert parse_text("hello") is None
    assert split_key(msg_key(42, 7)) == (42, 7)


def test_histograms_merge_and_summarize() -> None:
    a, b = new_hist(), new_hist()
    for v in range(1, 1001):
        record(a, v)
    record(b, 10**12)  # clamped to the histogram's maximum
    merged = merge_encoded([encode_hist(a), encode_hist(b)])
    s = summarize(merged)
    assert s["count"] == 1001
    assert 0.49 <= s["p50"] <= 0.51
    assert s["max"] >= 600_000


def test_latency_log_folds_to_the_same_histogram() -> None:
    direct, folded = new_hist(), new_hist()
    log = LatencyLog(folded)
    values = [0, 1, 7, 7, 250, 999, 12_345, 10**12, *range(1, 5000, 3)]
    for v in values:
        record(direct, v)
        log.append(v)
    assert folded.get_total_count() == 0  # nothing recorded until the fold
    log.fold()
    assert folded.get_total_count() == direct.get_total_count() == len(values)
    for p in (1.0, 50.0, 99.0, 99.9, 100.0):
        assert folded.get_value_at_percentile(p) == direct.get_value_at_percentile(p)
    log.fold()  # folding again adds nothing
    assert folded.get_total_count() == len(values)


def test_verify_peers_clean_run_passes() -> None:
    # Chat c: sockets 0 and 1; 0 sends k=1,2, 1 sends k=1.
    a = _client(
        0, ["c"], acked=[["c", None, None, msg_key(0, 1)], ["c", None, None, msg_key(0, 2)]]
    )
    b = _client(1, ["c"], acked=[["c", None, None, msg_key(1, 1)]])
    b["recv_keys"]["c"] = [msg_key(0, 1), msg_key(0, 2)]
    b["recv_ids"]["c"] = [-1, -1]
    a["recv_keys"]["c"] = [msg_key(1, 1)]
    a["recv_ids"]["c"] = [-1]
    out = verify([_result([a, b], sent=3)], None)
    assert out["passed"], out
    assert out["expected_deliveries"] == 3 and out["delivered"] == 3


def test_verify_peers_detects_loss_duplicates_and_reordering() -> None:
    a = _client(0, ["c"], acked=[["c", None, None, msg_key(0, k)] for k in (1, 2, 3)])
    b = _client(1, ["c"])
    b["recv_keys"]["c"] = [msg_key(0, 2), msg_key(0, 1), msg_key(0, 1)]
    b["recv_ids"]["c"] = [-1, -1, -1]
    out = verify([_result([a, b], sent=3)], None)
    assert not out["passed"]
    assert out["lost_deliveries"] == 1  # k=3 never arrived
    assert out["duplicate_deliveries"] == 1
    assert out["out_of_order_per_sender"] >= 1


def test_verify_against_storage() -> None:
    tag = "s0"
    a = _client(
        0,
        ["c"],
        acked=[["c", 1, f"{tag}-0-1", msg_key(0, 1)], ["c", 2, f"{tag}-0-2", msg_key(0, 2)]],
    )
    b = _client(1, ["c"])
    b["recv_keys"]["c"] = [msg_key(0, 1), msg_key(0, 2)]
    b["recv_ids"]["c"] = [1, 2]
    stored = {"c": [(1, f"{tag}-0-1"), (2, f"{tag}-0-2")]}
    assert verify([_result([a, b], sent=2)], stored)["passed"]

    # The second acknowledged message is missing from storage: loss.
    out = verify([_result([a, b], sent=2)], {"c": [(1, f"{tag}-0-1")]})
    assert "acked_not_stored" in out["failures"]

    # Ids delivered out of order.
    b["recv_ids"]["c"] = [2, 1]
    b["recv_keys"]["c"] = [msg_key(0, 2), msg_key(0, 1)]
    out = verify([_result([a, b], sent=2)], stored)
    assert "out_of_order_ids" in out["failures"]


def test_a_push_decoded_once_is_counted_for_every_member() -> None:
    """A room's push is decoded once and handed to each member's socket as the same
    objects: each member logs the delivery, the message's id and its key, and a push
    the generator did not write is counted unparsed for each member that gets it."""
    from tests.scale.loadgen import LoadGen

    specs = [
        {"gid": g, "user_id": f"u{g}", "token": "t", "url": 0, "chats": ["room"]} for g in (1, 2)
    ]
    gen = LoadGen({"run_tag": "t", "clients": specs, "urls": ["ws://x/ws"]})
    sched = 1_000_000_000
    message = {"id": "7", "chat_id": "room", "text": make_text(sched, 5, 3, 0)}
    push = {"type": "success", "messages": [message]}
    for client in gen.clients:
        gen.on_frame(client, push, sched + 2_000_000)
    assert gen.stats.counts["deliveries"] == 2
    for client in gen.clients:
        assert list(client.recv_ids["room"]) == [7]
        assert list(client.recv_keys["room"]) == [msg_key(5, 3)]
    stray = {"type": "success", "messages": [{"id": "8", "chat_id": "room", "text": "hi"}]}
    for client in gen.clients:
        gen.on_frame(client, stray, sched)
    assert gen.stats.counts["push_unparsed"] == 2
    assert gen.stats.counts["deliveries"] == 2


def test_socketio_adapter_decodes_engineio_packets() -> None:
    from tests.scale.loadgen import SocketIOAdapter

    adapter = SocketIOAdapter()
    reply = adapter.decode(None, b'4312[{"type":"success","messages":[]}]')  # type: ignore[arg-type]
    assert reply == [{"type": "success", "messages": [], "request_id": "12"}]
    push = adapter.decode(None, b'42["message",{"type":"success","messages":[{"id":null}]}]')  # type: ignore[arg-type]
    assert push == [{"type": "success", "messages": [{"id": None}]}]
    assert adapter.decode(None, b"40{}") == []  # type: ignore[arg-type]


def test_workloads_shape_and_rates() -> None:
    chat = chat_workload(100, 5, 50.0, endpoints=2)
    assert len(chat.clients) == 100 and len(chat.chats) == 20
    assert sum(r for c in chat.clients for _, r, _ in c["sends"]) == pytest.approx(50.0)
    rooms = rooms_workload(400, 200, 2, 10.0, endpoints=2)
    senders = [c for c in rooms.clients if c["sends"]]
    assert len(rooms.chats) == 2 and len(senders) == 4
    faster = with_rate(chat, 200.0)
    assert sum(r for c in faster.clients for _, r, _ in c["sends"]) == pytest.approx(200.0)


@pytest.mark.timeout(120)
def test_report_says_what_ours_waited_for_before_acknowledging() -> None:
    assert with_query("mongodb://h/chat", "") == "mongodb://h/chat"
    assert with_query("mongodb://h/chat", "journal=false") == "mongodb://h/chat?journal=false"
    assert with_query("mongodb://h/chat?a=1", "?w=1") == "mongodb://h/chat?a=1&w=1"
    assert reporting.write_concern_note("").endswith("write concern j: true.")
    for weaker in ("journal=false", "w=1"):
        assert "a mongod crash can lose the last ~100 ms" in reporting.write_concern_note(weaker)
    assert "lose" not in reporting.write_concern_note("w=majority")


def _short_run(
    tmp_path: Path, target: str, workload: str, *options: str
) -> tuple[Path, dict[str, Any]]:
    """A 2-second run of ``workload`` on ``target`` through the harness: its report folder
    and its result (steps, and ours' probe), with what it printed under ``terminal``."""
    cmd = [
        sys.executable, "-m", "tests.scale.harness", "--targets", target,
        "--workload", workload, *options, "--duration", "2", "--drain", "3",
        "--quiet-wait", "0", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    (report_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith(f"-{workload}")]
    report = json.loads((report_dir / "report.json").read_text())
    result: dict[str, Any] = report["results"][0]
    result["terminal"] = done.stdout + done.stderr  # what the harness printed
    return report_dir, result


def _short_chat_run(tmp_path: Path, target: str) -> tuple[Path, dict[str, Any]]:
    """A 2-second chat run of 40 sockets at 40 sends/s (and ours' probe of 20 rounds)."""
    return _short_run(
        tmp_path, target, "chat", "--sockets", "40", "--rate", "40", "--probe-rounds", "20"
    )


def test_chart_latency_axis_reads_in_plain_milliseconds() -> None:
    """The log axis is labelled 1-2-5 in plain numbers, not as powers of ten."""
    labels = [reporting._one_two_five(v) for v in (0.2, 0.3, 0.5, 1, 6, 20, 50, 60, 100, 0)]
    assert labels == ["0.2", "", "0.5", "1", "", "20", "50", "", "100", ""]


def test_chart_latency_bars_stand_on_a_power_of_ten_below_the_smallest() -> None:
    assert reporting._log_floor([2.27, 3.56, 9.09]) == 1.0
    assert reporting._log_floor([0.289, 184.0]) == pytest.approx(0.1)
    assert reporting._log_floor([10.0, 0.0]) == 10.0  # a missing figure (0) is no bar
    assert reporting._log_floor([0.0]) is None


def test_slowest_seconds_merge_the_generators_and_keep_to_the_window() -> None:
    first = {"0": {"delivery_max_us": 2_000}, "1": {"delivery_max_us": 90_000, "deliveries": 5}}
    second = {
        "1": {"delivery_max_us": 120_500},
        "2": {"deliveries": 3},
        "3": {"delivery_max_us": 7},
    }
    assert slowest_seconds([first, second], duration=3.0, n=2) == [
        {"second": 1, "max_ms": 120.5},  # the slower generator's figure for that second
        {"second": 0, "max_ms": 2.0},
    ]  # second 3 is after the window (the drain): left out
    assert slowest_seconds([], duration=3.0) == []


def test_the_machine_check_times_a_loop_and_a_wake_up_round_trip() -> None:
    """Both figures are measured (not defaults), and the echo child is gone after."""
    before = set(Path("/proc").iterdir())
    speed = machine.check()
    assert 0.1 < speed["python_loop_ms"] < 10_000
    assert 1 < speed["wakeup_round_trip_us"] < 1_000_000
    children = [p for p in set(Path("/proc").iterdir()) - before if p.name.isdigit()]
    assert not [p for p in children if "os.read(0, 1)" in _cmdline(p)]
    assert machine.steal_seconds() >= 0
    line = machine.describe({"before": speed, "after": speed, "steal_cores": 0.0})
    assert f"before the window loop {speed['python_loop_ms']:g} ms, wake-up round trip" in line


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_harness_end_to_end_on_aiohttp_peer(tmp_path: Path) -> None:
    """A 2-second run on the in-memory peer: every process starts, verifies, stops."""
    report_dir, result = _short_chat_run(tmp_path, "aiohttp")
    step = result["steps"][0]
    assert "probe" not in result  # its replies mean other things
    assert step["verification"]["passed"]
    assert step["counts"]["acked"] == step["counts"]["sent"] > 0
    assert step["verification"]["delivered"] == step["verification"]["expected_deliveries"] > 0
    assert (report_dir / "report.md").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (report_dir / "chart.png").exists()


def test_harness_end_to_end_on_ours(tmp_path: Path) -> None:
    """A 2-second run on the real stack (its own Redis, MongoDB, gateways and worker):
    verified against MongoDB, and the servers' own account of where the time went."""
    report_dir, result = _short_chat_run(tmp_path, "ours")
    step = result["steps"][0]
    # The generator's collector pauses in the window are measured (maybe none).
    assert set(step["loadgen_gc"]) == {"collections", "pause_ms_max", "pause_ms_total"}
    # When in the window the tail happened: the slowest seconds, slowest first.
    slowest = [w["max_ms"] for w in step["slowest_seconds"]]
    assert slowest and slowest == sorted(slowest, reverse=True)
    delivery = step["latency_ms"]["delivery"]  # also counts the drain's deliveries
    assert delivery["p50"] <= slowest[0] <= delivery["max"] * 1.01
    assert step["verification"]["passed"]
    assert step["verification"]["stored"] == step["counts"]["acked"] == step["counts"]["sent"] > 0
    times = step["server_time"]
    # ~80 sends in the window, every batch timed, and every insert among them.
    held = times["gateway_request_ms"]["send_message"]
    assert 0 < times["stream_wait_ms"] and 0 < times["batch_ms"]
    # A gateway holds a send through its stream wait and its batch, so the three are the
    # same kind of quantity in the same unit. Not a bound on the sum, though: the batch's
    # timer runs on until the PUBLISH+XACK round trip returns to the worker, which races
    # the reply's way to the gateway; the wait is read on an estimate of Redis's clock;
    # and the means weigh batches and requests differently. (CI once saw held 2.06 ms
    # against 1.42 + 1.35.) A unit or window slip would be off by a factor of 1,000.
    parts = times["stream_wait_ms"] + times["batch_ms"]
    assert parts / 4 < held < parts * 100
    assert times["batches_per_s"] > 0 and times["entries_per_batch"] >= 1
    assert times["mongo_ms"]["insert"] > 0
    assert 0 < times["worker_loop_busy"] < 1
    assert "Time in the servers" in (report_dir / "report.md").read_text()
    # After the load, each kind of request alone: every one answered with its own reply
    # type (a page of 50, a stored send), and timed; every send pushed to the listener.
    alone = result["probe"]["kinds"]
    assert list(alone) == ["gateway", "worker", "get_history", "send_message", "push"]
    for kind in alone.values():
        assert kind["wrong_replies"] == {} and kind["n"] == 20 and kind["p50"] > 0
    assert (
        "| get_history | a page of 50 from MongoDB, read by the gateway (ours) or the worker |"
        in (report_dir / "report.md").read_text()
    )
    assert "ours: one request at a time, 2 ms apart, p50 ms: gateway " in result["terminal"]
    # How fast the machine was, before the window and after the drain.
    speed = step["machine"]
    for when in ("before", "after"):
        assert speed[when]["python_loop_ms"] > 0 and speed[when]["wakeup_round_trip_us"] > 0
    assert speed["steal_cores"] >= 0
    assert "The machine's speed (" in (report_dir / "report.md").read_text()
    assert "  machine: before the window loop " in result["terminal"]


def test_a_worker_killed_in_the_window_loses_nothing(tmp_path: Path) -> None:
    """--kill-worker-at: one of two workers SIGKILLed a second into the window; the other
    takes its partitions over and every send is still acknowledged, stored and
    delivered; the report says so and judges no goal on the run."""
    report_dir, result = _short_run(
        tmp_path, "ours", "chat", "--sockets", "40", "--rate", "40", "--probe-rounds", "0",
        "--workers", "2", "--kill-worker-at", "1",
    )  # fmt: skip
    step = result["steps"][0]
    assert step["fault"]["killed"].startswith("worker-") and step["fault"]["at_s"] >= 1
    assert step["verification"]["passed"]
    assert step["verification"]["stored"] == step["counts"]["acked"] == step["counts"]["sent"] > 0
    assert any("SIGKILLed" in note for note in result["notes"])
    report = json.loads((report_dir / "report.json").read_text())
    assert report["goals"] == []
    assert "SIGKILLed" in (report_dir / "report.md").read_text()


@pytest.mark.parametrize(
    "options",
    [
        ["--kill-worker-at", "1"],  # one worker: nobody to take over
        ["--kill-worker-at", "30", "--workers", "2", "--duration", "10"],  # after the window
        ["--kill-worker-at", "1", "--workers", "2", "--workload", "sweep", "--rate", "100"],
    ],
)
def test_a_worker_kill_the_run_cannot_show_is_refused(options: list[str]) -> None:
    with pytest.raises(SystemExit, match="--kill-worker-at needs"):
        harness.main(options)


def test_only_a_disturbed_step_that_passed_and_killed_no_worker_is_run_again() -> None:
    clean = {"disturbed": False, "passed": True, "fault": None}
    assert not harness.should_repeat(clean)
    assert harness.should_repeat(clean | {"disturbed": True})
    # Its integrity failure stands; and a second run would kill the last worker.
    assert not harness.should_repeat(clean | {"disturbed": True, "passed": False})
    killed = {"killed": "worker-0", "at_s": 1.0}
    assert not harness.should_repeat(clean | {"disturbed": True, "fault": killed})


def test_harness_end_to_end_on_the_chain_floor(tmp_path: Path) -> None:
    """ours' hops without its features: its own Redis, MongoDB, gateways and worker;
    every send stored once (checked in its MongoDB), acknowledged and delivered."""
    report_dir, result = _short_chat_run(tmp_path, "chain")
    step = result["steps"][0]
    assert "probe" not in result and not step.get("server_time")  # it has no /metrics
    verification = step["verification"]
    assert verification["passed"] and verification["storage_checked"]
    assert verification["stored"] == step["counts"]["acked"] == step["counts"]["sent"] > 0
    assert verification["delivered"] == verification["expected_deliveries"] > 0
    assert {"gateway", "worker", "redis", "mongod"} <= set(step["cpu_s_window"])
    assert "ours' hops without its features" in (report_dir / "report.md").read_text()


def test_the_chain_floor_reads_history_pages_through_its_worker(tmp_path: Path) -> None:
    """get_history on the floor makes ours' trip too: every page the right 50 ids of the
    prefilled chat, while sends are stored."""
    _, result = _short_run(
        tmp_path, "chain", "history", "--history-prefill", "300", "--history-readers", "4",
        "--history-rate", "40", "--history-writers", "10", "--rate", "10",
    )  # fmt: skip
    step = result["steps"][0]
    assert step["counts"]["history_ok"] == step["counts"]["history_sent"] > 0
    verification = step["verification"]
    assert verification["passed"] and verification["history_wrong_page"] == 0
    assert verification["stored"] == step["counts"]["acked"] > 0


def test_targets_take_turns_being_measured_first() -> None:
    assert harness.step_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert harness.step_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert harness.step_order(["a", "b"], 2) == ["a", "b"]
    args = harness.parse_args(["--targets", "ours,chain"])
    assert "--rounds 2 or more" in reporting.order_note(args.order, reporting.one_step(args))
    args = harness.parse_args(["--targets", "ours,chain", "--rounds", "2"])
    assert "--rounds 2" not in reporting.order_note(args.order, reporting.one_step(args))


def _headline_step(p50: float, cores: float) -> dict[str, Any]:
    lat = {"p50": p50, "p99": p50 * 3, "p99_9": p50 * 5}
    return {
        "achieved": {"sends_per_s": 100.0, "acked_per_s": 100.0, "deliveries_per_s": 400.0},
        "latency_ms": {"send_reply": lat, "delivery": lat},
        "cpu": {
            "server_cores": cores,
            "server_us_per_delivery": cores * 2500,
            "server_us_per_send": cores * 10_000,
            "server_us_per_socket_second": None,
        },
        "memory": {"rss_kb_per_connection": {"gateway": 10.0}},
    }


def test_rounds_compare_each_round_with_its_partner_and_take_the_median() -> None:
    """ours / peer with --rounds: each round's ratio (the two steps measured back to
    back), the median of those; without rounds, the last steps'."""
    ours = {"target": "ours", "steps": [_headline_step(p, 1.0) for p in (4.0, 9.0, 5.0)]}
    peer = {"target": "chain", "steps": [_headline_step(p, 0.5) for p in (2.0, 3.0, 4.0)]}
    paired = reporting.ratios([ours, peer], rounds=True)["chain"]
    assert paired["delivery_p50_ms"] == 2.0  # rounds 2.0, 3.0, 1.25
    assert paired["server_cores"] == 2.0
    assert paired["server_us_per_socket_second"] is None
    assert reporting.ratios([ours, peer])["chain"]["delivery_p50_ms"] == 1.25
    assert reporting.ratios([peer]) == {}


def test_a_chart_of_rounds_draws_each_targets_median_round() -> None:
    ours = {"target": "ours", "steps": [_headline_step(p, 1.0) for p in (4.0, 9.0, 5.0)]}
    for step in ours["steps"]:
        step["passed"] = True
    report = {"workload": "chat", "base_workload": "chat", "params": {"rounds": 3}}
    (drawn,) = reporting.charted(dict(report, results=[ours]))
    assert [s["latency_ms"]["delivery"]["p50"] for s in drawn["steps"]] == [5.0]
    single = dict(report, params={"rounds": 1}, results=[ours])
    assert reporting.charted(single)[0]["steps"] == ours["steps"]


@pytest.mark.parametrize("options", [["--workload", "sweep", "--rounds", "2"], ["--rounds", "0"]])
def test_rounds_that_mean_nothing_are_refused(options: list[str]) -> None:
    with pytest.raises(SystemExit):
        harness.parse_args(options)


def _two_peers_two_rates(tmp_path: Path) -> list[str]:
    """A sweep of two short steps (20 and 30 sends/s, 1 s each) on the two light peers,
    interleaved; every step sustainable whatever the machine's speed."""
    return [
        sys.executable, "-m", "tests.scale.harness", "--targets", "aiohttp,socketio",
        "--workload", "sweep", "--sweep-rates", "20,30", "--sockets", "20",
        "--slo-p99-ms", "10000", "--duration", "1", "--drain", "3", "--quiet-wait", "0",
        "--out", str(tmp_path), "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip


def test_an_interleaved_run_measures_each_rate_on_every_target_in_turn(tmp_path: Path) -> None:
    """--order interleaved (the default with several targets): both targets up from the
    start, each rate run on both before the next, the second rate in the reverse order,
    and the idle target's CPU in each window reported."""
    cmd = _two_peers_two_rates(tmp_path)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    (report_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith("-sweep")]
    report = json.loads((report_dir / "report.json").read_text())
    steps = [step for result in report["results"] for step in result["steps"]]
    assert all(step["passed"] for step in steps) and len(steps) == 4
    by_start = sorted(steps, key=lambda step: step["window_start_unix"])
    assert [(s["target"], s["offered_send_rate"]) for s in by_start] == [
        ("aiohttp", 20), ("socketio", 20), ("socketio", 30), ("aiohttp", 30),
    ]  # fmt: skip
    for step in steps:
        other = {"aiohttp": "socketio", "socketio": "aiohttp"}[step["target"]]
        assert set(step["cpu"]["parked_cores"]) == {other}
        assert step["cpu"]["parked_cores"][other] >= 0
        assert set(step["parked_cpu_s_window"]) == {other}
    assert by_start[0]["order"] == {"position": 1, "targets": ["aiohttp", "socketio"]}
    assert by_start[2]["order"] == {"position": 1, "targets": ["socketio", "aiohttp"]}
    notes = (report_dir / "report.md").read_text()
    assert "Targets interleaved" in notes and "With one step each" not in notes
    assert "| 30 (step 2, measured 1st of 2) |" in notes  # socketio's second step


def test_a_report_says_when_it_measured_uncommitted_code(tmp_path: Path) -> None:
    """The commit, and whether tracked files differed from it (untracked ones do not:
    reports and data folders are ignored or new)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
        return done.stdout.decode().strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    rev = git("rev-parse", "--short", "HEAD")
    (tmp_path / "new.txt").write_text("untracked\n")
    assert reporting.git_rev(tmp_path) == rev
    (tmp_path / "code.py").write_text("x = 2\n")
    assert reporting.git_rev(tmp_path) == f"{rev} with uncommitted changes"
    assert reporting.git_rev(tmp_path / "not-a-repo") == ""


# A parent that starts a child; the child spends ~0.3 s of CPU, then both wait (the
# child until its parent has gone).
_FORKING = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", '''
import os, time
parent = os.getppid()
start = time.process_time()
while time.process_time() - start < 0.3:
    pass
while os.getppid() == parent:  # ends with its parent
    time.sleep(0.1)
'''])
time.sleep(60)
"""


def test_a_tracked_process_counts_its_childrens_cpu_as_found_by_one_scan(tmp_path: Path) -> None:
    """The harness's once-a-second sample reads /proc for its processes' children at
    most every TREE_TTL seconds (one scan of every process's stat file costs ~2 ms of
    the cores it measures), and still counts a forking server's children."""
    sup = Supervisor(tmp_path, 120)
    try:
        parent = sup.spawn("parent", "server", [sys.executable, "-c", _FORKING])
        deadline = time.monotonic() + 10
        while not descendants(parent.pid, process_tree()):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        deadline = time.monotonic() + TREE_TTL + 10
        while sup.sample()[parent.pid]["cpu_s"] < 0.3:
            assert time.monotonic() < deadline, "the child's CPU was never counted"
            time.sleep(0.2)
    finally:
        sup.close()


def test_a_baseline_runs_the_code_of_its_revision(tmp_path: Path) -> None:
    """ours@REV: its gateways and workers run from REV's files (exported with git
    archive), measured by this harness beside ours; the export goes with the run's data."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    report_dir, result = _short_run(
        tmp_path, "ours@HEAD", "chat", "--sockets", "20", "--rate", "20", "--probe-rounds", "0",
        "--keep-data",
    )  # fmt: skip
    assert result["target"] == "ours@HEAD" and result["code_commit"] == head
    step = result["steps"][0]
    assert step["verification"]["passed"] and step["verification"]["storage_checked"]
    assert step["server_time"] is not None  # its /metrics read as ours' are
    (code,) = (tmp_path / "data").glob("*/ours@HEAD/code")
    for name in ("gateway/__main__.py", "worker/__main__.py", "shared/config.py"):
        shown = subprocess.run(
            ["git", "show", f"HEAD:{name}"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        assert (code / name).read_bytes() == shown
    assert f"at git {head[:12]}" in (report_dir / "report.md").read_text()
    with pytest.raises(SystemExit):
        harness.choose_targets(harness.parse_args(["--targets", "ours@no-such-revision"]))


def test_a_process_runs_in_and_imports_from_the_code_it_is_given(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "marker_module.py").write_text("WHERE = 'the given tree'\n")
    sup = Supervisor(tmp_path / "run", 60)
    try:
        proc = sup.spawn(
            "p", "server",
            [sys.executable, "-c", "import os, marker_module; print(os.getcwd(), marker_module.WHERE)"],
            code=code,
        )  # fmt: skip
        assert proc.popen.wait(30) == 0
    finally:
        sup.close()
    assert proc.log_path.read_text().strip() == f"{code} the given tree"


def test_an_interrupted_run_reports_the_steps_it_measured(tmp_path: Path) -> None:
    """SIGTERM after the first step of an interleaved run: every process is stopped, the
    exit status is 130, and the report holds the step that was measured."""
    cmd = _two_peers_two_rates(tmp_path)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if "aiohttp chat @20/s: sustainable" in line:
                proc.send_signal(signal.SIGTERM)
                break
        proc.stdout.read()
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    (report_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith("-sweep")]
    report = json.loads((report_dir / "report.json").read_text())
    assert report["interrupted"] is True
    measured = {
        r["target"]: [s["offered_send_rate"] for s in r["steps"]] for r in report["results"]
    }
    assert measured["aiohttp"] == [20]
