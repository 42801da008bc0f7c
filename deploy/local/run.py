"""``make run``: the whole system on this machine, until Ctrl-C.

Starts Redis and MongoDB as local processes (data under ``.var/``), one worker and one
gateway, creates a demo chat with two users if absent, prints the links to open, and
stops everything it started on Ctrl-C or SIGTERM.

Ports: GATEWAY_PORT (8080), REDIS_PORT (6379), MONGO_PORT (27017), WORKER_HTTP_PORT (9100).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

from deploy.local.servers import LocalServer, SetupError, mongo_server, redis_server, require_free
from shared.codec import token_digest
from shared.config import Settings
from shared.mongo import create_client
from worker.store import Store

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".var" / "run"
DEMO_CHAT = "demo"
DEMO_USERS = (("ivan", "Ivan Petrov"), ("anna", "Anna Smirnova"))


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name) or str(default)
    try:
        return int(raw)
    except ValueError:
        raise SetupError(f"{name}={raw!r} is not a port number") from None


async def _demo_data(settings: Settings) -> dict[str, str]:
    """Create the demo users and chat if absent; return a fresh token per user."""
    import secrets

    client = create_client(settings.mongo_url, appname="make-run")
    try:
        store = Store(client[settings.mongo_database])
        await store.ensure_indexes()
        tokens: dict[str, str] = {}
        for user_id, name in DEMO_USERS:
            await store.users.update_one(
                {"_id": user_id}, {"$setOnInsert": {"username": name, "avatar": None}}, upsert=True
            )
            token = secrets.token_hex(16)
            await store.tokens.insert_one({"_id": token_digest(token), "user_id": user_id})
            tokens[user_id] = token
        await store.chats.update_one(
            {"_id": DEMO_CHAT},
            {
                "$setOnInsert": {"title": "Demo chat"},
                "$addToSet": {"member_ids": {"$each": [u for u, _ in DEMO_USERS]}},
            },
            upsert=True,
        )
        return tokens
    finally:
        await client.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"{what} exited with code {proc.returncode} (its log is above)")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SetupError(f"{what} did not become ready at {url} within {timeout:.0f}s")


def main() -> int:
    """Run until interrupted; exit 1 with a clear sentence on a set-up problem."""
    started: list[LocalServer] = []
    children: list[subprocess.Popen[bytes]] = []
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        gateway_port = _port("GATEWAY_PORT", 8080)
        worker_port = _port("WORKER_HTTP_PORT", 9100)
        redis_port = _port("REDIS_PORT", 6379)
        mongo_port = _port("MONGO_PORT", 27017)
        require_free(gateway_port, "the gateway", "GATEWAY_PORT")
        require_free(worker_port, "the worker's metrics", "WORKER_HTTP_PORT")
        print("[run] starting Redis and MongoDB ...", flush=True)
        redis = redis_server(redis_port, DATA / "redis").start()
        started.append(redis)
        mongo = mongo_server(mongo_port, DATA / "mongo").start(timeout=60)
        started.append(mongo)
        env = dict(os.environ, REDIS_URL=redis.url, MONGO_URL=mongo.url)
        env.setdefault("GATEWAY_HOST", "127.0.0.1")
        env["GATEWAY_PORT"] = str(gateway_port)
        env["WORKER_HTTP_PORT"] = str(worker_port)
        settings = Settings.from_env(env)
        tokens = asyncio.run(_demo_data(settings))
        for module in ("worker", "gateway"):
            children.append(subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT))
        _wait_ready(f"http://127.0.0.1:{worker_port}/readyz", children[0], "the worker")
        _wait_ready(f"http://127.0.0.1:{gateway_port}/readyz", children[1], "the gateway")
        host = (
            settings.gateway_host if settings.gateway_host not in ("0.0.0.0", "::") else "127.0.0.1"
        )
        base = f"http://{host}:{gateway_port}"
        lines = [
            "",
            "Chat gateway is running. Ctrl-C stops everything.",
            f"  WebSocket URL : ws://{host}:{gateway_port}/ws  (also ws://{host}:{gateway_port}/)",
            f"  chat id       : {DEMO_CHAT}",
        ]
        for user_id, name in DEMO_USERS:
            query = urlencode({"token": tokens[user_id], "chat_id": DEMO_CHAT})
            lines.append(f"  {name:<14}: token {tokens[user_id]}")
            lines.append(f"                  open {base}/?{query}")
        lines += [
            f"  metrics       : {base}/metrics  and  http://127.0.0.1:{worker_port}/metrics",
            "",
        ]
        print("\n".join(lines), flush=True)
        while not stop:
            for child in children:
                if child.poll() is not None:
                    raise SetupError(f"a child process exited with code {child.returncode}")
            time.sleep(0.3)
        return 0
    except SetupError as exc:
        print(f"[run] {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("[run] stopping ...", flush=True)
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        for server in reversed(started):
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
