"""report.json, report.md, chart.png and the terminal summary of a scale run."""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from shared.mongo import client_options
from tests.scale import goals, machine
from tests.scale import probe as probing
from tests.scale.common import fd_limit, with_query
from tests.scale.procs import ROOT

LAT_KEYS = ("p50", "p90", "p99", "p99_9", "max")


def git_rev(root: Path = ROOT) -> str:
    """The commit measured, and whether the tracked files differed from it: a figure taken
    on uncommitted code cannot be repeated from the commit alone."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
        return done.stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{rev} with uncommitted changes" if rev and changed else rev


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in (
        "aiohttp", "orjson", "redis", "pymongo", "uvloop", "hdrhistogram", "python-socketio",
        "python-engineio", "channels", "channels-redis", "Django", "uvicorn", "wsproto", "websockets",
    ):  # fmt: skip
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _machine() -> dict[str, Any]:
    import os

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def headline(step: dict[str, Any]) -> dict[str, Any]:
    """The figures compared across targets."""
    lat = step["latency_ms"]
    return {
        "sends_per_s": step["achieved"]["sends_per_s"],
        "acked_per_s": step["achieved"]["acked_per_s"],
        "deliveries_per_s": step["achieved"]["deliveries_per_s"],
        "reply_p50_ms": lat["send_reply"]["p50"],
        "reply_p99_ms": lat["send_reply"]["p99"],
        "delivery_p50_ms": lat["delivery"]["p50"],
        "delivery_p99_ms": lat["delivery"]["p99"],
        "delivery_p99_9_ms": lat["delivery"]["p99_9"],
        "server_cores": step["cpu"]["server_cores"],
        "server_us_per_delivery": step["cpu"]["server_us_per_delivery"],
        "server_us_per_send": step["cpu"]["server_us_per_send"],
        "server_us_per_socket_second": step["cpu"]["server_us_per_socket_second"],
        "rss_kb_per_connection": _server_per_conn(step),
    }


def _server_per_conn(step: dict[str, Any]) -> float | None:
    per = step["memory"]["rss_kb_per_connection"]
    vals = [v for k, v in per.items() if k in ("gateway", "peer")]
    return round(sum(vals), 2) if vals else None


def ratios(
    results: list[dict[str, Any]], rounds: bool = False
) -> dict[str, dict[str, float | None]]:
    """ours / peer for each headline figure: of the last step of each target, or with
    ``rounds`` (every step at the same rate) the median of the rounds' ratios, each round
    ours' step over the peer's step of the same round (both measured close in time)."""
    by = {r["target"]: r for r in results if r.get("steps")}
    if "ours" not in by:
        return {}
    ours_steps = by["ours"]["steps"] if rounds else by["ours"]["steps"][-1:]
    out: dict[str, dict[str, float | None]] = {}
    for name, r in by.items():
        if name == "ours":
            continue
        pairs = list(zip(ours_steps, r["steps"] if rounds else r["steps"][-1:], strict=False))
        row: dict[str, float | None] = {}
        for key in headline(ours_steps[-1]):
            values = []
            for mine, theirs in pairs:
                value, other = headline(mine)[key], headline(theirs)[key]
                if value is not None and other:
                    values.append(value / other)
            row[key] = round(statistics.median(values), 3) if values else None
        out[name] = row
    return out


def rounds_of(workload: str, params: dict[str, Any]) -> int:
    """How many times each target ran its step at one rate (``--rounds``; 1 in a sweep,
    where each rate is run once)."""
    return 1 if workload == "sweep" else int(params.get("rounds", 1))


def one_step(args: argparse.Namespace) -> bool:
    """Whether each target ran a single step (one rate, one round)."""
    return args.workload != "sweep" and rounds_of(args.workload, vars(args)) == 1


def order_note(order: str, single: bool = False) -> str:
    """How the targets' steps were ordered (the machine drifts over a run: whichever
    target is measured second tends to come out slower); ``single``: one step each."""
    if order == "interleaved":
        return (
            "Targets interleaved: every target was started first, each step (offered rate, "
            "round) was run on every target before the next, in the order given and then "
            "reversed at each step (A B, B A, ...); the targets not measured were up and "
            "idle, and their CPU in a window ('parked') is part of its 'other cores'."
            + (
                " With one step each, they ran in the order given: --rounds 2 or more "
                "measures each first as often as last."
                if single
                else ""
            )
        )
    return (
        "Targets run one after the other, each stopped before the next started: the machine's "
        "drift over the run falls on the later targets (repeat with the targets in the other "
        "order, or with --order interleaved)."
    )


def write_concern_note(options: str) -> str:
    """What ours waited for before it acknowledged a message, as the worker's client says."""
    url = with_query("mongodb://127.0.0.1/chat", options)
    client: MongoClient[dict[str, Any]] = MongoClient(url, connect=False, **client_options(url))
    document = client.write_concern.document
    client.close()
    said = ", ".join(f"{k}: {json.dumps(v)}" for k, v in document.items()) or "w: 1 (the default)"
    journaled = document.get("j") is True or document.get("w") == "majority"
    return (
        f"Ours acknowledges a message once a standalone mongod stored it with write concern "
        f"{said}"
        + ("" if journaled else ": not journaled, so a mongod crash can lose the last ~100 ms")
        + "."
    )


