"""The runtime: turns events into runs, schedules runs on the clock and executes them.

`Runner.ingest` stores a request's events with the runs their triggers start, in one commit, and
then schedules those runs, wakes runs waiting for those events and applies `cancel_on`. Each run
executes as an asyncio task (sync functions in a worker thread); its outcome is written through
the store, which keeps the per-session figures. When a run ends, its lifecycle events
(`inngest/function.finished`, `.failed`, `.cancelled`) are stored in the same commit and start
the functions they trigger (`on_failure` handlers among them).

Runs survive restarts: on start, every Queued or Running run is scheduled again and resumes from
its memoized steps; sleeps keep their wake time, waits are re-checked at once.

`Runner` is one object built in layers, one module each, each using the ones below it:
`scheduling` (timers and tasks), `intake` (events in, and what they set off), `run_ends`
(cancelling and ending runs), `execution` (invoking a due run, recording its outcome); this
module adds the registered functions, start, stop and the restart count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from devserver.app import FunctionDef
from devserver.clock import Clock
from devserver.model.failures import stored_error
from devserver.model.limits import MAX_RESTARTS, restarts_message
from devserver.model.records import FAILED, UNFINISHED, StepAttempt
from devserver.model.registry import is_local
from devserver.model.retry import Backoff
from devserver.runtime.crons import CronSchedule
from devserver.runtime.execution import DEFAULT_CONCURRENCY, Execution
from devserver.runtime.flow import FlowRuntime
from devserver.runtime.intake import DEFAULT_ENV as DEFAULT_ENV
from devserver.runtime.invocation import FunctionExecutor
from devserver.store.facade import Store

log = logging.getLogger(__name__)


class Runner(Execution):
    """Registered functions, the runs scheduled on the clock, and their execution."""

    def __init__(
        self, store: Store, clock: Clock, backoff: Backoff, *, local: FunctionExecutor,
        remote: FunctionExecutor | None = None, concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        super().__init__(store, clock, backoff, local=local, remote=remote,
                         concurrency=concurrency)
        self.max_restarts = MAX_RESTARTS
        """Restarts a run may be executing at without progress before it is failed."""
        self._crons = CronSchedule(clock, self._fire_cron)
        self.flow = FlowRuntime(self)

    # -- functions ---------------------------------------------------------------------------

    def register(self, functions: Iterable[FunctionDef]) -> None:
        """Add functions; a function id registered twice is an error."""
        self.registry.add(functions)
        if self._started:
            self._crons.arm(self.registry.functions)

    async def replace(
        self, functions: Iterable[FunctionDef], *,
        scope: Callable[[FunctionDef], bool] = is_local,
    ) -> None:
        """Swap the functions `scope` selects (by default every local one: hot reload) for a
        new set; the others stay. Executing invocations finish with the code they started
        with; queued and parked runs pick up the new code."""
        self.registry = self.registry.replaced(functions, scope)
        if self._started:
            self._crons.arm(self.registry.functions)
            await self._resume(only_idle=True)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume every unfinished run in the database and arm the cron schedules."""
        self._started = True
        self._waited |= set(await self.store.waited_event_names())
        await self._resume(only_idle=False)
        await self.flow.start()
        self._crons.arm(self.registry.functions)

    async def _resume(self, *, only_idle: bool) -> None:
        parked: dict[str, int] = {}
        now = self.clock.now_ms()
        at_once: dict[str, int] = {}  # at start-up: the runs that execute at once
        for run_id, function_id, due in await self.store.unfinished_runs():
            if only_idle and (run_id in self._tasks or run_id in self._timers):
                continue
            if self.registry.get(function_id) is None:
                parked[function_id] = parked.get(function_id, 0) + 1
            elif not only_idle and due <= now and len(at_once) < self._concurrency:
                at_once[run_id] = due
            else:
                self.schedule(run_id, due)
        if at_once:
            await self._resume_counting_restarts(at_once)
        for function_id, count in parked.items():
            log.warning("%d unfinished run(s) of %s wait until that function is registered",
                        count, function_id)

    async def _resume_counting_restarts(self, runs: dict[str, int]) -> None:
        """Schedule the runs that execute at once at start-up, counting this restart for
        each first (one commit): a run that was executing when the process ended each of
        the last `max_restarts` times, without progress in between (its attempt calls
        `os._exit`, crashes the interpreter...), is failed instead of ending this start too.
        """
        try:
            counts = await self.store.note_restarts(list(runs))
        except Exception:
            log.exception("counting the restarts of unfinished runs failed")
            counts = {}
        for run_id, due in runs.items():
            restarts = counts.get(run_id, 0)
            if restarts >= self.max_restarts:
                await self._fail_after_restarts(run_id, restarts)
            else:
                self.schedule(run_id, due)

    async def _fail_after_restarts(self, run_id: str, restarts: int) -> None:
        state = await self.store.run_state(run_id)
        if state is None or state.run.status not in UNFINISHED:
            return
        run, now = state.run, self.clock.now_ms()
        log.error("run %s of %s failed: the server process ended %d times while it was "
                  "executing", run_id, run.function_id, restarts)
        error = stored_error("ProcessEndedError", restarts_message(restarts))
        attempt = StepAttempt(0, None, "function", run.attempt, FAILED, now, now, None, error,
                              final=True)
        await self._finish(run, state.events, FAILED, error=error, attempt=attempt)

    async def stop(self) -> None:
        """Stop timers and cancel executing invocations; their runs resume on the next start.

        Sync functions already running in a thread can't be interrupted; they are abandoned
        and their runs resume from the last committed step on the next start too.
        """
        self._started = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self.flow.close()
        await self._crons.close()
        self._fresh.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:  # a clean stop: the runs it interrupted did not end the process
            await self.store.clear_restarts()
        except Exception:
            log.warning("could not reset the restart counts of unfinished runs", exc_info=True)
