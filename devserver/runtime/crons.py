"""Cron schedules: one timer for each cron trigger of each registered function, on the server's
clock, armed for the trigger's next time and armed again each time it fires.

The schedule holds only the timers due next (one per trigger) and the fire tasks still running,
so its memory does not grow with the number of fires. What a fire does (store the
`inngest/scheduled.timer` event and start the run) is the runner's callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from devserver.app import FunctionDef
from devserver.clock import Clock, TimerHandle
from devserver.model.triggers import CronTrigger

Fire = Callable[[FunctionDef, CronTrigger, int], Coroutine[Any, Any, None]]
"""Called with the function, its trigger and the time (ms) the trigger was due."""


class CronSchedule:
    """The timers of the cron triggers of a set of functions."""

    def __init__(self, clock: Clock, fire: Fire) -> None:
        self._clock = clock
        self._fire = fire
        self._timers: dict[tuple[str, int], TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def arm(self, functions: Iterable[FunctionDef]) -> None:
        """Schedule these functions' cron triggers from now on; every other schedule stops."""
        self.stop()
        now = self._clock.now_ms()
        for fn in functions:
            for index, cron in enumerate(fn.crons):
                self._arm((fn.id, index), fn, cron, cron.next_after(now))

    def stop(self) -> None:
        """Cancel every timer (fires already started finish on their own)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    async def close(self) -> None:
        """Stop, and cancel the fires still running (an event they stored starts its run when
        the server starts again)."""
        self.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def armed(self) -> int:
        """Timers waiting to fire."""
        return len(self._timers)

    def _arm(self, key: tuple[str, int], fn: FunctionDef, cron: CronTrigger, due: int) -> None:
        def fire() -> None:
            self._arm(key, fn, cron, cron.next_after(due))
            task = asyncio.get_running_loop().create_task(
                self._fire(fn, cron, due), name=f"cron {cron.cron} of {fn.id}")
            self._tasks.add(task)  # referenced until done: the loop keeps only weak ones
            task.add_done_callback(self._tasks.discard)

        self._timers[key] = self._clock.call_at(due, fire)
