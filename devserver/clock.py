"""Time for the whole runtime: one clock object, never `time.time()` scattered in logic.

`WallClock` is real time. `VirtualClock` moves only when advanced, by hand or by the runner when
every live run is parked on a timer, so tests run hours of sleeps and backoff in milliseconds.
The runtime asks a clock for `now_ms()` and for timers (`call_at`), nothing else.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import re
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


class _VirtualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: int, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Time that moves only when told: `advance`, or the runtime's jump to its next timer.

    Tests use it to run hours of sleeps, backoff and timeouts in milliseconds. Timers fire in
    time order, each on the event loop (never inside `advance` itself).
    """

    def __init__(self, start_ms: int | None = None) -> None:
        self._now = time.time_ns() // 1_000_000 if start_ms is None else start_ms
        self._timers: list[tuple[int, int, _VirtualTimer]] = []
        self._seq = 0

    def now_ms(self) -> int:
        """The virtual time."""
        return self._now

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` once virtual time reaches `when_ms` (soon, if it already has)."""
        timer = _VirtualTimer(when_ms, callback)
        if when_ms <= self._now:
            asyncio.get_running_loop().call_soon(self._fire, timer)
        else:
            self._seq += 1
            heapq.heappush(self._timers, (when_ms, self._seq, timer))
        return timer

    def next_due(self) -> int | None:
        """When the earliest pending timer fires, or None without timers."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def advance_to(self, when_ms: int) -> None:
        """Move time forward to `when_ms` and queue every timer due by then, in order."""
        self._now = max(self._now, when_ms)
        loop = asyncio.get_running_loop()
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._timers)
            loop.call_soon(self._fire, timer)

    def advance(self, ms: int) -> None:
        """Move time forward by `ms` milliseconds."""
        self.advance_to(self._now + max(0, ms))

    @staticmethod
    def _fire(timer: _VirtualTimer) -> None:
        if not timer.cancelled:
            timer.cancelled = True
            timer.callback()


_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(value: str | float | dt.timedelta) -> int:
    """A duration in milliseconds from `"2s"`, `"1h30m"`, `"500ms"`, seconds, or a timedelta."""
    if isinstance(value, dt.timedelta):
        ms = value.total_seconds() * 1000
    elif isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    elif isinstance(value, int | float):
        ms = float(value) * 1000
    elif isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION.findall(text)
        if not text or "".join(n + u for n, u in parts) != text.replace(" ", ""):
            raise ValueError(
                f"not a duration: {value!r} (use e.g. '30s', '1h30m', '500ms', '2d')")
        ms = sum(float(n) * _UNITS_MS[u] for n, u in parts)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not ms >= 0 or ms == float("inf"):
        raise ValueError(f"duration must be zero or more, got {value!r}")
    return int(ms)


def to_ms(moment: dt.datetime | int | float | str) -> int:
    """A point in time as ms since the epoch: an aware datetime (naive = UTC), an ISO 8601
    string, or a number of ms."""
    if isinstance(moment, str):
        try:
            moment = dt.datetime.fromisoformat(moment.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"not an ISO 8601 date: {moment!r}") from None
    if isinstance(moment, dt.datetime):
        aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
        return int(aware.timestamp() * 1000)
    if isinstance(moment, bool) or not isinstance(moment, int | float):
        raise ValueError(f"not a point in time: {moment!r}")
    return int(moment)


def iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as RFC 3339 UTC with milliseconds, or None."""
    if ms is None:
        return None
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
