"""Scale test harness: ``python -m tests.scale.harness --workload chat [--peers] ...``.

For each target (the gateway ``ours``, and with ``--peers`` the python-socketio, Django
Channels and bare aiohttp peers) it starts what the target needs on 127.0.0.1 (Redis,
MongoDB, gateways and workers, or the peer processes), creates the users and chats, runs
the open-loop load generators, samples CPU and memory of every process, verifies what was
acknowledged, stored and delivered, and writes ``reports/<timestamp>-<workload>/`` with
``report.json``, ``report.md`` and ``chart.png``. Exit status 1 when a run lost,
duplicated or reordered messages (or a socket could not connect); 2 on a setup error.

Every process it starts is bounded in time, registered with a watchdog and stopped at
the end, also on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import queue
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.scale import machine, server_time
from tests.scale import probe as probing
from tests.scale import report as reporting
from tests.scale.common import (
    fd_limit,
    merge_encoded,
    raise_nofile,
    slowest_seconds,
    summarize,
    with_query,
)
from tests.scale.goals import BASELINE, FD_RESERVE, FLOORS, kind_of, step_ok
from tests.scale.procs import ROOT, Proc, Supervisor, machine_busy_seconds
from tests.scale.verify import verify
from tests.scale.workloads import (
    PREFILL_USER,
    Scenario,
    chat_workload,
    history_workload,
    idle_workload,
    rooms_workload,
    with_rate,
)

PEERS = ("socketio", "channels", "aiohttp")  # --peers runs these; a floor only when named
TARGETS = ("ours", *PEERS, *FLOORS)
# What each target needs and how its load generator speaks to it.
ADAPTER = {
    "ours": "ours",
    "socketio": "socketio",
    "channels": "plainws",
    "aiohttp": "plainws",
    "chain": "plainws",
}
NEEDS_REDIS = {"ours": True, "socketio": True, "channels": True, "aiohttp": False, "chain": True}
# Targets that store what they are sent, and so get the shipped Redis (AOF) and a mongod.
STORES = ("ours", "chain")
PYTHON = sys.executable


def resolve_revision(rev: str) -> str:
    """The full commit id of ``rev`` in this checkout (SystemExit when there is none)."""
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not rev:
        raise SystemExit(f"ours@{rev}: no such git revision in {ROOT}")
    return done.stdout.strip()


def export_revision(commit: str, dest: Path) -> None:
    """The tracked files of ``commit`` under ``dest`` (``git archive``; no worktree to
    register or clean up)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "archive", commit], cwd=ROOT, stdout=subprocess.PIPE)
    assert archive.stdout is not None
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout)
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise SetupFailed(f"could not export git revision {commit} to {dest}")


class SetupFailed(RuntimeError):
    """The system under test could not be started or did not become ready."""


class Interrupted(BaseException):
    """SIGTERM: unwind like Ctrl-C so every child is stopped."""


# --------------------------------------------------------------------------- progress


