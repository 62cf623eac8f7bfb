"""A watchdog for the event loop: says which run blocks it.

An async function that calls blocking code (`time.sleep`, a sync HTTP client, a long CPU loop)
stops the whole server: no request is answered and no other run moves. It can't be interrupted
from outside, so the watchdog does the next best thing: a thread notices the loop has stopped
ticking and logs which run holds it, with the fix.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 2.0
"""Seconds without a tick before the watchdog speaks up."""


class LoopWatchdog:
    """Ticks on the loop; a daemon thread warns when the ticks stop for `threshold` seconds."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self._interval = min(0.25, threshold / 4)
        self._last_tick = time.monotonic()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start ticking on the running loop and watching from a thread."""
        self._loop = asyncio.get_running_loop()
        self._tick()
        self._thread = threading.Thread(target=self._watch, name="devserver-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking and watching."""
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _tick(self) -> None:
        self._last_tick = time.monotonic()
        assert self._loop is not None
        self._handle = self._loop.call_later(self._interval, self._tick)

    def _watch(self) -> None:
        warned_for = 0.0
        while not self._stop.wait(self._interval):
            stalled = time.monotonic() - self._last_tick
            if stalled < self.threshold:
                warned_for = 0.0
                continue
            if warned_for:
                continue
            warned_for = stalled
            task = asyncio.current_task(self._loop) if self._loop is not None else None
            culprit = task.get_name() if task is not None else "code outside any run"
            log.warning(
                "the event loop has been blocked for %.1f s by %s: an async function is "
                "calling blocking code. Make it a sync function (it then runs in a worker "
                "thread) or use an async library; the server can't answer until it returns.",
                stalled, culprit)
