"""Runs on the clock: the runner's timers and tasks, waking a run when it is due, and knowing
when nothing is left to do.

A run not due yet waits on a clock timer under its id; a due run executes as an asyncio task
(what executing means is `runtime.execution`'s). Flow control keeps its pending debounces,
batches and deadlines in the same timers, under keys of their own (`runtime.flow`), so that
`wait_idle` and virtual time treat them like sleeps. This is the runner's lowest layer
(`runtime.runner`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from devserver.clock import Clock, TimerHandle, VirtualClock

if TYPE_CHECKING:
    from devserver.runtime.flow import FlowRuntime


class Scheduling(ABC):
    """The runner's timers and tasks: when each run executes, and whether any is left."""

    flow: FlowRuntime
    """Flow control's timers, concurrency slots and deadlines (`runtime.flow`); made by the
    runner, which it drives."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._timers: dict[str, TimerHandle] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rewake: set[str] = set()  # woken while executing: run again once it returns
        self._changed = asyncio.Event()
        self._started = False

    def schedule(self, run_id: str, at_ms: int | None) -> None:
        """Execute `run_id` once the clock reaches `at_ms` (None: only when woken)."""
        if not self._started or at_ms is None:
            return
        old = self._timers.pop(run_id, None)
        if old is not None:
            old.cancel()
        if at_ms <= self.clock.now_ms():
            self._wake(run_id)
        else:
            self._timers[run_id] = self.clock.call_at(at_ms, lambda: self._wake(run_id))
        self._notify()

    def _wake(self, run_id: str) -> None:
        self._timers.pop(run_id, None)
        if run_id in self._tasks:
            self._rewake.add(run_id)
        elif self._started:
            task = asyncio.get_running_loop().create_task(self._execute(run_id),
                                                          name=f"run {run_id}")
            self._tasks[run_id] = task
            task.add_done_callback(lambda _: self._done(run_id))
        self._notify()

    def track(self, key: str, work: Awaitable[None]) -> None:
        """Run `work` as a task that `wait_idle` waits for, under `key` (not a run id)."""
        async def run() -> None:
            await work
        task = asyncio.get_running_loop().create_task(run(), name=key)
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._done(key))
        self._notify()

    def _done(self, run_id: str) -> None:
        self._tasks.pop(run_id, None)
        self.flow.released(run_id)
        if run_id in self._rewake:
            self._rewake.discard(run_id)
            self._wake(run_id)
        self._notify()

    @property
    def busy(self) -> int:
        """Runs executing now or waiting on a timer."""
        return len(self._tasks) + len(self._timers)

    async def wait_idle(self, *, skip_time: bool = True) -> None:
        """Return once no run is executing or waiting on a timer.

        On a `VirtualClock`, waiting here is what moves time: whenever every live run is
        parked on a timer (a sleep, a retry's backoff, a wait's timeout), the clock jumps to
        the next timer, so hours of waiting take milliseconds. With `skip_time=False` it
        returns as soon as nothing executes, leaving timers (and virtual time) as they are.
        """
        while self._tasks or (skip_time and self._timers):
            if not self._tasks and isinstance(self.clock, VirtualClock):
                due = self.clock.next_due()
                if due is not None:
                    self.clock.advance_to(due)
            self._changed.clear()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()

    @abstractmethod
    async def _execute(self, run_id: str) -> None:
        """Execute a due run: the layer above's (`runtime.execution`)."""
