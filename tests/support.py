"""Test helpers: a protocol client, a stack of gateways and workers, data seeding.

Everything here talks to the real Redis and MongoDB started by ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

import gateway.app
import worker.app
from deploy.local.servers import free_port
from shared.codec import token_digest
from shared.config import Settings, env_names
from shared.mongo import create_client
from worker.store import Store

ROOT = Path(__file__).resolve().parent.parent
REPLY_TIMEOUT = 10.0


def message_docs(
    chat: str, first: int, count: int, *, text: str = "message {seq}"
) -> list[dict[str, Any]]:
    """Stored-message documents of one chat, sequence ids ``first`` on, as the worker
    writes them (``text`` is formatted with the sequence id)."""
    return [
        {
            "_id": f"{chat}-{seq}",
            "chat_id": chat,
            "seq": seq,
            "user_id": "7",
            "username": "user7",
            "avatar": None,
            "type": "text",
            "text": text.format(seq=seq),
            "file_url": None,
            "created_at": 1_800_000_000 + seq,
        }
        for seq in range(first, first + count)
    ]


class Client:
    """A WebSocket client speaking the chat protocol; separates replies from pushes."""

    _ids = itertools.count(1)

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, token: str | None = None) -> None:
        self.ws = ws
        self.token = token
        self.frames: list[dict[str, Any]] = []  # every frame received, in order
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._plain_waiting = 0
        self._reader = asyncio.create_task(self._read())
        self.closed: asyncio.Future[tuple[int | None, str]] = (
            asyncio.get_running_loop().create_future()
        )

    async def _read(self) -> None:
        reason = ""
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
                    reason = str(msg.extra or "")
                    break
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
                if msg.type == aiohttp.WSMsgType.TEXT:
                    frame = orjson.loads(msg.data)
                    self.frames.append(frame)
                    # Replies to our requests carry our request_id; a frame without one
                    # answers a plain (seed-style) request while one is outstanding.
                    if "request_id" in frame:
                        self.replies.put_nowait(frame)
                    elif self._plain_waiting > 0:
                        self._plain_waiting -= 1
                        self.replies.put_nowait(frame)
                    else:
                        self.pushes.put_nowait(frame)
        finally:
            if not self.closed.done():
                self.closed.set_result((self.ws.close_code, reason))

    async def send_raw(self, data: str | bytes, *, expect_reply: bool = True) -> None:
        """Send a frame as-is (binary for bytes); its reply is taken by :meth:`reply`."""
        if expect_reply:
            self._plain_waiting += 1
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)

    async def queue_text(self, chat_id: str, text: str, request_id: str) -> None:
        """``send_message`` of a text without waiting; its reply is taken by :meth:`reply`."""
        body = {
            "event_type": "send_message",
            "chat_id": chat_id,
            "token": self.token,
            "message": {"type": "text", "text": text},
            "request_id": request_id,
        }
        # Its reply carries the request_id: not counted as a plain request's, which would
        # take the next push without one for a reply.
        await self.send_raw(orjson.dumps(body).decode(), expect_reply=False)

    async def reply(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """The next reply (a frame that answers a request of ours)."""
        return await asyncio.wait_for(self.replies.get(), timeout)

    async def push(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """The next push (a message someone else stored)."""
        return await asyncio.wait_for(self.pushes.get(), timeout)

    async def no_push(self, wait: float = 0.5) -> None:
        """Assert that no push arrives within ``wait`` seconds."""
        with contextlib.suppress(TimeoutError):
            frame = await asyncio.wait_for(self.pushes.get(), wait)
            raise AssertionError(f"unexpected push: {frame}")

    async def request(
        self,
        event_type: str,
        chat_id: str | int,
        message: Any = None,
        *,
        token: str | None = None,
        request_id: str | None = None,
        plain: bool = False,
        timeout: float = REPLY_TIMEOUT,
    ) -> dict[str, Any]:
        """Send a request and wait for its reply (``plain``: without a request_id)."""
        body: dict[str, Any] = {
            "chat_id": chat_id,
            "token": token if token is not None else self.token,
            "event_type": event_type,
            "message": message,
        }
        if plain:
            self._plain_waiting += 1
        else:
            body["request_id"] = request_id or f"t{next(self._ids)}"
        await self.ws.send_str(orjson.dumps(body).decode())
        reply = await self.reply(timeout)
        if not plain:
            assert reply.get("request_id") == body["request_id"], (body, reply)
        return reply

    async def send_text(self, chat_id: str, text: str, **kwargs: Any) -> dict[str, Any]:
        """``send_message`` of a text; returns the reply."""
        message = {"type": "text", "text": text}
        if "client_msg_id" in kwargs:
            message["client_msg_id"] = kwargs.pop("client_msg_id")
        return await self.request("send_message", chat_id, message, **kwargs)

    async def join(self, chat_id: str) -> dict[str, Any]:
        """``get_history`` (which authorises this socket for the chat's pushes)."""
        reply = await self.request("get_history", chat_id)
        assert reply["type"] == "success", reply
        return reply

    async def close(self) -> None:
        """Close the socket and stop reading."""
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


@dataclass
class Seeder:
    """Writes users, tokens and chats straight into MongoDB (what a host app does)."""

    store: Store
    users: dict[str, str] = field(default_factory=dict)  # user_id -> token
    _n: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def user(self, username: str | None = None, avatar: str | None = None) -> tuple[str, str]:
        """Create a user with a token; returns (user_id, token)."""
        user_id = f"u{next(self._n)}"
        token = uuid.uuid4().hex
        await self.store.users.insert_one(
            {"_id": user_id, "username": username or f"User {user_id}", "avatar": avatar}
        )
        await self.store.tokens.insert_one({"_id": token_digest(token), "user_id": user_id})
        self.users[user_id] = token
        return user_id, token

    async def chat(self, *member_ids: str, chat_id: str | None = None) -> str:
        """Create a chat with these members; returns its id."""
        chat_id = chat_id or f"c{next(self._n)}"
        await self.store.chats.insert_one(
            {"_id": chat_id, "title": chat_id, "member_ids": list(member_ids)}
        )
        return chat_id


class Stack:
    """Gateways and workers for one test: in-process apps or real processes."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self._servers: list[TestServer] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._clients: list[Client] = []
        self._logs: list[Path] = []

    # In-process: fast, used by most tests.
    async def gateway(self, **overrides: Any) -> str:
        """Start an in-process gateway; returns its base URL."""
        settings = replace(self.settings, node_id=f"gw-{uuid.uuid4().hex[:8]}", **overrides)
        server = TestServer(gateway.app.create_app(settings), host="127.0.0.1", port=free_port())
        await server.start_server()
        self._servers.append(server)
        url = str(server.make_url("/"))
        await self.wait_ready(url)
        return url

    async def worker(self, **overrides: Any) -> web.Application:
        """Start an in-process worker; returns its app."""
        settings = replace(self.settings, node_id=f"wk-{uuid.uuid4().hex[:8]}", **overrides)
        app = worker.app.create_app(settings)
        server = TestServer(app, host="127.0.0.1", port=free_port())
        await server.start_server()
        self._servers.append(server)
        await self.wait_ready(str(server.make_url("/")))
        return app

    # Real processes, as deployed: `python -m gateway` / `python -m worker`.
    def process_env(self, **overrides: Any) -> dict[str, str]:
        """Environment for a child process with this stack's settings."""
        names = env_names()
        env = dict(os.environ)
        values = {**{f: getattr(self.settings, f) for f in names}, **overrides}
        for field_name, value in values.items():
            if field_name == "node_id":
                continue
            env[names[field_name]] = str(value).lower() if isinstance(value, bool) else str(value)
        env.pop("NODE_ID", None)
        if overrides.get("node_id"):
            # Given: a stable name (as a StatefulSet gives); otherwise unique per process.
            env["NODE_ID"] = str(overrides["node_id"])
        env["PYTHONPATH"] = str(ROOT)
        return env

    def spawn(
        self, module: str, log_dir: Path, *, root: Path = ROOT, **overrides: Any
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``python -m module`` (of the checkout at ``root``: another release's,
        for instance); returns the process and its HTTP base URL."""
        port = free_port()
        key = "gateway_port" if module == "gateway" else "worker_http_port"
        env = self.process_env(**{key: port, **overrides})
        env["PYTHONPATH"] = str(root)
        log = log_dir / f"{module}-{port}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            cwd=root,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self._procs.append(proc)
        self._logs.append(log)
        return proc, f"http://127.0.0.1:{port}/"

    async def wait_ready(self, base_url: str, timeout: float = 20.0) -> None:
        """Poll /readyz until 200."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                async with self.session.get(base_url + "readyz") as resp:
                    if resp.status == 200:
                        return
                    last = await resp.text()
            except aiohttp.ClientError as exc:
                last = exc
            await asyncio.sleep(0.05)
        raise AssertionError(f"{base_url} not ready: {last}")

    async def client(self, base_url: str, token: str | None = None, path: str = "ws") -> Client:
        """A protocol client connected to a gateway."""
        ws = await self.session.ws_connect(base_url + path, autoping=True)
        client = Client(ws, token)
        self._clients.append(client)
        return client

    async def close(self) -> None:
        """Close every client, server and process this stack started."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        for server in reversed(self._servers):
            with contextlib.suppress(Exception):
                await server.close()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def logs(self) -> str:
        """Tail of every child process log (for failure messages)."""
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in self._logs if p.exists())


def app_of(stack: Stack, base_url: str) -> web.Application:
    """The in-process application behind a URL from ``stack.gateway()``."""
    for server in stack._servers:
        if str(server.make_url("/")) == base_url:
            return server.app
    raise AssertionError(f"no in-process server at {base_url}")


def sample(app: web.Application, name: str, **labels: str) -> float:
    """A metric's current value on a gateway (0 when the series does not exist yet)."""
    value = app[gateway.app.METRICS].registry.get_sample_value(name, labels)
    return float(value or 0.0)


@dataclass
class Pair:
    """Alice and Bob in a chat of their own, on one worker and one gateway."""

    alice: str
    bob: str
    chat: str
    url: str
    a_token: str  # for more of Alice's sockets
    a: Client  # Alice's socket, not yet authorised for the chat
    b: Client  # Bob's socket, authorised for the chat's pushes


async def alice_and_bob(stack: Stack, seed: Seeder, **gateway: Any) -> Pair:
    """A :class:`Pair` with its servers started (``gateway``: the gateway's settings
    that differ from the stack's)."""
    alice, a_token = await seed.user("Alice")
    bob, b_token = await seed.user("Bob")
    chat = await seed.chat(alice, bob)
    await stack.worker()
    url = await stack.gateway(**gateway)
    a = await stack.client(url, a_token)
    b = await stack.client(url, b_token)
    await b.join(chat)
    return Pair(alice, bob, chat, url, a_token, a, b)


async def mongo_store(settings: Settings) -> tuple[Any, Store]:
    """A client and store for the test's database (the caller closes the client)."""
    client = create_client(settings.mongo_url, appname="tests")
    return client, Store(client[settings.mongo_database])


def env_from(settings: Settings) -> Mapping[str, str]:
    """Settings as environment variables (for the admin CLI)."""
    names = env_names()
    return {names["redis_url"]: settings.redis_url, names["mongo_url"]: settings.mongo_url}


class Relay:
    """Copies bytes between clients and a server on loopback (a network fault stand-in,
    not a server's): can cut every connection, stall, or let a request through and lose
    its answer."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._lose_answer_to: bytes | None = None
        self.answers_lost = 0

    def lose_answer_to(self, marker: bytes) -> None:
        """The next request whose bytes contain ``marker`` reaches the server; what the
        server sends back next on that connection is dropped and the connection cut."""
        self._lose_answer_to = marker

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers |= {writer, up_writer}
        losing = asyncio.Event()  # the answer now coming back is to be lost

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    marker = self._lose_answer_to
                    if up and marker is not None and marker in data:
                        self._lose_answer_to = None
                        losing.set()
                    elif not up and losing.is_set():
                        self.answers_lost += 1
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
                    dst.write(data)
            dst.close()

        await asyncio.gather(copy(reader, up_writer, True), copy(up_reader, writer, False))

    def url(self, database: str, query: str = "") -> str:
        """A MongoDB URL that goes through the relay."""
        return f"mongodb://127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")

    async def stall(self, call: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """``call`` started with the relay holding its bytes, and given time to send them."""
        self.flowing.clear()
        pending = asyncio.ensure_future(call)
        await asyncio.sleep(0.2)
        return pending

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
