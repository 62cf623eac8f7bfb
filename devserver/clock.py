"""Time for the whole runtime: one clock object, never `time.time()` scattered in logic.

`WallClock` is real time. The runtime asks a clock for `now_ms()` and for timers (`call_at`), so a
virtual clock can later replace it and run hours of sleeps and backoff in milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    """What `Clock.call_at` returns."""

    def cancel(self) -> None:
        """Stop the timer; a no-op once it has fired."""


class Clock(Protocol):
    """The runtime's source of time."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` on the event loop once the clock reaches `when_ms` (at once if past)."""


class WallClock:
    """Real time, with timers on the running asyncio loop."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch, from the system clock."""
        return time.time_ns() // 1_000_000

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> TimerHandle:
        """Schedule `callback` with `loop.call_later`, so system clock jumps don't stall it."""
        delay = max(0.0, (when_ms - self.now_ms()) / 1000)
        return asyncio.get_running_loop().call_later(delay, callback)
