"""Child processes of a scale run: start, register with a watchdog, sample, stop.

Every process the harness starts is registered with a watchdog process that outlives the
harness: if the harness dies in any way (even SIGKILL), the watchdog sees its stdin
close and ends every registered process; it also ends them when the run's hard time
limit passes. Children we spawn ourselves additionally get PDEATHSIG=SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.scale.common import child_setup

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    """One process of the run."""

    name: str
    kind: str  # gateway, worker, redis, mongod, loadgen, peer-...
    popen: subprocess.Popen[Any]
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def read_cpu_seconds(pid: int) -> float | None:
    """utime+stime (+ reaped children's) of ``pid`` in seconds, None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # After the comm field: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()[1:]
    values = [int(v) for v in fields[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLK_TCK


def read_mem_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in KiB, empty when gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line[:5]] = int(line.split()[1])
    except OSError:
        pass
    return out


# How long one scan of /proc for the tracked processes' children serves: a scan reads
# every process's stat file (~2 ms of CPU with ~70 processes), and the harness samples
# once a second inside the measured window, on the cores it measures.
TREE_TTL = 5.0


def process_tree() -> dict[int, list[int]]:
    """Parent pid -> the pids of its live children, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int, tree: dict[int, list[int]]) -> list[int]:
    """Every descendant of ``pid`` (children of forking servers) in ``tree`` (from
    :func:`process_tree`)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in tree.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


def _pinned_setup(cpus: set[int]) -> Any:
    def setup() -> None:
        child_setup()
        os.sched_setaffinity(0, cpus)

    return setup


class Watchdog:
    """A process that ends our children if we die or overstay ``max_seconds``."""

    def __init__(self, max_seconds: float) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.scale.procs", "watchdog", str(max_seconds)],
            stdin=subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,
            text=True,
        )

    def _say(self, line: str) -> None:
        stdin = self.popen.stdin
        if stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            stdin.write(line + "\n")
            stdin.flush()

    def watch(self, pid: int) -> None:
        self._say(f"watch {pid}")

    def forget(self, pid: int) -> None:
        self._say(f"forget {pid}")

    def close(self) -> None:
        self._say("exit")
        with contextlib.suppress(OSError, ValueError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()


class Supervisor:
    """Starts, tracks and stops the processes of one run."""

    def __init__(self, run_dir: Path, max_seconds: float) -> None:
        self.run_dir = run_dir
        self.procs: list[Proc] = []
        self.watchdog = Watchdog(max_seconds)
        self._tree: tuple[float, dict[int, list[int]]] | None = None  # (when, tree)

    def spawn(
        self,
        name: str,
        kind: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        pipe_io: bool = False,
        cpus: set[int] | None = None,
        code: Path = ROOT,
    ) -> Proc:
        """Start ``argv`` with its output in ``<run_dir>/logs/<name>.log``.

        ``cpus``: pin the process to these cores (the load generators, when given cores).
        ``code``: the source tree it runs in and imports from (another revision's, for a
        baseline).
        """
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(code) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                cwd=code,
                env=full_env,
                stdin=subprocess.PIPE if pipe_io else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_io else log,
                stderr=log,
                preexec_fn=child_setup if not cpus else _pinned_setup(cpus),
                text=pipe_io,
                bufsize=1 if pipe_io else -1,
            )
        proc = Proc(name, kind, popen, log_path)
        self.procs.append(proc)
        self.watchdog.watch(popen.pid)
        self._tree = None
        return proc

    def adopt(self, name: str, kind: str, popen: subprocess.Popen[Any], log_path: Path) -> Proc:
        """Track a process started elsewhere (the Redis/MongoDB of deploy.local.servers)."""
        proc = Proc(name, kind, popen, log_path)
        self.procs.append(proc)
        self.watchdog.watch(popen.pid)
        self._tree = None
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(5)
        self.watchdog.forget(proc.pid)
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()

    def stop_kind(self, *kinds: str) -> None:
        for proc in reversed(self.procs):
            if proc.kind in kinds:
                self.stop(proc)

    def stop_all(self) -> None:
        """Stop everything in reverse start order (load first, databases last)."""
        for proc in reversed(self.procs):
            self.stop(proc)

    def close(self) -> None:
        self.stop_all()
        self.watchdog.close()

    def sample(self) -> dict[int, dict[str, Any]]:
        """CPU seconds and memory of every tracked process (including its descendants,
        as found by a scan of /proc at most :data:`TREE_TTL` old, or since a start)."""
        now = time.monotonic()
        if self._tree is None or now - self._tree[0] > TREE_TTL:
            self._tree = (now, process_tree())
        tree = self._tree[1]
        out: dict[int, dict[str, Any]] = {}
        for proc in self.procs:
            cpu = read_cpu_seconds(proc.pid)
            if cpu is None:
                continue
            mem = read_mem_kb(proc.pid)
            rss, hwm = mem.get("VmRSS", 0), mem.get("VmHWM", 0)
            for child in descendants(proc.pid, tree):
                child_cpu = read_cpu_seconds(child)
                if child_cpu is not None:
                    cpu += child_cpu
                    child_mem = read_mem_kb(child)
                    rss += child_mem.get("VmRSS", 0)
                    hwm += child_mem.get("VmHWM", 0)
            out[proc.pid] = {
                "name": proc.name,
                "kind": proc.kind,
                "cpu_s": cpu,
                "rss_kb": rss,
                "hwm_kb": hwm,
            }
        return out


def _watchdog(max_seconds: float) -> int:
    deadline = time.monotonic() + max_seconds
    pids: set[int] = set()
    stdin: IO[str] = sys.stdin
    reason = "time limit"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the harness's to handle.
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdin], [], [], 1.0)
        if not ready:
            continue
        line = stdin.readline()
        if not line:
            reason = "harness exited without stopping its processes"
            break
        word, _, arg = line.strip().partition(" ")
        if word == "watch":
            pids.add(int(arg))
        elif word == "forget":
            pids.discard(int(arg))
        elif word == "exit":
            return 0
    if pids:
        print(f"[scale watchdog] {reason}: stopping {len(pids)} processes", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pids.discard(pid)
        if sig == signal.SIGTERM:
            end = time.monotonic() + 5
            while time.monotonic() < end and pids:
                for pid in list(pids):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        pids.discard(pid)
                time.sleep(0.2)
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "watchdog":
    raise SystemExit(_watchdog(float(sys.argv[2])))
