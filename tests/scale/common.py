"""Small helpers shared by the harness, the load generator and the peers."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
from array import array
from collections import Counter
from typing import Any

try:
    from hdrh.histogram import HdrHistogram
except ImportError as exc:  # pragma: no cover - a missing dev dependency
    raise SystemExit(
        "the scale harness needs the hdrhistogram package: .venv/bin/pip install "
        "hdrhistogram==0.10.8 (the peers also need python-socketio, channels, channels-redis "
        "and uvicorn; charts need matplotlib)"
    ) from exc

# Histograms hold microseconds from 1 us to 10 minutes at 3 significant digits.
HIST_MIN_US = 1
HIST_MAX_US = 600_000_000
HIST_DIGITS = 3

# Percentiles reported everywhere.
PERCENTILES = (50.0, 90.0, 99.0, 99.9)

_PR_SET_PDEATHSIG = 1


def new_hist() -> HdrHistogram:
    """An empty latency histogram in microseconds."""
    return HdrHistogram(HIST_MIN_US, HIST_MAX_US, HIST_DIGITS)


def record(hist: HdrHistogram, micros: int) -> None:
    """Record one latency, clamped into the histogram's range."""
    if micros < HIST_MIN_US:
        micros = HIST_MIN_US
    elif micros > HIST_MAX_US:
        micros = HIST_MAX_US
    hist.record_value(micros)


class LatencyLog:
    """Raw latencies kept cheaply during a run and folded into a histogram after it.

    HdrHistogram's ``record_value`` is pure Python (~1.5 us); at tens of thousands of
    deliveries a second that is CPU the load generator takes from the servers it
    measures, on the same cores. Appending to an array costs ~0.1 us; the fold (by
    distinct value) runs once the window is over. Bounded: past ``MAX_KEPT`` values the
    log is folded early.
    """

    MAX_KEPT = 4_000_000

    __slots__ = ("_values", "hist")

    def __init__(self, hist: HdrHistogram) -> None:
        self.hist = hist
        self._values: array[int] = array("q")

    def append(self, micros: int) -> None:
        """Keep one latency in microseconds."""
        values = self._values
        values.append(micros)
        if len(values) >= self.MAX_KEPT:
            self.fold()

    def fold(self) -> HdrHistogram:
        """Record every kept value into the histogram (clamped to its range)."""
        for micros, count in Counter(self._values).items():
            clamped = min(max(micros, HIST_MIN_US), HIST_MAX_US)
            self.hist.record_value(clamped, count)
        self._values = array("q")
        return self.hist


def encode_hist(hist: HdrHistogram) -> str:
    """HdrHistogram's compressed base64 encoding as text (for JSON)."""
    return hist.encode().decode("ascii")


def merge_encoded(encoded: list[str]) -> HdrHistogram:
    """One histogram holding every encoded histogram's values."""
    total = new_hist()
    for item in encoded:
        if item:
            total.decode_and_add(item.encode("ascii"))
    return total


def summarize(hist: HdrHistogram) -> dict[str, Any]:
    """Count, percentiles and max in milliseconds (None when empty)."""
    count = hist.get_total_count()
    out: dict[str, Any] = {"count": count}
    for p in PERCENTILES:
        key = "p" + (f"{p:g}".replace(".", "_"))
        out[key] = round(hist.get_value_at_percentile(p) / 1000.0, 3) if count else None
    out["max"] = round(hist.get_max_value() / 1000.0, 3) if count else None
    out["mean"] = round(hist.get_mean_value() / 1000.0, 3) if count else None
    return out


def slowest_seconds(
    timelines: list[dict[str, dict[str, int]]], duration: float, n: int = 5
) -> list[dict[str, float]]:
    """The ``n`` seconds of the window whose slowest delivery was slowest, over every
    generator's timeline (``{second: {"delivery_max_us": ...}}``), slowest first."""
    worst: dict[int, int] = {}
    for timeline in timelines:
        for key, bucket in timeline.items():
            second, micros = int(key), bucket.get("delivery_max_us", 0)
            if 0 <= second < duration and micros > worst.get(second, 0):
                worst[second] = micros
    ranked = sorted(worst.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [{"second": second, "max_ms": micros / 1000} for second, micros in ranked]


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if os.geteuid() == 0:
        # root may raise the hard limit too (up to fs.nr_open) when it holds
        # CAP_SYS_RESOURCE; containers often withhold it, then the hard limit stands.
        try:
            with open("/proc/sys/fs/nr_open") as fh:
                ceiling = min(int(fh.read()), 1_048_576)
        except (OSError, ValueError):
            ceiling = 1_048_576
        if ceiling > hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
                return resource.getrlimit(resource.RLIMIT_NOFILE)
            except (ValueError, OSError):
                pass
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fd_limit() -> int:
    """Descriptors this process (and a child it starts) may open: the soft limit, which
    :func:`raise_nofile` has raised as far as the machine allows."""
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def child_setup() -> None:
    """``preexec_fn`` for every child we start: raised fd limit, dies with its parent."""
    raise_nofile()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    with contextlib.suppress(OSError):
        os.setsid()  # Ctrl-C in a terminal reaches the harness only; it stops us in order.


def make_text(sched_ns: int, gid: int, k: int, pad: int) -> str:
    """Message text carrying the scheduled send time, sender and sequence number."""
    head = f"t={sched_ns};s={gid};k={k};"
    return head + "x" * pad if pad > 0 else head


def parse_text(text: str) -> tuple[int, int, int] | None:
    """(scheduled ns, sender gid, k) from a text made by :func:`make_text`."""
    if not text.startswith("t="):
        return None
    try:
        t, s, k, _ = text.split(";", 3)
        return int(t[2:]), int(s[2:]), int(k[2:])
    except ValueError:
        return None


def msg_key(gid: int, k: int) -> int:
    """One int naming a message: sender gid and its k-th send."""
    return (gid << 24) | k


def split_key(key: int) -> tuple[int, int]:
    """Inverse of :func:`msg_key`."""
    return key >> 24, key & 0xFFFFFF


def with_query(url: str, query: str) -> str:
    """``url`` with the URI options in ``query`` added (``a=1&b=2``; empty: unchanged)."""
    query = query.lstrip("?&")
    if not query:
        return url
    return f"{url}{'&' if '?' in url else '?'}{query}"