def build(
    args: argparse.Namespace,
    workload: str,
    targets: list[str],
    results: list[dict[str, Any]],
    command: str,
    wall_s: float,
) -> dict[str, Any]:
    report = {
        "workload": args.workload,
        "base_workload": workload,
        "command": command,
        "git_rev": git_rev(),
        "machine": _machine(),
        "versions": _versions(),
        "params": vars(args),
        "targets": targets,
        "wall_s": round(wall_s, 1),
        "results": results,
        "ratios_ours_over_peer": ratios(results, rounds=rounds_of(args.workload, vars(args)) > 1),
        "notes": [
            "Peers persist nothing, assign no durable ids and check no token; the gateway "
            "authenticates every request, stores every message in MongoDB and assigns per-chat ids.",
            *(
                f"{name} is not a peer but ours' hops without its features: it stores every "
                "message as ours does (checked in its MongoDB) and checks no token."
                for name in targets
                if name in goals.FLOORS
            ),
            *(
                f"{r['target']} is ours' gateway and worker as they were at git "
                f"{r['code_commit'][:12]}, started, seeded and driven by this run's harness "
                "(a revision whose storage layout differs from this one's is not comparable)."
                for r in results
                if r.get("code_commit")
            ),
            write_concern_note(getattr(args, "mongo_options", "")),
            "Open loop: latency is measured from each send's scheduled time (no coordinated omission); "
            "send_lag is how late the load generator itself was.",
            "Load generators and servers share the same 2 cores; loadgen CPU is reported separately. "
            "'other cores' is CPU used during the window by processes outside the run (e.g. other "
            "tests on the machine): when it is high, the step's latencies are disturbed.",
            *([order_note(args.order, one_step(args))] if len(targets) > 1 else []),
        ],
    }
    if args.workload == "sweep":
        report["sustainable_send_rate"] = {
            r["target"]: r.get("sustainable_send_rate") for r in results
        }
    report["goals"] = goals.evaluate(
        workload, vars(args), results, report["machine"]["cpus"] or 1, fd_limit()
    )
    judged = [r for r in results if r["target"] == "ours"] or results
    report["passed"] = bool(judged) and all(r.get("passed") for r in judged)
    report["verdict_basis"] = (
        "ours" if any(r["target"] == "ours" for r in results) else "all targets"
    )
    return report


def write(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "report.md").write_text(markdown(report))
    try:
        chart(report, out_dir / "chart.png")
    except Exception as exc:
        (out_dir / "chart-error.txt").write_text(repr(exc))


def _offered(step: dict[str, Any]) -> str:
    """A step's offered rate, with its round when the target ran several (``--rounds``:
    steps s0, s1, ...) and the position it was measured in among the targets."""
    text = _fmt(step["offered_send_rate"])
    order = step.get("order")
    if order and len(order["targets"]) > 1:
        index = int(step["tag"][1:].split("r")[0]) + 1  # s<index>[r<retry>]
        position = {1: "1st", 2: "2nd", 3: "3rd"}.get(order["position"], f"{order['position']}th")
        text += f" (step {index}, measured {position} of {len(order['targets'])})"
    return text


