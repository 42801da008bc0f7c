"""Bounded exponential backoff with jitter, for retry loops of background tasks."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Delays of ``base * 2**n`` capped at ``cap`` seconds, with full jitter on the upper half."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; grows until :meth:`reset`."""
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        delay: float = ceiling / 2 + random.random() * ceiling / 2
        return delay

    async def sleep(self) -> None:
        """Sleep for :meth:`next_delay` seconds (cancellable)."""
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        """Start again from the base delay after a success."""
        self.attempt = 0