class Progress:
    """A text progress bar on stderr; one line every few seconds when not a tty."""

    def __init__(self, label: str, total_s: float) -> None:
        self.label = label
        self.total = max(total_s, 0.001)
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0
        self.every = 0.5 if self.tty else 5.0

    def update(self, elapsed: float, agg: dict[str, int], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < self.every:
            return
        self.last_print = now
        frac = min(1.0, max(0.0, elapsed / self.total))
        width = 24
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        text = (
            f"{self.label} [{bar}] {elapsed:5.1f}/{self.total:.0f}s "
            f"sent {agg.get('sent', 0)} ({agg.get('sent_per_s', 0)}/s) "
            f"deliv {agg.get('deliveries', 0)} ({agg.get('deliveries_per_s', 0)}/s) "
            f"hist {agg.get('history_ok', 0)} err {agg.get('errors', 0)} "
            f"pending {agg.get('pending', 0)}"
        )
        if self.tty:
            sys.stderr.write("\r" + text[:200].ljust(120))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def say(text: str) -> None:
    print(f"[scale] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def readyz(proc: Proc) -> int | None:
    """The HTTP status of a server process's ``/readyz`` (None: no answer)."""
    return http_status(f"http://127.0.0.1:{proc.extra['port']}/readyz")


def worker_partitions(proc: Proc) -> list[int] | None:
    """The partitions a worker reads now, from its ``/readyz`` (None: no answer)."""
    url = f"http://127.0.0.1:{proc.extra['port']}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()  # unready: the body still lists its partitions
    except (OSError, ValueError):
        return None
    try:
        return [int(p) for p in json.loads(body).get("partitions") or []]
    except (ValueError, TypeError, AttributeError):
        return None


def wait_balanced(workers: list[Proc], partitions: int, timeout: float) -> None:
    """Wait until the workers have shared every partition out fairly (a worker that
    started later takes its share at the others' next lease round): a run measures the
    steady state, not a hand-over. Only warns when it does not happen in time."""
    share = -(-partitions // max(1, len(workers)))
    deadline = time.monotonic() + timeout
    while True:
        held = [worker_partitions(w) for w in workers]
        if all(h is not None for h in held):
            every = sorted(p for h in held if h is not None for p in h)
            if every == list(range(partitions)) and all(len(h or []) <= share for h in held):
                return
        if time.monotonic() > deadline:
            say(f"workers did not share the partitions out within {timeout:.0f}s: {held}")
            return
        time.sleep(0.1)


def ws_urls(procs: list[Proc]) -> list[str]:
    """The WebSocket endpoint of each server process."""
    return [f"ws://127.0.0.1:{p.extra['port']}/ws" for p in procs]


def tcp_open(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def tail(path: Path | None, lines: int = 25) -> str:
    if path is None:
        return ""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def wait_ready(procs: list[Proc], check: Any, what: str, timeout: float) -> None:
    """Wait until ``check(proc)`` is true for every process; fail if one exits."""
    deadline = time.monotonic() + timeout
    waiting = list(procs)
    while waiting:
        for proc in list(waiting):
            if not proc.alive():
                raise SetupFailed(
                    f"{proc.name} exited with {proc.popen.returncode} before it was ready; "
                    f"its log ({proc.log_path}):\n{tail(proc.log_path)}"
                )
            if check(proc):
                waiting.remove(proc)
        if not waiting:
            return
        if time.monotonic() > deadline:
            names = ", ".join(p.name for p in waiting)
            raise SetupFailed(
                f"{what} not ready within {timeout:.0f}s: {names}; last log lines of "
                f"{waiting[0].name}:\n{tail(waiting[0].log_path)}"
            )
        time.sleep(0.2)


# --------------------------------------------------------------------------- targets


class Target:
    """One system under test, started once and used for every step of the run."""

    def __init__(self, name: str, args: argparse.Namespace, run_dir: Path, max_seconds: float):
        self.name = name
        self.kind = kind_of(name)
        self.args = args
        self.dir = run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(args.data_dir) / run_dir.name / name
        self.sup = Supervisor(self.dir, max_seconds)
        self.urls: list[str] = []
        self.redis_url = ""
        self.mongo_url = ""
        self.notes: list[str] = []
        self.server_sockets = 0  # sockets per server process (for the idle workload)
        self.first_per_conn: dict[str, float] | None = None
        self.first_per_conn_tag = ""
        self._status_client: Any = None  # ours: a client for mongod's serverStatus
        self.probe_token = secrets.token_hex(16)  # ours: the probe's socket (probe.py)
        self._closed = False
        # The source tree its gateways and workers run from: this checkout, or for a
        # baseline (ours@REV) that revision's files, exported at the start.
        self.code = ROOT
        self.commit: str | None = None
        if self.kind != name:
            self.commit = resolve_revision(name[len(BASELINE) :])
            self.code = self.data_dir / "code"

    @property
    def adapter(self) -> str:
        return ADAPTER[self.kind]

    # ---- start

    def start(self, scenario: Scenario) -> None:
        from deploy.local.servers import free_port, mongo_server, redis_server

        if self.commit is not None:
            export_revision(self.commit, self.code)
        if NEEDS_REDIS[self.kind]:
            # The gateway's Redis is configured as shipped (AOF, fsync every second); the
            # peers persist nothing, so theirs runs without AOF.
            redis = redis_server(
                free_port(), self.data_dir / "redis", appendonly=self.kind in STORES
            ).start()
            assert redis.process is not None
            self.sup.adopt("redis", "redis", redis.process, redis.log_path)
            self.redis_url = redis.url
        if self.kind in STORES:
            mongo = mongo_server(free_port(), self.data_dir / "mongo").start(timeout=60)
            assert mongo.process is not None
            self.sup.adopt("mongod", "mongod", mongo.process, mongo.log_path)
            self.mongo_url = mongo.url
            self.seed_mongo(scenario)
        if self.kind == "ours":
            self.start_ours()
        elif self.name == "chain":
            self.start_chain()
        elif self.name == "socketio":
            self.start_socketio()
        elif self.name == "channels":
            self.start_channels()
        elif self.name == "aiohttp":
            self.start_aiohttp()

    def storage_env(self) -> dict[str, str]:
        """Where a storing target's processes find Redis and MongoDB, and how many
        partitions: the same for ours and the chain floor, so they are compared alike."""
        return {
            "REDIS_URL": self.redis_url,
            "MONGO_URL": with_query(self.mongo_url, self.args.mongo_options),
            "PARTITIONS": str(self.args.partitions),
        }

    def start_ours(self) -> None:
        from deploy.local.servers import free_port

        args = self.args
        base = {
            **self.storage_env(),
            "LOG_LEVEL": args.log_level,
            "REQUEST_TIMEOUT_SECONDS": str(args.request_timeout),
            "GATEWAY_HOST": "127.0.0.1",
            # Every socket of the test comes from 127.0.0.1: lift the per-IP cap.
            "MAX_CONNECTIONS_PER_IP": "0",
        }
        base.update(dict(kv.split("=", 1) for kv in args.env))
        workers = []
        for i in range(args.workers):
            port = free_port()
            env = dict(base, NODE_ID=f"scale-worker-{i}", WORKER_HTTP_PORT=str(port))
            env["WORKER_HTTP_HOST"] = "127.0.0.1"
            proc = self.sup.spawn(
                f"worker-{i}", "worker", [PYTHON, "-m", "worker"], env, code=self.code
            )
            proc.extra["port"] = port
            workers.append(proc)
        gateways = []
        for i in range(args.gateways):
            port = free_port()
            env = dict(
                base,
                NODE_ID=f"scale-gateway-{i}",
                GATEWAY_PORT=str(port),
                WORKER_HTTP_PORT=str(free_port()),
            )
            proc = self.sup.spawn(
                f"gateway-{i}", "gateway", [PYTHON, "-m", "gateway"], env, code=self.code
            )
            proc.extra["port"] = port
            gateways.append(proc)
        wait_ready(gateways, lambda p: readyz(p) == 200, "gateway /readyz", args.ready_timeout)
        # Workers: any HTTP answer on their port (health endpoint), and still running.
        with contextlib.suppress(SetupFailed):
            wait_ready(workers, lambda p: readyz(p) is not None, "worker HTTP", 10)
        for proc in workers:
            if not proc.alive():
                raise SetupFailed(f"{proc.name} exited; its log:\n{tail(proc.log_path)}")
        wait_balanced(workers, args.partitions, timeout=15)
        self.urls = ws_urls(gateways)

    def kill_worker(self) -> str:
        """SIGKILL one of ours' workers (a crash: nothing released); its name."""
        proc = next(p for p in self.sup.procs if p.kind == "worker" and p.alive())
        proc.popen.kill()
        return proc.name

    def start_chain(self) -> None:
        from deploy.local.servers import free_port

        args = self.args
        base = {**self.storage_env(), "HOST": "127.0.0.1"}
        # One worker whatever --workers says: it counts each chat's ids in its memory.
        self.sup.spawn(
            "worker-0", "worker", [PYTHON, "-m", "tests.scale.peers.chain_peer"],
            dict(base, ROLE="worker"),
        )  # fmt: skip
        procs = []
        for i in range(args.gateways):
            port = free_port()
            env = dict(base, ROLE="gateway", PORT=str(port), NODE_ID=f"chain-gw-{i}")
            proc = self.sup.spawn(
                f"gateway-{i}", "gateway", [PYTHON, "-m", "tests.scale.peers.chain_peer"], env
            )
            proc.extra["port"] = port
            procs.append(proc)
        wait_ready(procs, lambda p: readyz(p) == 200, "chain gateway", args.ready_timeout)
        self.urls = ws_urls(procs)
        self.notes.append(
            "ours' hops without its features: gateways XADD through ours' producer, one "
            "worker stores each batch with ours' indexes and write concern and PUBLISHes; "
            "no tokens, membership, grants, retries, limits or metrics"
        )

    def start_socketio(self) -> None:
        from deploy.local.servers import free_port

        procs = []
        for i in range(self.args.gateways):
            port = free_port()
            env = {"REDIS_URL": self.redis_url, "PORT": str(port), "HOST": "127.0.0.1"}
            proc = self.sup.spawn(
                f"socketio-{i}", "peer", [PYTHON, "-m", "tests.scale.peers.socketio_peer"], env
            )
            proc.extra["port"] = port
            procs.append(proc)
        wait_ready(procs, lambda p: readyz(p) == 200, "socketio peer", self.args.ready_timeout)
        self.urls = ws_urls(procs)
        self.notes.append(
            "python-socketio AsyncServer + AsyncRedisManager on aiohttp, "
            f"{len(procs)} processes, stdlib json; acks return after the Redis publish"
        )

    def start_channels(self) -> None:
        import importlib.util

        from deploy.local.servers import free_port

        ws_impl = "websockets" if importlib.util.find_spec("websockets") else "wsproto"
        procs = []
        for i in range(self.args.gateways):
            port = free_port()
            env = {
                "REDIS_URL": self.redis_url,
                "CHANNELS_LAYER": self.args.channels_layer,
                "DJANGO_SETTINGS_MODULE": "tests.scale.peers.channels_settings",
            }
            argv = [
                PYTHON, "-m", "uvicorn", "tests.scale.peers.channels_peer:application",
                "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off",
                "--log-level", "warning", "--no-access-log", "--ws", ws_impl,
                "--loop", "uvloop", "--backlog", "4096",
            ]  # fmt: skip
            proc = self.sup.spawn(f"channels-{i}", "peer", argv, env)
            proc.extra["port"] = port
            procs.append(proc)
        wait_ready(
            procs, lambda p: tcp_open(p.extra["port"]), "channels peer", self.args.ready_timeout
        )
        self.urls = ws_urls(procs)
        layer = (
            "RedisPubSubChannelLayer"
            if self.args.channels_layer == "pubsub"
            else "RedisChannelLayer (capacity 1000)"
        )
        self.notes.append(
            f"Django Channels consumer + channels_redis {layer}, uvicorn --ws {ws_impl}, "
            f"{len(procs)} processes, stdlib json"
        )

    def start_aiohttp(self) -> None:
        from deploy.local.servers import free_port

        port = free_port()
        proc = self.sup.spawn(
            "aiohttp-0",
            "peer",
            [PYTHON, "-m", "tests.scale.peers.aiohttp_peer"],
            {"PORT": str(port), "HOST": "127.0.0.1"},
        )
        proc.extra["port"] = port
        wait_ready([proc], lambda p: readyz(p) == 200, "aiohttp peer", self.args.ready_timeout)
        self.urls = ws_urls([proc])
        self.notes.append(
            "one aiohttp process, in-memory rooms, orjson, no Redis (the Python ceiling)"
        )

    # ---- data

    def mongo(self, timeout_ms: int = 10_000) -> Any:
        from pymongo import MongoClient

        return MongoClient(self.mongo_url, serverSelectionTimeoutMS=timeout_ms)

    def seed_mongo(self, scenario: Scenario) -> None:
        import hashlib

        t0 = time.monotonic()
        client = self.mongo()
        try:
            db = client.get_default_database()
            users = [
                {"_id": c["user_id"], "username": f"user{c['gid']}", "avatar": None}
                for c in scenario.clients
            ]
            users.append({"_id": PREFILL_USER, "username": "prefill", "avatar": None})
            users.append({"_id": probing.PROBE_USER, "username": "probe", "avatar": None})
            tokens = [
                {"_id": hashlib.sha256(c["token"].encode()).hexdigest(), "user_id": c["user_id"]}
                for c in scenario.clients
            ]
            tokens.append(
                {
                    "_id": hashlib.sha256(self.probe_token.encode()).hexdigest(),
                    "user_id": probing.PROBE_USER,
                }
            )
            chats = [
                {"_id": chat, "title": f"scale {chat}", "member_ids": members}
                for chat, members in scenario.chats.items()
            ]
            chats.append(
                {"_id": probing.PROBE_CHAT, "title": "probe", "member_ids": [probing.PROBE_USER]}
            )
            for name, docs in (("users", users), ("tokens", tokens), ("chats", chats)):
                for i in range(0, len(docs), 5000):
                    db[name].insert_many(docs[i : i + 5000], ordered=False)
            now = int(time.time())
            for chat, n in {**scenario.prefill, probing.PROBE_CHAT: probing.PROBE_MESSAGES}.items():
                batch = []
                for seq in range(1, n + 1):
                    batch.append(
                        {
                            "_id": f"prefill-{chat}-{seq}",
                            "chat_id": chat,
                            "seq": seq,
                            "user_id": PREFILL_USER,
                            "username": "prefill",
                            "avatar": None,
                            "type": "text",
                            "text": f"prefill {seq}",
                            "file_url": None,
                            "created_at": now,
                        }
                    )
                    if len(batch) == 5000:
                        db.messages.insert_many(batch, ordered=False)
                        batch = []
                if batch:
                    db.messages.insert_many(batch, ordered=False)
        finally:
            client.close()
        say(
            f"{self.name}: created {len(scenario.clients)} users/tokens, {len(scenario.chats)} chats"
            + (f", prefilled {sum(scenario.prefill.values())} messages" if scenario.prefill else "")
            + f" in {time.monotonic() - t0:.1f}s"
        )

    def probe(self, rounds: int, gap_ms: float) -> dict[str, Any]:
        """probe.py's requests one at a time on the first gateway, after the load."""
        say(f"{self.name}: one request at a time, {rounds} of each kind, {gap_ms:g} ms apart")
        try:
            return asyncio.run(
                probing.probe(self.urls[0], self.probe_token, rounds, gap_ms / 1000.0)
            )
        except (OSError, TimeoutError, ValueError) as exc:
            say(f"{self.name}: the probe failed: {exc!r}")
            return {"error": repr(exc)}

    def stored_messages(
        self, tag: str, chats: list[str]
    ) -> dict[str, list[tuple[int, str | None]]]:
        """Messages of this step, by chat: (seq, client_msg_id)."""
        client = self.mongo()
        try:
            db = client.get_default_database()
            out: dict[str, list[tuple[int, str | None]]] = {chat: [] for chat in chats}
            cursor = db.messages.find(
                {"client_msg_id": {"$regex": f"^{tag}-"}},
                {"chat_id": 1, "seq": 1, "client_msg_id": 1, "_id": 0},
            )
            for doc in cursor:
                out.setdefault(doc["chat_id"], []).append(
                    (int(doc["seq"]), doc.get("client_msg_id"))
                )
            return out
        finally:
            client.close()

    def _metrics(self, kinds: tuple[str, ...]) -> dict[str, bytes | None]:
        """GET /metrics of each live process of ``kinds`` (None: it did not answer)."""
        texts: dict[str, bytes | None] = {}
        for proc in self.sup.procs:
            if proc.kind in kinds and proc.alive():
                try:
                    url = f"http://127.0.0.1:{proc.extra['port']}/metrics"
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        texts[proc.name] = resp.read()
                except (OSError, ValueError):
                    texts[proc.name] = None
        return texts

    def scrape_metrics(self, dest: Path) -> None:
        for name, text in self._metrics(("gateway",)).items():
            if text is not None:
                (dest / f"metrics-{name}.txt").write_bytes(text)

    def metric_totals(self) -> server_time.Totals | None:
        """Every gateway's and worker's /metrics, summed, with mongod's own counters
        (None for a peer, or when a gateway or worker did not answer: a partial sum
        would misattribute time)."""
        if self.kind != "ours":
            return None
        texts = self._metrics(("gateway", "worker"))
        if any(text is None for text in texts.values()):
            return None
        totals = server_time.parse([text.decode() for text in texts.values() if text is not None])
        totals.update(self._mongod_totals())
        return totals

    def _mongod_totals(self) -> server_time.Totals:
        """mongod's own counters now (empty when it does not answer: the window then
        gives the servers' account without mongod's)."""
        from pymongo.errors import PyMongoError

        if self._status_client is None:
            self._status_client = self.mongo(timeout_ms=2_000)
        try:
            status = self._status_client.admin.command("serverStatus")
        except PyMongoError:
            return {}
        return server_time.mongod_totals(status)

    def close(self) -> None:
        """Stop every process of the target and remove its data (once; later calls do
        nothing)."""
        if self._closed:
            return
        self._closed = True
        if self._status_client is not None:
            self._status_client.close()
        self.sup.close()
        if not self.args.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.data_dir.parent.rmdir()  # the run's folder, once its last target is gone


# --------------------------------------------------------------------------- one step


def cpu_by_kind(
    before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, end in after.items():
        start = before.get(pid)
        if start is None:
            continue
        out[end["kind"]] = out.get(end["kind"], 0.0) + (end["cpu_s"] - start["cpu_s"])
    return {k: round(v, 3) for k, v in out.items()}


PORTS_PER_SOURCE = 25_000  # below the default ephemeral range (32768-60999)


def source_addresses(args: argparse.Namespace, sockets: int, endpoints: int) -> list[str]:
    """Loopback source addresses for the clients: one per ~25k sockets to one server port."""
    n = args.source_addrs
    if n <= 0:
        per_endpoint = -(-sockets // max(1, endpoints))
        n = -(-per_endpoint // PORTS_PER_SOURCE)
    if n <= 1:
        return []
    return [f"127.0.0.{i}" for i in range(1, min(n, 254) + 1)]


def check_server_fds(name: str, sockets: int, endpoints: int) -> None:
    """Fail early when a server process would need more descriptors than it may open."""
    per_process = -(-sockets // max(1, endpoints))
    limit = fd_limit()
    if per_process > limit - FD_RESERVE:
        raise SetupFailed(
            f"{name}: {per_process} sockets per server process, but RLIMIT_NOFILE is {limit} "
            f"(the hard limit here; raising it needs CAP_SYS_RESOURCE): use more server "
            f"processes (--gateways) or fewer sockets (at most ~{limit - FD_RESERVE} per process)"
        )


def other_cpu_cores(target: Target, seconds: float) -> float:
    """Cores used over ``seconds`` by processes that are not part of this run."""
    mine0, busy0, self0 = target.sup.sample(), machine_busy_seconds(), _self_cpu()
    time.sleep(seconds)
    mine1, busy1, self1 = target.sup.sample(), machine_busy_seconds(), _self_cpu()
    ours = sum(cpu_by_kind(mine0, mine1).values()) + (self1 - self0)
    return max(0.0, (busy1 - busy0) - ours) / seconds


def wait_for_quiet_machine(target: Target, max_wait: float, threshold: float) -> None:
    """Give other work on the machine (other tests) up to ``max_wait`` s to calm down."""
    if max_wait <= 0:
        return
    deadline = time.monotonic() + max_wait
    other = other_cpu_cores(target, 1.0)
    if other <= threshold:
        return
    say(
        f"other processes use {other:.2f} cores; waiting up to {max_wait:.0f}s for a quieter machine"
    )
    while time.monotonic() < deadline:
        other = other_cpu_cores(target, 1.0)
        if other <= threshold:
            return
    say(f"machine still busy ({other:.2f} cores used by others): figures may be disturbed")


def run_step(
    target: Target,
    scenario: Scenario,
    tag: str,
    args: argparse.Namespace,
    label: str,
    step_dir: Path,
    parked: list[Target] | None = None,
) -> dict[str, Any]:
    """Connect every socket, run the measured window, drain, verify; the step's figures.
    ``parked`` are other targets of the run, up and idle meanwhile: their CPU in the
    window is counted with the other processes' and reported on its own."""
    parked = parked or []
    step_dir.mkdir(parents=True, exist_ok=True)
    cpus = [int(c) for c in args.loadgen_cpus.split(",") if c.strip()] if args.loadgen_cpus else []
    n_procs = len(cpus) if cpus else max(1, args.loadgen_procs)
    # Each load generator process holds its sockets' descriptors: stay under the limit.
    per_proc_max = max(100, fd_limit() - FD_RESERVE)
    needed = -(-len(scenario.clients) // per_proc_max)
    if needed > n_procs:
        if cpus:
            raise SetupFailed(
                f"{len(scenario.clients)} sockets need {needed} load generator processes "
                f"(RLIMIT_NOFILE {fd_limit()}); give --loadgen-cpus {needed} cores"
            )
        say(f"{len(scenario.clients)} sockets: using {needed} load generator processes (fd limit)")
        n_procs = needed
    source_addrs = source_addresses(args, len(scenario.clients), len(target.urls))
    duration = float(args.duration)
    setup_timeout = args.setup_timeout + len(scenario.clients) / 50.0
    wait_for_quiet_machine(target, args.quiet_wait, args.quiet_cores)
    baseline = target.sup.sample()
    loadgens: list[Proc] = []
    lines: queue.Queue[tuple[int, str, dict[str, Any]]] = queue.Queue()

    def pump(index: int, proc: Proc) -> None:
        stream = proc.popen.stdout
        assert stream is not None
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                word, _, rest = line.strip().partition(" ")
                with contextlib.suppress(ValueError):
                    lines.put((index, word, json.loads(rest) if rest else {}))
        lines.put((index, "EOF", {}))

    outs = []
    for i in range(n_procs):
        out = step_dir / f"loadgen-{i}.json"
        outs.append(out)
        plan = {
            "proc": i,
            "adapter": target.adapter,
            "urls": target.urls,
            "run_tag": tag,
            "clients": [c for c in scenario.clients if c["gid"] % n_procs == i],
            "duration": duration,
            "drain": args.drain,
            "text_bytes": args.text_bytes,
            "history_limit": 50,
            "join": True,
            "join_timeout": 30,
            "connect_concurrency": args.connect_concurrency,
            "source_addrs": source_addrs,
            "join_concurrency": args.join_concurrency,
            "out": str(out),
            "max_seconds": setup_timeout + duration + args.drain + 60,
        }
        plan_path = step_dir / f"plan-{i}.json"
        plan_path.write_text(json.dumps(plan))
        proc = target.sup.spawn(
            f"loadgen-{tag}-{i}",
            "loadgen",
            [PYTHON, "-m", "tests.scale.loadgen", str(plan_path)],
            pipe_io=True,
            cpus={cpus[i]} if cpus else None,
        )
        loadgens.append(proc)
        threading.Thread(target=pump, args=(i, proc), daemon=True).start()

    try:
        # Setup: every load generator connects its sockets and joins their chats.
        ready: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + setup_timeout
        while len(ready) < n_procs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SetupFailed(f"load generators not ready within {setup_timeout:.0f}s")
            try:
                index, word, payload = lines.get(timeout=min(1.0, remaining))
            except queue.Empty:
                continue
            if word == "READY":
                ready[index] = payload
            elif word == "EOF":
                raise SetupFailed(
                    f"loadgen {index} exited during setup:\n{tail(loadgens[index].log_path)}"
                )
        connected = sum(r["connected"] for r in ready.values())
        joined = sum(r["joined"] for r in ready.values())
        setup_s = max(r["setup_s"] for r in ready.values())
        say(
            f"{label}: {connected}/{len(scenario.clients)} sockets connected, {joined} joined "
            f"in {setup_s:.1f}s"
        )
        if connected == 0:
            raise SetupFailed(
                f"no socket could connect; loadgen log:\n{tail(loadgens[0].log_path)}"
            )
        after_connect = target.sup.sample()
        speed_before = machine.check()

        # Measured window.
        go_ns = time.monotonic_ns() + 500_000_000
        for proc in loadgens:
            assert proc.popen.stdin is not None
            proc.popen.stdin.write(f"GO {go_ns}\n")
            proc.popen.stdin.flush()
        time.sleep(max(0.0, (go_ns - time.monotonic_ns()) / 1e9))
        window_start = time.time()
        s0 = target.sup.sample()
        parked0 = [other.sup.sample() for other in parked]
        totals0 = target.metric_totals()
        busy0 = machine_busy_seconds()
        steal0 = machine.steal_seconds()
        self0 = _self_cpu()
        progress = Progress(label, duration)
        latest: dict[int, dict[str, Any]] = {}
        samples: list[dict[str, Any]] = []
        next_sample = time.monotonic() + 1.0
        prev = s0
        end = time.monotonic() + duration
        done: set[int] = set()
        kill_at = args.kill_worker_at if target.name == "ours" else 0.0
        fault: dict[str, Any] | None = None
        while time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                index, word, payload = lines.get(timeout=0.2 if not kill_at else 0.05)
                if word == "PROGRESS":
                    latest[index] = payload
                elif word in ("DONE", "EOF"):
                    done.add(index)
            elapsed = duration - (end - time.monotonic())
            if kill_at and fault is None and elapsed >= kill_at:
                fault = {"killed": target.kill_worker(), "at_s": round(elapsed, 2)}
                say(f"{label}: {fault['killed']} SIGKILLed {fault['at_s']} s into the window")
                target.notes.append(
                    f"{fault['killed']} was SIGKILLed {fault['at_s']} s into the measured window "
                    f"of step {tag}: the requests of its partitions waited for another worker to "
                    "take them over, so the step's latencies include that wait (see its slowest "
                    "seconds); the goals are not judged on this run."
                )
            progress.update(elapsed, _sum(latest))
            if time.monotonic() >= next_sample:
                cur = target.sup.sample()
                samples.append({"t": round(elapsed, 1), "cpu_s": cpu_by_kind(prev, cur)})
                prev = cur
                next_sample += 1.0
        s1 = target.sup.sample()
        parked1 = [other.sup.sample() for other in parked]
        totals1 = target.metric_totals()
        busy1 = machine_busy_seconds()
        steal1 = machine.steal_seconds()
        self1 = _self_cpu()
        progress.update(duration, _sum(latest), force=True)
        progress.done()

        # Drain and results.
        final_deadline = time.monotonic() + args.drain + 30
        while len(done) < n_procs and time.monotonic() < final_deadline:
            with contextlib.suppress(queue.Empty):
                index, word, payload = lines.get(timeout=0.5)
                if word in ("DONE", "EOF"):
                    done.add(index)
        for proc in loadgens:
            try:
                proc.popen.wait(max(1.0, final_deadline - time.monotonic()))
            except Exception:
                pass
        s2 = target.sup.sample()
        # After the drain, with the load generators gone: the machine as quiet as before.
        speed_after = machine.check()
        results = []
        for i, out in enumerate(outs):
            if not out.exists():
                raise SetupFailed(f"loadgen {i} wrote no results:\n{tail(loadgens[i].log_path)}")
            results.append(json.loads(out.read_bytes()))
    finally:
        for proc in loadgens:
            target.sup.stop(proc, timeout=5)

    # Verification.
    stored = None
    if target.kind in STORES:
        time.sleep(0.5)
        stored = target.stored_messages(tag, list(scenario.chats))
    if target.kind == "ours":
        target.scrape_metrics(step_dir)
    verification = verify(results, stored)

    # Figures.
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    unanswered: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r["unanswered"].items():
            unanswered[k] = unanswered.get(k, 0) + v
    hists = {
        name: merge_encoded([r["hist"].get(name, "") for r in results])
        for name in ("send_reply", "delivery", "history_reply", "join_reply", "send_lag")
    }
    # The generators' own collector pauses in the window (older results have none).
    pauses = [r["gc"] for r in results if r.get("gc")]
    loadgen_gc = {
        "collections": sum(p["collections"] for p in pauses),
        "pause_ms_max": max((p["pause_ms_max"] for p in pauses), default=0.0),
        "pause_ms_total": round(sum(p["pause_ms_total"] for p in pauses), 3),
    }
    cpu_window = cpu_by_kind(s0, s1)
    cpu_total = cpu_by_kind(s0, s2)
    server_kinds = [k for k in cpu_window if k != "loadgen"]
    server_cpu = sum(cpu_window[k] for k in server_kinds)
    loadgen_cpu = cpu_window.get("loadgen", 0.0)
    sent = counts.get("sent", 0)
    deliveries = counts.get("deliveries", 0)
    # CPU used on the machine by processes that are not part of this run (other users'
    # tests, the harness itself): when large, the figures of this step are disturbed.
    harness_cpu = self1 - self0
    background = max(0.0, (busy1 - busy0) - server_cpu - loadgen_cpu - harness_cpu)
    parked_by_kind = {
        other.name: cpu_by_kind(before, after)
        for other, before, after in zip(parked, parked0, parked1, strict=True)
    }
    parked_cpu = {name: sum(kinds.values()) for name, kinds in parked_by_kind.items()}
    # Memory: peak RSS (VmHWM) per process, and RSS growth per connected socket.
    procs_mem = {}
    for info in s2.values():
        procs_mem[info["name"]] = {
            "kind": info["kind"],
            "peak_rss_mb": round(info["hwm_kb"] / 1024, 1),
            "rss_mb": round(info["rss_kb"] / 1024, 1),
        }
    per_conn: dict[str, float] = {}
    for kind in {i["kind"] for i in after_connect.values()}:
        if kind == "loadgen":
            continue
        grew = sum(
            after_connect[pid]["rss_kb"] - baseline[pid]["rss_kb"]
            for pid in after_connect
            if pid in baseline and after_connect[pid]["kind"] == kind
        )
        per_conn[kind] = round(grew / max(1, connected), 2)
    lg_rss = sum(r.get("rss_kb", 0) - r.get("rss_kb_start", 0) for r in ready.values())
    per_conn["loadgen (client side)"] = round(lg_rss / max(1, connected), 2)
    if target.first_per_conn is None:
        target.first_per_conn = per_conn
        target.first_per_conn_tag = tag
    for r in results:
        procs_mem[f"loadgen-{tag}-{r['proc']}"] = {
            "kind": "loadgen",
            "peak_rss_mb": round(r.get("maxrss_kb", 0) / 1024, 1),
            "rss_mb": None,
        }

    step = {
        "target": target.name,
        "tag": tag,
        "offered_send_rate": scenario.send_rate,
        "offered_history_rate": scenario.history_rate,
        "offered_deliveries_per_s": round(scenario.offered_deliveries, 1),
        "duration_s": duration,
        "window_start_unix": round(window_start, 3),
        "sockets": len(scenario.clients),
        "sockets_connected": connected,
        "setup_s": setup_s,
        "achieved": {
            "sends_per_s": round(sent / duration, 1),
            "acked_per_s": round(counts.get("acked", 0) / duration, 1),
            "deliveries_per_s": round(deliveries / duration, 1),
            "history_per_s": round(counts.get("history_ok", 0) / duration, 1),
        },
        "counts": counts,
        "errors": errors,
        "unanswered": unanswered,
        "latency_ms": {name: summarize(h) for name, h in hists.items()},
        "cpu_s_window": cpu_window,
        "cpu_s_with_drain": cpu_total,
        "parked_cpu_s_window": parked_by_kind,
        "cpu": {
            "server_s": round(server_cpu, 3),
            "loadgen_s": round(loadgen_cpu, 3),
            "server_cores": round(server_cpu / duration, 3),
            "loadgen_cores": round(loadgen_cpu / duration, 3),
            "other_cores": round(background / duration, 3),
            # Of which the run's other targets, up and idle (``--order interleaved``).
            "parked_cores": {name: round(v / duration, 3) for name, v in parked_cpu.items()},
            "harness_cores": round(harness_cpu / duration, 3),
            "server_us_per_send": round(server_cpu * 1e6 / sent, 1) if sent else None,
            "server_us_per_delivery": round(server_cpu * 1e6 / deliveries, 1)
            if deliveries
            else None,
            "loadgen_us_per_send": round(loadgen_cpu * 1e6 / sent, 1) if sent else None,
            "loadgen_us_per_delivery": round(loadgen_cpu * 1e6 / deliveries, 1)
            if deliveries
            else None,
            "server_us_per_socket_second": round(server_cpu * 1e6 / (connected * duration), 3)
            if connected
            else None,
        },
        "memory": {
            "processes": procs_mem,
            # Measured when the servers first took sockets: they keep the memory they grew
            # (allocators rarely give it back), so later steps would show almost nothing.
            "rss_kb_per_connection": target.first_per_conn or per_conn,
            "rss_kb_per_connection_measured_in": target.first_per_conn_tag or tag,
            "rss_kb_per_connection_this_step": per_conn,
        },
        "cpu_timeline": samples,
        "machine": {
            "before": speed_before,
            "after": speed_after,
            "steal_cores": round((steal1 - steal0) / duration, 3),
        },
        "loadgen_gc": loadgen_gc,
        "slowest_seconds": slowest_seconds([r.get("timeline", {}) for r in results], duration),
        "server_time": server_time.window(totals0, totals1, duration, args.workers)
        if totals0 is not None and totals1 is not None
        else None,
        "fault": fault,
        "verification": verification,
        "passed": verification["passed"],
        # Other processes used a noticeable share of the 2 cores during the window.
        "disturbed": background / duration > args.quiet_cores,
    }
    (step_dir / "step.json").write_text(json.dumps(step, indent=1))
    return step


def _self_cpu() -> float:
    """CPU seconds of this harness process (its sampling and progress display)."""
    t = os.times()
    return t.user + t.system


def _sum(latest: dict[int, dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for payload in latest.values():
        for k, v in payload.items():
            total[k] = total.get(k, 0) + int(v)
    return total


# --------------------------------------------------------------------------- runs


def build_scenario(args: argparse.Namespace, endpoints: int, workload: str) -> Scenario:
    if workload == "chat":
        return chat_workload(args.sockets or 1000, args.chat_size, args.rate or 500.0, endpoints)
    if workload == "rooms":
        return rooms_workload(
            args.sockets or 2000,
            args.room_size,
            args.senders_per_room,
            args.rate or 40.0,
            endpoints,
        )
    if workload == "idle":
        return idle_workload(args.idle_sockets, endpoints, args.chat_size, not args.idle_no_join)
    if workload == "history":
        return history_workload(
            args.history_prefill,
            args.history_readers,
            args.history_rate,
            args.history_writers,
            args.rate or 100.0,
            args.chat_size,
            endpoints,
        )
    raise ValueError(workload)


def sweep_rates(args: argparse.Namespace, base: float) -> list[float]:
    if args.sweep_rates:
        return [float(x) for x in args.sweep_rates.split(",") if x.strip()]
    rates = []
    rate = base
    for _ in range(args.sweep_max_steps):
        rates.append(round(rate, 1))
        rate *= args.sweep_factor
    return rates


def step_order(names: list[str], index: int) -> list[str]:
    """The order the targets run their ``index``-th step in: as given, then reversed,
    and so on (A B, B A, A B, ...). Whatever drifts on the machine over a run, no target
    is always the one measured first or last."""
    return list(names) if index % 2 == 0 else list(reversed(names))


class TargetRun:
    """One target through a run: started once, its step(s) (one per offered rate), and
    its part of the report."""

    def __init__(
        self, name: str, args: argparse.Namespace, run_dir: Path, report_dir: Path
    ) -> None:
        self.name = name
        self.args = args
        self.run_dir = run_dir
        self.report_dir = report_dir
        self.workload = args.sweep_of if args.workload == "sweep" else args.workload
        # The single-process peer has one server; every other target --gateways.
        self.endpoints = 1 if name == "aiohttp" else args.gateways
        self.scenario = build_scenario(args, self.endpoints, self.workload)
        self.rates = (
            sweep_rates(args, self.scenario.send_rate)
            if args.workload == "sweep"
            else [self.scenario.send_rate] * args.rounds
        )
        self.budget_s = len(self.rates) * (
            args.setup_timeout + len(self.scenario.clients) / 50 + args.duration + args.drain + 90
        )
        self.target: Target | None = None
        self.steps: list[dict[str, Any]] = []
        self.done = False  # no more steps: all run, the sweep's limit found, or setup failed
        self.out: dict[str, Any] = {
            "target": name,
            "workload": self.workload,
            "description": self.scenario.description,
        }

    def start(self, max_seconds: float) -> None:
        """Start the target's processes (they may live ``max_seconds`` at most)."""
        self.target = Target(self.name, self.args, self.run_dir, max_seconds)
        try:
            say(f"{self.name}: starting ({self.scenario.description})")
            check_server_fds(self.name, len(self.scenario.clients), self.endpoints)
            t0 = time.monotonic()
            self.target.start(self.scenario)
            self.out["start_s"] = round(time.monotonic() - t0, 1)
            self.out["urls"] = self.target.urls
            if self.target.commit is not None:
                self.out["code_commit"] = self.target.commit
        except SetupFailed as exc:
            self._failed(exc)

    def wants(self, index: int) -> bool:
        return not self.done and index < len(self.rates)

    def step(self, index: int, order: list[str], parked: list[Target]) -> None:
        """Run the ``index``-th step (repeated when disturbed, as ``--retry-disturbed``
        says); ``parked`` are the other targets, up and idle meanwhile."""
        assert self.target is not None
        args, name, rate = self.args, self.name, self.rates[index]
        scenario = (
            self.scenario if rate == self.scenario.send_rate else with_rate(self.scenario, rate)
        )
        label = f"{name} {self.workload}"
        if args.workload == "sweep":
            label += f" @{rate:g}/s"
        elif args.rounds > 1:
            label += f" round {index + 1}/{args.rounds}"
        discarded = []
        try:
            for attempt in range(args.retry_disturbed + 1):
                tag = f"s{index}" if attempt == 0 else f"s{index}r{attempt}"
                step = run_step(
                    self.target,
                    scenario,
                    tag,
                    args,
                    label,
                    self.report_dir / "steps" / f"{name}-{tag}",
                    parked,
                )
                if attempt == args.retry_disturbed or not should_repeat(step):
                    break
                say(f"{label}: disturbed by other processes, repeating the step")
                _print_step(step)
                discarded.append(
                    {
                        "tag": tag,
                        "other_cores": step["cpu"]["other_cores"],
                        "passed": step["passed"],
                    }
                )
        except SetupFailed as exc:
            self._failed(exc)
            return
        step["discarded_disturbed_attempts"] = discarded
        step["order"] = {"position": order.index(name) + 1, "targets": order}
        if args.workload == "sweep":
            step["sustainable"], step["verdict"] = step_ok(step, args.slo_p99_ms)
        # Kept before it is announced: a run interrupted from here on reports it.
        self.steps.append(step)
        if args.workload == "sweep":
            ok, why = step["sustainable"], step["verdict"]
            say(f"{label}: {'sustainable' if ok else 'NOT sustainable'} ({why})")
        _print_step(step)
        if index == len(self.rates) - 1 or (args.workload == "sweep" and not step["sustainable"]):
            self.done = True

    def finish(self) -> dict[str, Any]:
        """The target's part of the report (after its probe, for ours); stops it."""
        args, steps = self.args, self.steps
        try:
            if (
                "setup_error" not in self.out
                and self.target is not None
                and self.name == "ours"
                and args.probe_rounds > 0
                and steps
                and steps[-1]["passed"]
            ):
                self.out["probe"] = self.target.probe(args.probe_rounds, args.probe_gap_ms)
        except SetupFailed as exc:
            self._failed(exc)
        finally:
            self.close()
        out = self.partial()
        if args.workload == "sweep" and "setup_error" not in out:
            good = [s["offered_send_rate"] for s in self.steps if s.get("sustainable")]
            out["sustainable_send_rate"] = max(good) if good else None
            out["sweep_limit_reached"] = any(not s.get("sustainable") for s in self.steps)
        return out

    def partial(self) -> dict[str, Any]:
        """The target's part of the report so far (all of it but a sweep's verdict: for a
        run interrupted before :meth:`finish`)."""
        out = dict(self.out, steps=self.steps)
        out["passed"] = "setup_error" not in out and all(s["passed"] for s in self.steps)
        if self.target is not None:
            out["notes"] = self.target.notes
        return out

    def close(self) -> None:
        if self.target is not None:
            self.target.close()

    def _failed(self, exc: SetupFailed) -> None:
        say(f"{self.name}: SETUP FAILED: {exc}")
        self.out["setup_error"] = str(exc)
        self.out["passed"] = False
        self.out["steps"] = []
        self.steps = []
        self.done = True


def run_targets(
    names: list[str],
    args: argparse.Namespace,
    run_dir: Path,
    report_dir: Path,
    results: list[dict[str, Any]],
) -> None:
    """Every target's steps, into ``results`` (in the order of ``names``).
    ``--order interleaved`` (with more than one target): all targets are started first,
    and each step's rate is run on every target before the next rate, in
    :func:`step_order`, the others up and idle meanwhile. ``sequential``: one target
    after the other, each stopped before the next starts. Interrupted, ``results`` holds
    what was measured until then."""
    runs = [TargetRun(name, args, run_dir, report_dir) for name in names]
    finished: dict[str, dict[str, Any]] = {}
    try:
        if args.order == "interleaved" and len(runs) > 1:
            # Each target lives through the whole run.
            budget = sum(r.budget_s for r in runs) + args.ready_timeout * 2 * len(runs) + 300
            for run in runs:
                run.start(budget)
            by_name = {run.name: run for run in runs}
            index = 0
            while any(run.wants(index) for run in runs):
                order = step_order([r.name for r in runs if r.wants(index)], index)
                for name in order:
                    parked = [r.target for r in runs if r.name != name and r.target is not None]
                    by_name[name].step(index, order, parked)
                index += 1
            for run in runs:
                finished[run.name] = run.finish()
        else:
            for run in runs:
                run.start(run.budget_s + args.ready_timeout * 2 + 300)
                index = 0
                while run.wants(index):
                    run.step(index, [run.name], [])
                    index += 1
                finished[run.name] = run.finish()
    finally:
        results[:] = [
            finished.get(run.name) or run.partial()
            for run in runs
            if run.name in finished or run.steps
        ]
        for run in runs:
            run.close()


def _print_step(step: dict[str, Any]) -> None:
    lat = step["latency_ms"]
    ach = step["achieved"]
    v = step["verification"]

    def p(name: str) -> str:
        s = lat[name]
        if not s["count"]:
            return "-"
        return f"p50 {s['p50']} p99 {s['p99']} max {s['max']} ms"

    say(
        f"  {step['target']}: sends {ach['sends_per_s']}/s (offered {step['offered_send_rate']:g}) "
        f"acked {ach['acked_per_s']}/s deliveries {ach['deliveries_per_s']}/s; "
        f"reply {p('send_reply')}; delivery {p('delivery')}"
        + (f"; history {p('history_reply')}" if lat["history_reply"]["count"] else "")
    )
    say(
        f"  server CPU {step['cpu']['server_cores']} cores, loadgen {step['cpu']['loadgen_cores']} cores; "
        f"errors {step['errors'] or 0}; verification {'PASSED' if v['passed'] else 'FAILED ' + str(v['failures'])}"
    )
    speed = step.get("machine")
    if speed:
        say(f"  machine: {machine.describe(speed)}")
    if step["disturbed"]:
        say(
            f"  WARNING: other processes used {step['cpu']['other_cores']} cores during this "
            "window: latencies are disturbed; repeat on a quiet machine"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.scale.harness",
        description="Load test of the chat gateway (and, with --peers, comparison stacks).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workload", choices=("chat", "rooms", "idle", "history", "sweep"), default="chat"
    )
    p.add_argument(
        "--peers", action="store_true", help="also run the socketio, channels and aiohttp peers"
    )
    p.add_argument(
        "--targets",
        default="",
        help="comma list from ours,socketio,channels,aiohttp,chain (overrides --peers; chain, ours without its features, runs only when named)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="measured seconds per step (when 0: idle 40, sweep 10 per step, else 20)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered send_message/s in total (workload default when 0: chat 500, rooms 40, history writes 100)",
    )
    p.add_argument(
        "--gateways",
        type=int,
        default=2,
        help="gateway processes (and socketio/channels peer processes)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument(
        "--kill-worker-at",
        type=float,
        default=0.0,
        help="ours: SIGKILL one worker this many seconds into the measured window (needs "
        "--workers 2 or more; not with sweep): how long its chats wait for another to take "
        "them over, and that nothing is lost (0: no fault)",
    )
    p.add_argument("--loadgen-procs", type=int, default=1, help="load generator processes")
    p.add_argument(
        "--loadgen-cpus",
        default="",
        help="cores for the load generators, e.g. '1' or '0,1': one process pinned to each "
        "(overrides --loadgen-procs); servers are not pinned",
    )
    p.add_argument(
        "--sockets",
        type=int,
        default=0,
        help="sockets (workload default when 0: chat 1000, rooms 2000)",
    )
    p.add_argument("--chat-size", type=int, default=5)
    p.add_argument("--room-size", type=int, default=200)
    p.add_argument("--senders-per-room", type=int, default=2)
    p.add_argument(
        "--idle-sockets", type=int, default=2000, help="idle: sockets per server process"
    )
    p.add_argument("--idle-no-join", action="store_true", help="idle: connect only, join no chat")
    p.add_argument("--history-prefill", type=int, default=1_000_000)
    p.add_argument("--history-readers", type=int, default=20)
    p.add_argument("--history-rate", type=float, default=500.0)
    p.add_argument("--history-writers", type=int, default=200)
    p.add_argument("--sweep-of", choices=("chat", "rooms"), default="chat")
    p.add_argument(
        "--sweep-rates",
        default="",
        help="comma list of offered rates (else start at --rate, times --sweep-factor)",
    )
    p.add_argument("--sweep-factor", type=float, default=1.5)
    p.add_argument("--sweep-max-steps", type=int, default=6)
    p.add_argument("--slo-p99-ms", type=float, default=50.0)
    p.add_argument("--text-bytes", type=int, default=64)
    p.add_argument(
        "--drain", type=float, default=10.0, help="max seconds to wait for replies after the window"
    )
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=5.0)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra env for gateways and workers",
    )
    p.add_argument(
        "--mongo-options",
        default="",
        metavar="QUERY",
        help="URI options for ours' MONGO_URL, e.g. journal=false to acknowledge before "
        "the journal flush (default: none, i.e. the worker's write concern, j: true)",
    )
    p.add_argument("--channels-layer", choices=("core", "pubsub"), default="core")
    p.add_argument("--connect-concurrency", type=int, default=64)
    p.add_argument(
        "--join-concurrency",
        type=int,
        default=128,
        help="get_history joins in flight per load generator during setup",
    )
    p.add_argument(
        "--source-addrs",
        type=int,
        default=0,
        help="loopback source addresses (127.0.0.1..N) the clients connect from; 0: one per "
        "25,000 sockets per server port",
    )
    p.add_argument("--setup-timeout", type=float, default=60.0)
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="max seconds to wait before a step for other processes to use less than --quiet-cores",
    )
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.25,
        help="CPU (cores) used by processes outside the run above which a step is flagged as disturbed",
    )
    p.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="with several targets: interleaved starts them all and runs each rate on every "
        "target before the next rate, the order reversed at each rate (A B, B A, ...), the "
        "others idle meanwhile; sequential runs one target after the other, each stopped "
        "before the next starts",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="workloads other than sweep: run the step this many times on each target (with "
        "several targets interleaved, so each is measured first as often as last); ratios "
        "and goals are then taken on the median round",
    )
    p.add_argument(
        "--retry-disturbed",
        type=int,
        default=1,
        help="repeat a step (up to this many times) when other processes disturbed it",
    )
    p.add_argument(
        "--probe-rounds",
        type=int,
        default=200,
        help="ours, after the load: requests of each kind sent one at a time (tests/scale/"
        "probe.py), the floor a request stands on; 0: none",
    )
    p.add_argument(
        "--probe-gap-ms",
        type=float,
        default=2.0,
        help="the probe's pause before each request (longer: the processes go idle between "
        "requests, and on a virtual machine a woken process answers slower)",
    )
    p.add_argument("--out", default="reports")
    p.add_argument("--data-dir", default=".var/scale")
    p.add_argument("--keep-data", action="store_true")
    args = p.parse_args(argv)
    if not args.duration:
        args.duration = {"idle": 40.0, "sweep": 10.0}.get(args.workload, 20.0)
    if args.workload == "sweep" and not args.rate and not args.sweep_rates:
        args.rate = 250.0 if args.sweep_of == "chat" else 20.0
    if args.rounds < 1 or (args.rounds > 1 and args.workload == "sweep"):
        p.error("--rounds must be 1 or more, and 1 for a sweep (each rate is its round)")
    if args.workload == "history" and args.history_prefill < 51:
        p.error("--history-prefill must be at least 51")
    return args


def choose_targets(args: argparse.Namespace) -> list[str]:
    if args.targets:
        names = [t.strip() for t in args.targets.split(",") if t.strip()]
        bad = [t for t in names if kind_of(t) not in TARGETS]
        if bad:
            raise SystemExit(f"unknown target(s) {bad}; choose from {TARGETS} or ours@REV")
        if len(set(names)) < len(names):
            raise SystemExit(f"a target named twice in {names}")
        for name in names:
            if kind_of(name) != name:
                resolve_revision(name[len(BASELINE) :])
        return names
    names = ["ours"] + (list(PEERS) if args.peers else [])
    return names


def should_repeat(step: dict[str, Any]) -> bool:
    """Whether a step is run again (up to ``--retry-disturbed`` times): when other
    processes disturbed its window, but not when it failed its integrity checks (that
    counts, disturbed or not), nor when a worker was killed in it (the stack has a
    worker fewer now, and no goal is judged on such a run anyway)."""
    return bool(step["disturbed"]) and bool(step["passed"]) and step["fault"] is None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kill_worker_at:
        window = args.duration
        if args.workers < 2 or args.workload == "sweep" or not 0 < args.kill_worker_at < window:
            raise SystemExit(
                "--kill-worker-at needs --workers 2 or more, a workload other than sweep, "
                "and a time inside the window"
            )
    raise_nofile()
    os.chdir(ROOT)
    targets = choose_targets(args)
    workload = args.sweep_of if args.workload == "sweep" else args.workload
    if args.workload == "history":
        skipped = [t for t in targets if kind_of(t) not in STORES]
        if skipped:
            say(f"history: peers store nothing, skipping {skipped}")
        targets = [t for t in targets if kind_of(t) in STORES]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report_dir = Path(args.out) / f"{stamp}-{args.workload}"
    report_dir.mkdir(parents=True, exist_ok=True)
    run_dir = report_dir  # logs and plans live next to the report
    command = (
        "python -m tests.scale.harness " + shlex.join(sys.argv[1:] if argv is None else argv)
    ).rstrip()

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    # Explicitly, since a shell starting us in the background sets SIGINT to "ignore".
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    interrupted = False
    try:
        run_targets(targets, args, run_dir, report_dir, results)
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        say("interrupted: every process of the run was stopped")
    report = reporting.build(args, workload, targets, results, command, time.monotonic() - started)
    report["interrupted"] = interrupted
    reporting.write(report, report_dir)
    print(reporting.summary(report, report_dir))
    if interrupted:
        return 130
    # The verdict is the gateway's: a peer that loses messages under the same load is a
    # finding of the comparison (reported), not a failure of this project.
    judged = [r for r in results if r["target"] == "ours"] or results
    if any(r.get("setup_error") for r in judged):
        return 2
    return 0 if judged and all(r["passed"] for r in judged) else 1


if __name__ == "__main__":
    raise SystemExit(main())