def _other_cores(cpu: dict[str, Any]) -> str:
    """The step's 'other cores', with the share of the run's idle targets when any."""
    other = cpu.get("other_cores")
    if other is None:
        return "-"
    parked = cpu.get("parked_cores") or {}
    if not parked:
        return str(other)
    return f"{other} (parked {round(sum(parked.values()), 3)})"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Scale run: {report['workload']}", ""]
    lines += [f"Command: `{report['command']}`", ""]
    m = report["machine"]
    lines += [
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, kernel {m['kernel']}; "
        f"git {report['git_rev']}; wall time {report['wall_s']} s.",
        "",
        f"Verdict ({report['verdict_basis']}): **{'PASSED' if report['passed'] else 'FAILED'}**"
        + (" (interrupted)" if report.get("interrupted") else ""),
        "",
    ]
    for r in report["results"]:
        lines += [f"## {r['target']}", "", r.get("description", ""), ""]
        for note in r.get("notes", []):
            lines.append(f"- {note}")
        if r.get("setup_error"):
            lines += ["", "Setup failed:", "", "```", r["setup_error"][-3000:], "```", ""]
            continue
        if r.get("sustainable_send_rate") is not None or report["workload"] == "sweep":
            bound = "" if r.get("sweep_limit_reached") else " (no step failed: the limit is higher)"
            lines += [
                "",
                f"Sustainable send rate: **{_fmt(r.get('sustainable_send_rate'))}/s**{bound}",
            ]
        lines.append("")
        lines.append(
            "| offered sends/s | sends/s | acked/s | deliveries/s | history/s | server cores | "
            "loadgen cores | other cores | CPU-µs/send | CPU-µs/delivery | loadgen µs/delivery | verdict |"
        )
        lines.append("|" + "---|" * 12)
        for s in r["steps"]:
            a, c = s["achieved"], s["cpu"]
            verdict = "pass" if s["passed"] else "FAIL " + ",".join(s["verification"]["failures"])
            if s.get("disturbed"):
                verdict += "; DISTURBED by other processes"
            if "sustainable" in s:
                verdict += "; " + ("sustainable" if s["sustainable"] else s["verdict"])
            lines.append(
                f"| {_offered(s)} | {a['sends_per_s']} | {a['acked_per_s']} | "
                f"{a['deliveries_per_s']} | {a['history_per_s']} | {c['server_cores']} | "
                f"{c['loadgen_cores']} | {_other_cores(c)} | {_fmt(c['server_us_per_send'])} | "
                f"{_fmt(c['server_us_per_delivery'])} | {_fmt(c['loadgen_us_per_delivery'])} | {verdict} |"
            )
        lines += ["", "Latency (ms, from the scheduled send time):", ""]
        lines.append("| offered | kind | count | p50 | p90 | p99 | p99.9 | max |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for s in r["steps"]:
            for kind in ("send_reply", "delivery", "history_reply", "join_reply", "send_lag"):
                h = s["latency_ms"][kind]
                if not h["count"]:
                    continue
                lines.append(
                    f"| {_offered(s)} | {kind} | {h['count']} | "
                    + " | ".join(_fmt(h[k]) for k in LAT_KEYS)
                    + " |"
                )
        last = r["steps"][-1] if r["steps"] else None
        if last:
            lines += [
                "",
                "Errors by type: " + (json.dumps(last["errors"]) if last["errors"] else "none"),
            ]
            if last["unanswered"]:
                lines.append(
                    f"Unanswered at the end of the drain: {json.dumps(last['unanswered'])}"
                )
            slowest = last.get("slowest_seconds") or []
            if slowest:
                lines.append(
                    "Slowest seconds of the window (second since the start: its slowest "
                    "delivery): " + ", ".join(f"{w['second']}: {w['max_ms']:g} ms" for w in slowest)
                )
            pauses = last.get("loadgen_gc") or {}
            if pauses.get("collections"):
                lines.append(
                    f"Load generator's collector in the window: {pauses['collections']} "
                    f"collections, the longest {pauses['pause_ms_max']:g} ms, "
                    f"{pauses['pause_ms_total']:g} ms in all (a pause delays its sends and "
                    "reads, and shows as latency)"
                )
            lines += [
                "",
                "CPU seconds in the measured window, by process kind: "
                + json.dumps(last["cpu_s_window"]),
            ]
            if last.get("machine"):
                lines += [
                    "",
                    f"The machine's speed ({machine.MEANING}): {machine.describe(last['machine'])}",
                ]
            if last.get("server_time"):
                lines += [
                    "",
                    "Time in the servers, means over the measured window from their /metrics "
                    "(ms; a gateway's request time is frame received -> reply written): "
                    + json.dumps(last["server_time"]),
                ]
            if r.get("probe"):
                lines += ["", *probing.markdown(r["probe"])]
            lines += [
                "",
                "RSS growth per connected socket (KiB): "
                + json.dumps(last["memory"]["rss_kb_per_connection"]),
                "",
                "| process | kind | peak RSS MiB | RSS MiB at end |",
                "|---|---|---|---|",
            ]
            for name, p in sorted(last["memory"]["processes"].items()):
                lines.append(f"| {name} | {p['kind']} | {p['peak_rss_mb']} | {p['rss_mb']} |")
            v = last["verification"]
            keys = [
                "sockets", "sockets_connected", "sent", "acked", "stored", "stored_not_acked",
                "expected_deliveries", "delivered", "lost_deliveries", "duplicate_deliveries",
                "out_of_order_ids", "out_of_order_per_sender", "acked_not_stored", "unanswered",
                "connect_failed", "join_failed", "disconnects",
            ]  # fmt: skip
            lines += [
                "",
                "Verification"
                + (
                    " (against MongoDB)"
                    if v["storage_checked"]
                    else " (no storage: acks vs deliveries)"
                )
                + ":",
                "",
            ]
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            lines.append("| " + " | ".join(_fmt(v.get(k, 0)) for k in keys) + " |")
            if v["failures"]:
                lines += [
                    "",
                    f"FAILED checks: {v['failures']}; examples: `{json.dumps(v['examples'])[:1500]}`",
                ]
        lines.append("")
    if report.get("goals"):
        lines += [
            "## Goals",
            "",
            "The project's published goals this workload can show (2 cores, loadgen on the "
            "same box), judged on ours:",
            "",
            "| goal | status | measured | by how much | what bounds it |",
            "|---|---|---|---|---|",
        ]
        for g in report["goals"]:
            lines.append(
                f"| {g['goal']} | **{g['status']}** | {g['measured']} | {g['gap'] or '-'} | "
                f"{g['bound'] or '-'} |"
            )
        lines.append("")
    rat = report.get("ratios_ours_over_peer")
    if rat:
        keys = list(next(iter(rat.values())).keys())
        n = rounds_of(report["workload"], report["params"])
        what = (
            f"median over {n} rounds of each round's ratio"
            if n > 1
            else "ratio of the last step's figures"
        )
        lines += [f"## ours / peer ({what})", ""]
        lines.append("| peer | " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * (len(keys) + 1))
        for name, row in rat.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row[k]) for k in keys) + " |")
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def charted(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The results the chart draws: those with steps, and of rounds at one rate
    (``--rounds``) each target's median round only, the one the goals judge."""
    results = [r for r in report["results"] if r.get("steps")]
    if rounds_of(report["workload"], report["params"]) == 1:
        return results
    judged = "history_reply" if report["base_workload"] == "history" else "delivery"
    return [dict(r, steps=[goals.median_step(r["steps"], judged)]) for r in results]


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    results = charted(report)
    if not results:
        return
    rounds = rounds_of(report["workload"], report["params"])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5))
    kinds = ["gateway", "worker", "peer", "redis", "mongod", "loadgen"]
    colors = {
        "ours": "tab:blue",
        "socketio": "tab:orange",
        "channels": "tab:green",
        "aiohttp": "tab:red",
    }
    multi = any(len(r["steps"]) > 1 for r in results)
    if report["base_workload"] == "idle":
        names = [r["target"] for r in results]
        rss = [_server_per_conn(r["steps"][-1]) or 0 for r in results]
        cpu = [r["steps"][-1]["cpu"]["server_us_per_socket_second"] or 0 for r in results]
        ax1.bar(names, rss, color=[colors.get(n, "grey") for n in names])
        ax1.set_title("Server RSS per idle socket (KiB)")
        ax2.bar(names, cpu, color=[colors.get(n, "grey") for n in names])
        ax2.set_title("Server CPU-µs per idle socket per second")
        fig.suptitle(f"scale run: idle, {results[0]['steps'][-1]['sockets_connected']} sockets")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    if multi:
        for r in results:
            color = colors.get(r["target"], "grey")
            xs = [s["offered_send_rate"] for s in r["steps"]]
            for kind, style in (("delivery", "-"), ("send_reply", "--")):
                for pct, marker in (("p50", "o"), ("p99", "^")):
                    ys = [s["latency_ms"][kind][pct] for s in r["steps"]]
                    if any(y is not None for y in ys):
                        ax1.plot(
                            xs,
                            [y if y is not None else float("nan") for y in ys],
                            linestyle=style,
                            marker=marker,
                            color=color,
                            alpha=1.0 if pct == "p99" else 0.55,
                            label=f"{r['target']} {kind} {pct}",
                        )
            ax2.plot(
                xs,
                [s["achieved"]["acked_per_s"] for s in r["steps"]],
                "-o",
                color=color,
                label=f"{r['target']} acked sends/s",
            )
            ax2.plot(
                xs,
                [s["achieved"]["deliveries_per_s"] for s in r["steps"]],
                "--s",
                color=color,
                alpha=0.6,
                label=f"{r['target']} deliveries/s",
            )
        ax1.set_xlabel("offered sends/s")
        ax1.set_yscale("log")
        ax1.axhline(
            report["params"].get("slo_p99_ms", 50), color="grey", linestyle=":", label="p99 SLO"
        )
        ax2.set_xlabel("offered sends/s")
        lim = max(max(s["offered_send_rate"] for s in r["steps"]) for r in results)
        ax2.plot([0, lim], [0, lim], ":", color="grey", label="offered sends/s")
        for r in results:
            color = colors.get(r["target"], "grey")
            xs = [s["offered_send_rate"] for s in r["steps"]]
            ax3.plot(
                xs,
                [s["cpu"]["server_cores"] for s in r["steps"]],
                "-o",
                color=color,
                label=f"{r['target']} server",
            )
            ax3.plot(
                xs,
                [s["cpu"]["loadgen_cores"] for s in r["steps"]],
                ":",
                color=color,
                alpha=0.6,
                label=f"{r['target']} loadgen",
            )
        ax3.set_xlabel("offered sends/s")
    else:
        names = [r["target"] for r in results]
        pcts = ("p50", "p90", "p99", "p99_9")
        kind = (
            "history_reply"
            if report["base_workload"] == "history"
            else "delivery"
            if any(r["steps"][-1]["latency_ms"]["delivery"]["count"] for r in results)
            else (
                "history_reply"
                if any(r["steps"][-1]["latency_ms"]["history_reply"]["count"] for r in results)
                else "send_reply"
            )
        )
        width = 0.8 / len(pcts)
        shown: list[float] = []
        for i, pct in enumerate(pcts):
            vals = [r["steps"][-1]["latency_ms"][kind][pct] or 0 for r in results]
            bars = ax1.bar([x + i * width for x in range(len(names))], vals, width, label=pct)
            # The figures themselves: a log axis shows ratios well and values poorly.
            ax1.bar_label(bars, labels=[f"{v:.3g}" if v else "" for v in vals], fontsize=6)
            shown += vals
        ax1.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
        ax1.set_yscale("log")
        floor = _log_floor(shown)
        if floor is not None:
            # Every bar from the same power of ten, below the smallest: on a log axis a
            # bar's length means something only against a common base.
            ax1.set_ylim(bottom=floor)
        ax1.set_xlabel(
            f"{kind} latency at {results[0]['steps'][-1]['offered_send_rate']:g} sends/s offered"
            + (f" (median of {rounds} rounds by p50)" if rounds > 1 else "")
        )
        metrics = ("sends_per_s", "acked_per_s", "deliveries_per_s")
        width = 0.8 / len(metrics)
        for i, key in enumerate(metrics):
            vals = [r["steps"][-1]["achieved"][key] for r in results]
            ax2.bar([x + i * width for x in range(len(names))], vals, width, label=key)
        ax2.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
        ax2.set_xlabel("achieved throughput")
        bottom = [0.0] * len(names)
        duration = [r["steps"][-1]["duration_s"] for r in results]
        for kind in kinds:
            vals = [
                r["steps"][-1]["cpu_s_window"].get(kind, 0.0) / d
                for r, d in zip(results, duration, strict=True)
            ]
            if any(vals):
                ax3.bar(names, vals, bottom=bottom, label=kind)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax3.set_xlabel("CPU by process kind during the window")
    ax3.set_ylabel("cores")
    cpus = report.get("machine", {}).get("cpus")
    ax3.set_title(f"CPU ({cpus} cores in total)" if cpus else "CPU")
    if cpus:
        # From zero to every core: how much of the machine a run used, at a glance (an
        # axis fitted to the data makes 0.3 -> 0.5 cores look like a climb to the top).
        ax3.set_ylim(0, max(float(cpus), ax3.get_ylim()[1]) * 1.02)
        ax3.axhline(float(cpus), color="grey", linestyle=":", linewidth=1)
    ax3.legend(fontsize=7)
    ax3.grid(True, alpha=0.3)
    ax1.set_ylabel("latency ms (log)")
    # Plain milliseconds on the log axis, 1-2-5 (matplotlib's default reads "6 x 10^1").
    plain = FuncFormatter(_one_two_five)
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(plain)
    ax1.set_title("Latency from scheduled send time")
    ax2.set_ylabel("per second")
    ax2.set_title("Throughput")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    ax1.grid(True, alpha=0.3)
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"scale run: {report['workload']} ({report['base_workload']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_floor(values: list[float]) -> float | None:
    """The power of ten at or below the smallest positive value (None: there is none)."""
    positive = [v for v in values if v > 0]
    if not positive:
        return None
    return float(10 ** math.floor(math.log10(min(positive))))


