"""The node's pub/sub connection: its own reply channel plus the chats it has sockets for.

Subscriptions are reference-counted. :meth:`Subscriber.acquire` returns only once Redis
has confirmed the subscription, so a request forwarded after it cannot have its result
published before this node listens. A channel whose last user leaves is unsubscribed
after a short linger, which absorbs join/leave churn.

On a lost connection the loop reconnects with backoff and subscribes to everything
wanted again; ``on_resubscribed`` then lets the hub recover what was published while
the connection was down (pub/sub itself is at-most-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from shared.backoff import Backoff

log = logging.getLogger(__name__)

UNSUBSCRIBE_LINGER = 2.0
CONFIRM_TIMEOUT = 5.0


class Subscriber:
    """Owns one pub/sub connection and dispatches every message to ``on_message``."""

    def __init__(
        self,
        redis: Redis,
        node_channel: str,
        on_message: Callable[[str, bytes], None],
        on_resubscribed: Callable[[], None],
        on_reconnect: Callable[[], None],
        backoff_cap: float = 2.0,
    ) -> None:
        self._redis = redis
        self._node_channel = node_channel
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._on_reconnect = on_reconnect
        self._backoff_cap = backoff_cap
        self._refs: dict[str, int] = {}
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._unsub_pending: dict[str, int] = {}
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._pubsub: PubSub | None = None
        self._connected = asyncio.Event()
        self._expected: set[str] = set()
        self.live = False  # connected and every wanted channel confirmed at least once

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
        if count == 0 and self._pubsub is not None and self._connected.is_set():
            await self._send(self._pubsub.subscribe, channel)
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
        if channel in self._refs or self._pubsub is None or not self._connected.is_set():
            self._confirmed.discard(channel)
            return
        self._unsub_pending[channel] = self._unsub_pending.get(channel, 0) + 1
        asyncio.get_running_loop().create_task(self._send(self._pubsub.unsubscribe, channel))

    async def _send(self, method: Callable[..., Any], channel: str) -> None:
        try:
            await method(channel)
        except (RedisError, OSError) as exc:
            # The read loop sees the same failure and resubscribes everything wanted.
            log.warning("pub/sub command failed", extra={"error": repr(exc)})

    async def run(self) -> None:
        """Connect, subscribe, dispatch; reconnect with backoff until cancelled."""
        backoff = Backoff(cap=self._backoff_cap)
        first = True
        while True:
            pubsub = self._redis.pubsub()
            try:
                channels = [self._node_channel, *self._refs]
                self._confirmed.clear()
                self._unsub_pending.clear()
                self._expected = set(channels)
                await pubsub.subscribe(*channels)
                self._pubsub = pubsub
                self._connected.set()
                if not first:
                    self._on_reconnect()
                first = False
                backoff.reset()
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost", extra={"error": repr(exc)})
            except Exception:
                log.exception("pub/sub loop failed")
            finally:
                self.live = False
                self._connected.clear()
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
            await backoff.sleep()

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"].decode()
            if kind == b"message" or kind == "message":
                self._on_message(channel, message["data"])
            elif kind in (b"subscribe", "subscribe"):
                self._confirm(channel)
            elif kind in (b"unsubscribe", "unsubscribe"):
                pending = self._unsub_pending.get(channel, 0)
                if pending > 1:
                    self._unsub_pending[channel] = pending - 1
                else:
                    self._unsub_pending.pop(channel, None)
                    self._confirmed.discard(channel)
                    # Wanted again while the unsubscribe was in flight: subscribe anew.
                    if channel in self._refs:
                        await self._send(pubsub.subscribe, channel)

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
