"""The node's pub/sub connection: its own reply channel plus the chats it has sockets for.

Subscriptions are reference-counted. :meth:`Subscriber.acquire` returns only once Redis
has confirmed the subscription, so a request forwarded after it cannot have its result
published before this node listens. A channel whose last user leaves is unsubscribed
after a short linger, which absorbs join/leave churn.

On a lost connection the loop reconnects with backoff and subscribes to everything
wanted again; ``on_resubscribed`` then lets the hub recover what was published while
the connection was down (pub/sub itself is at-most-once). Every message of the node
passes through here, so the connection is the lean one of shared/resp.py; a silent
peer is detected by a PING after a quiet spell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from shared.backoff import Backoff
from shared.resp import RespConnection, RespError

from .connection import WriteBatch

log = logging.getLogger(__name__)

UNSUBSCRIBE_LINGER = 2.0
CONFIRM_TIMEOUT = 5.0
# Quiet this long: PING; quiet twice as long: the connection is dead.
IDLE_PING = 10.0
RECONNECT_CAP = 0.5


class Subscriber:
    """Owns one pub/sub connection and dispatches every message to ``on_message``."""

    def __init__(
        self,
        redis_url: str,
        fixed_channels: Sequence[str],
        on_message: Callable[[str, bytes], None],
        on_resubscribed: Callable[[], None],
        on_reconnect: Callable[[], None],
        backoff_cap: float = 2.0,
        name: str = "",
        writes: WriteBatch | None = None,
        live: asyncio.Event | None = None,
    ) -> None:
        self._url = redis_url
        # Set while :attr:`live`: what the producer waits for before it writes requests.
        self._live_event = live or asyncio.Event()
        self._writes = writes or WriteBatch()
        self._name = name
        # Subscribed for the connection's whole life: the node's replies, the control
        # channel. Chat channels come and go with their sockets.
        self._fixed = list(fixed_channels)
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._on_reconnect = on_reconnect
        self._backoff_cap = backoff_cap
        self._refs: dict[str, int] = {}
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._unsub_pending: dict[str, int] = {}
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._conn: RespConnection | None = None
        self._expected: set[str] = set()
        self._last_rx = time.monotonic()
        self._live_event.clear()

    @property
    def live(self) -> bool:
        """Connected, and every wanted channel confirmed at least once."""
        return self._live_event.is_set()

    @live.setter
    def live(self, value: bool) -> None:
        if value:
            self._live_event.set()
        else:
            self._live_event.clear()

    @property
    def chat_channels(self) -> int:
        """How many chat channels this node wants now."""
        return len(self._refs)

    async def acquire(self, channel: str) -> None:
        """Take a reference on ``channel``; return once Redis confirmed the subscription.

        Raises TimeoutError when Redis does not confirm in time (the reference is kept:
        the caller must still :meth:`release` it).
        """
        count = self._refs.get(channel, 0)
        self._refs[channel] = count + 1
        handle = self._linger.pop(channel, None)
        if handle is not None:
            handle.cancel()
        if channel in self._confirmed and not self._unsub_pending.get(channel):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        if count == 0:
            self._send("SUBSCRIBE", channel)
        await asyncio.wait_for(asyncio.shield(waiter), CONFIRM_TIMEOUT)

    def hold(self, channel: str) -> None:
        """Take one more reference on a channel the caller already holds (no waiting)."""
        self._refs[channel] = self._refs.get(channel, 0) + 1
        handle = self._linger.pop(channel, None)
        if handle is not None:
            handle.cancel()

    def release(self, channel: str) -> None:
        """Drop a reference; the last one unsubscribes after a linger."""
        count = self._refs.get(channel, 0) - 1
        if count > 0:
            self._refs[channel] = count
            return
        self._refs.pop(channel, None)
        loop = asyncio.get_running_loop()
        self._linger[channel] = loop.call_later(UNSUBSCRIBE_LINGER, self._unsubscribe, channel)

    def _unsubscribe(self, channel: str) -> None:
        self._linger.pop(channel, None)
        if channel in self._refs or self._conn is None:
            self._confirmed.discard(channel)
            return
        self._unsub_pending[channel] = self._unsub_pending.get(channel, 0) + 1
        self._send("UNSUBSCRIBE", channel)

    def _send(self, command: str, channel: str) -> None:
        # While disconnected nothing is sent: the reconnect subscribes to all wanted.
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            conn.send((command, channel))
        except (ConnectionError, OSError) as exc:
            log.warning("pub/sub command failed", extra={"error": repr(exc)})

    async def run(self) -> None:
        """Connect, subscribe, dispatch; reconnect with backoff until cancelled."""
        # Requests wait for this connection (the producer holds them), so it is retried
        # at least every RECONNECT_CAP seconds, whatever the other components' backoff.
        backoff = Backoff(cap=min(self._backoff_cap, RECONNECT_CAP))
        first = True
        while True:
            conn: RespConnection | None = None
            watchdog: asyncio.Task[None] | None = None
            try:
                conn = await RespConnection.open(self._url, name=self._name)
                channels = [*self._fixed, *self._refs]
                self._confirmed.clear()
                self._unsub_pending.clear()
                self._expected = set(channels)
                conn.send(("SUBSCRIBE", *channels))
                self._conn = conn
                self._last_rx = time.monotonic()
                if not first:
                    self._on_reconnect()
                first = False
                backoff.reset()
                watchdog = asyncio.create_task(self._watch(conn))
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except (ConnectionError, OSError, RespError) as exc:
                log.warning("pub/sub connection lost", extra={"error": repr(exc)})
            except Exception:
                log.exception("pub/sub loop failed")
            finally:
                self.live = False
                self._conn = None
                if watchdog is not None:
                    watchdog.cancel()
                if conn is not None:
                    conn.close()
            await backoff.sleep()

    async def _watch(self, conn: RespConnection) -> None:
        # TCP keepalive takes minutes to notice a dead peer; a PING does it in seconds.
        while not conn.closed:
            await asyncio.sleep(IDLE_PING / 2)
            quiet = time.monotonic() - self._last_rx
            if quiet > 2 * IDLE_PING:
                log.warning("pub/sub connection silent; reconnecting", extra={"quiet": quiet})
                conn.close()
            elif quiet > IDLE_PING:
                with contextlib.suppress(ConnectionError, OSError):
                    conn.send(("PING",))

    async def _read(self, conn: RespConnection) -> None:
        on_message = self._on_message
        writes = self._writes
        while True:
            burst = await conn.read_burst()
            self._last_rx = time.monotonic()
            # Socket writes of the whole burst go out together when it has been handled.
            writes.open()
            try:
                for message in burst:
                    kind = message[0]
                    if kind == b"message":
                        on_message(message[1].decode(), message[2])
                    elif kind == b"subscribe":
                        self._confirm(message[1].decode())
                    elif kind == b"unsubscribe":
                        self._unsubscribed(message[1].decode())
            finally:
                writes.flush()

    def _unsubscribed(self, channel: str) -> None:
        pending = self._unsub_pending.get(channel, 0)
        if pending > 1:
            self._unsub_pending[channel] = pending - 1
        else:
            self._unsub_pending.pop(channel, None)
            self._confirmed.discard(channel)
            # Wanted again while the unsubscribe was in flight: subscribe anew.
            if channel in self._refs:
                self._send("SUBSCRIBE", channel)

    def _confirm(self, channel: str) -> None:
        if self._unsub_pending.get(channel):
            return  # confirms a subscription that an in-flight unsubscribe ends
        self._confirmed.add(channel)
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)
        if not self.live and self._expected <= self._confirmed:
            self.live = True
            self._on_resubscribed()