def _one_two_five(value: float, _position: object = None) -> str:
    """A log axis' tick label: the value when it is 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if leading in (1, 2, 5) else ""


def summary(report: dict[str, Any], out_dir: Path) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    if report.get("interrupted"):
        verdict = "INTERRUPTED"
    lines = [
        "",
        f"== scale {report['workload']}: {verdict} (judged on {report['verdict_basis']}) ==",
    ]
    for r in report["results"]:
        if r.get("setup_error"):
            lines.append(
                f"{r['target']:>9}: setup failed: {r['setup_error'].splitlines()[0][:200]}"
            )
            continue
        for s in r["steps"]:
            a, lat, c = s["achieved"], s["latency_ms"], s["cpu"]
            dl = lat["delivery"]
            rp = lat["send_reply"]
            hr = lat["history_reply"]
            text = (
                f"{r['target']:>9}: offered {s['offered_send_rate']:g}/s sent {a['sends_per_s']}/s "
                f"acked {a['acked_per_s']}/s deliv {a['deliveries_per_s']}/s | "
                f"reply p50/p99 {_fmt(rp['p50'])}/{_fmt(rp['p99'])} ms | "
                f"deliv p50/p99/p99.9 {_fmt(dl['p50'])}/{_fmt(dl['p99'])}/{_fmt(dl['p99_9'])} ms | "
            )
            if hr["count"]:
                text += f"history {a['history_per_s']}/s p50/p99 {_fmt(hr['p50'])}/{_fmt(hr['p99'])} ms | "
            text += (
                f"server {c['server_cores']} cores, {_fmt(c['server_us_per_delivery'])} µs/deliv, "
                f"other {c.get('other_cores')} cores | "
                f"errors {sum(s['errors'].values())} | {'ok' if s['passed'] else 'FAILED ' + ','.join(s['verification']['failures'])}"
            )
            if s.get("disturbed"):
                text += " | DISTURBED (other processes were busy)"
            if report["workload"] == "idle":
                per = s["memory"]["rss_kb_per_connection"]
                text += f" | RSS/conn KiB {per} | server µs/socket/s {_fmt(c['server_us_per_socket_second'])}"
            lines.append(text)
        if r.get("probe"):
            lines.append(f"{r['target']:>9}: {probing.summary(r['probe'])}")
        if "sustainable_send_rate" in r:
            bound = "" if r.get("sweep_limit_reached") else " (no step failed: the limit is higher)"
            lines.append(
                f"{r['target']:>9}: sustainable send rate {_fmt(r['sustainable_send_rate'])}/s{bound}"
            )
    if report.get("ratios_ours_over_peer"):
        for name, row in report["ratios_ours_over_peer"].items():
            if report["base_workload"] == "idle":
                lines.append(
                    f"ours/{name}: RSS per socket x{_fmt(row['rss_kb_per_connection'])}, "
                    f"CPU per socket-second x{_fmt(row['server_us_per_socket_second'])}"
                )
            else:
                lines.append(
                    f"ours/{name}: deliveries/s x{_fmt(row['deliveries_per_s'])}, delivery p50 "
                    f"x{_fmt(row['delivery_p50_ms'])}, p99 x{_fmt(row['delivery_p99_ms'])}, "
                    f"server CPU/delivery x{_fmt(row['server_us_per_delivery'])}, "
                    f"RSS/socket x{_fmt(row['rss_kb_per_connection'])}"
                )
    for g in report.get("goals", []):
        gap = f" - {g['gap']}" if g["gap"] else ""
        lines.append(f"goal {g['status'].upper()}: {g['goal']}: {g['measured']}{gap}")
    lines.append(f"report: {out_dir}/report.md (json, chart.png beside it)")
    lines.append(f"repeat: {report['command']}")
    return "\n".join(lines)


def doc_table(report: dict[str, Any]) -> str:
    """A compact markdown table of a report's steps (for docs/benchmarks.md)."""
    rows = [
        "| target | offered sends/s | acked/s | deliveries/s | reply p50 / p99 ms | "
        "delivery p50 / p99 / p99.9 / max ms | history p50 / p99 ms | server cores | "
        "server CPU-µs per delivery | server CPU-µs per socket-second | RSS KiB per socket "
        "(server) | peak RSS MiB (server procs) | other cores | loadgen send_lag p99 ms | errors "
        "| verification |",
        "|" + "---|" * 16,
    ]
    for r in report["results"]:
        if r.get("setup_error"):
            rows.append(f"| {r['target']} | setup failed | " + " | " * 14)
            continue
        for s in r["steps"]:
            lat, a, c = s["latency_ms"], s["achieved"], s["cpu"]
            d, rp, h = lat["delivery"], lat["send_reply"], lat["history_reply"]
            peak = sum(
                p["peak_rss_mb"]
                for p in s["memory"]["processes"].values()
                if p["kind"] != "loadgen"
            )
            verdict = (
                "pass"
                if s["passed"]
                else "FAIL: "
                + ", ".join(
                    f"{k} {s['verification'].get(k)}" for k in s["verification"]["failures"]
                )
            )
            if "sustainable" in s:
                verdict += "; " + ("sustainable" if s["sustainable"] else s["verdict"])
            rows.append(
                f"| {r['target']} | {_offered(s)} | {a['acked_per_s']} | "
                f"{a['deliveries_per_s']} | {_fmt(rp['p50'])} / {_fmt(rp['p99'])} | "
                f"{_fmt(d['p50'])} / {_fmt(d['p99'])} / {_fmt(d['p99_9'])} / {_fmt(d['max'])} | "
                f"{_fmt(h['p50'])} / {_fmt(h['p99'])} | {c['server_cores']} | "
                f"{_fmt(c['server_us_per_delivery'])} | {_fmt(c['server_us_per_socket_second'])} | "
                f"{_fmt(_server_per_conn(s))} | "
                f"{round(peak, 1)} | {c.get('other_cores')} | {_fmt(lat['send_lag']['p99'])} | "
                f"{sum(s['errors'].values())} | {verdict} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        data = json.loads((Path(arg) / "report.json").read_text())
        print(f"`{data['command']}` (git {data['git_rev']}, wall {data['wall_s']} s)\n")
        print(doc_table(data))
        print()
