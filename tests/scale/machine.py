"""How fast the machine is at the moment of a step: two small fixed measurements.

On a shared VM the same code's figures drift by tens of percent over a day (the
benchmark rounds of 7 December saw `chain`, unchanged, twice as slow as on 3 December),
and CPU steal does not always show it. Each step measures, just before its window and
again after its drain (not during it: there the measurement would wait for the cores the
run keeps busy), the time of a fixed piece of Python and of a wake-up round trip between
two processes (what every hop between the servers costs), so runs hours apart can be
told apart by the machine's speed as well as by the code's.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from typing import Any

from tests.scale.procs import CLK_TCK

LOOP_N = 200_000
LOOP_REPEATS = 5
ROUND_TRIPS = 2_000
WARM_UP = 100
# A child that echoes each byte it reads: the other end of the round trips.
ECHO = "import os\nwhile True:\n    b = os.read(0, 1)\n    if not b:\n        break\n    os.write(1, b)\n"


def python_loop_ms(n: int = LOOP_N, repeats: int = LOOP_REPEATS) -> float:
    """The fastest of ``repeats`` runs of a fixed pure-Python loop, in ms (the fastest:
    what the machine can do now, least disturbed by the run's own leftovers)."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        for i in range(n):
            total += i * i % 7
        best = min(best, time.perf_counter() - started)
    return round(best * 1000.0, 2)


def wakeup_round_trip_us(n: int = ROUND_TRIPS) -> float:
    """The median of ``n`` one-byte round trips through pipes to a child process that
    echoes them, in µs: each is two wake-ups of a process asleep in ``read``."""
    child = subprocess.Popen(
        [sys.executable, "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert child.stdin is not None and child.stdout is not None
    out, back = child.stdin.fileno(), child.stdout.fileno()
    try:
        times = []
        for i in range(WARM_UP + n):
            started = time.perf_counter_ns()
            os.write(out, b"x")
            if os.read(back, 1) != b"x":
                raise RuntimeError("the echo child stopped")
            if i >= WARM_UP:
                times.append(time.perf_counter_ns() - started)
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()
    times.sort()
    return round(times[len(times) // 2] / 1000.0, 1)


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave other guests instead of this machine, since boot
    (all cores, ``steal`` in /proc/stat; 0 where it is not reported)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()[1:]
    return int(fields[7]) / CLK_TCK if len(fields) > 7 else 0.0


MEANING = (
    "a fixed Python loop and a wake-up round trip between two processes; both grow when "
    "the machine is slower, so compare runs by them too"
)


def describe(machine: dict[str, Any]) -> str:
    """One line for a step's ``machine`` figures (``before`` and ``after`` its window)."""

    def one(speed: dict[str, float]) -> str:
        return (
            f"loop {speed['python_loop_ms']:g} ms, wake-up round trip "
            f"{speed['wakeup_round_trip_us']:g} µs"
        )

    return (
        f"before the window {one(machine['before'])}; after it {one(machine['after'])}; "
        f"CPU steal in it {machine.get('steal_cores', 0.0):g} cores"
    )


def check() -> dict[str, float]:
    """Both measurements (~0.3 s on an idle 2-core machine)."""
    return {"python_loop_ms": python_loop_ms(), "wakeup_round_trip_us": wakeup_round_trip_us()}
