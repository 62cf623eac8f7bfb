"""The runtime: turns events into runs, schedules runs on the clock and executes them.

`Runner.ingest` stores a request's events with the runs their triggers start, in one commit, and
then schedules those runs. Each run executes as an asyncio task (sync functions in a worker
thread); its outcome is written through the store, which keeps the per-session figures.

Runs survive restarts: on start, every Queued or Running run in the database is scheduled again
and resumes from its memoized steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Iterable
from typing import Any

from .clock import Clock, TimerHandle
from .errors import UserError
from .events import IncomingEvent
from .functions import FunctionDef, NonRetriableError, StepError
from .ids import new_ulid
from .records import COMPLETED, FAILED, QUEUED, UNFINISHED, NewEvent, NewRun, StepAttempt
from .retry import Backoff
from .steps import (
    Context,
    Event,
    Invocation,
    Reschedule,
    Step,
    SyncStep,
    error_info,
    to_json_value,
)
from .store import Store, dump_json
from .triggers import TriggerIndex

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 256
"""Invocations executing at once; more wait their turn."""
DEFAULT_THREADS = 32
"""Worker threads for sync functions and sync step bodies."""


class Runner:
    """Registered functions, the runs scheduled on the clock, and their execution."""

    def __init__(
        self, store: Store, clock: Clock, backoff: Backoff, *,
        concurrency: int = DEFAULT_CONCURRENCY, threads: int = DEFAULT_THREADS,
    ) -> None:
        self.store = store
        self.clock = clock
        self.backoff = backoff
        self._functions: dict[str, FunctionDef] = {}
        self._index: TriggerIndex[FunctionDef] = TriggerIndex()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="devserver-fn")
        self._slots = asyncio.Semaphore(concurrency)
        self._timers: dict[str, TimerHandle] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rewake: set[str] = set()  # woken while executing: run again once it returns
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False

    # -- functions ---------------------------------------------------------------------------

    @property
    def functions(self) -> list[FunctionDef]:
        """Every registered function, in registration order."""
        return list(self._functions.values())

    def register(self, functions: Iterable[FunctionDef]) -> None:
        """Add functions; a function id registered twice is an error."""
        new = list(functions)
        for fn in new:
            if fn.id in self._functions and self._functions[fn.id] is not fn:
                raise UserError(f"two functions have the id {fn.id!r}")
        for fn in new:
            self._functions[fn.id] = fn
            for trigger in fn.triggers:
                self._index.add(trigger, fn)

    def match(self, event_name: str) -> list[FunctionDef]:
        """The functions an event with this name starts."""
        return self._index.match(event_name)

    # -- events in ---------------------------------------------------------------------------

    async def ingest(self, env: str, events: list[IncomingEvent]) -> list[str]:
        """Store events (all or none) with the runs they start; return their internal ids.

        Returns once everything is committed; the runs are scheduled after the commit.
        """
        now = self.clock.now_ms()
        prepared = [
            NewEvent(
                internal_id=new_ulid(),
                name=ev.name,
                event_id=ev.id,
                ts=now if ev.ts is None else ev.ts,
                data=dump_json(ev.data),
                v=None if ev.v is None else dump_json(ev.v),
                user=None if ev.user is None else dump_json(ev.user),
                meta=None if ev.meta is None else dump_json(ev.meta),
                sessions=ev.sessions,
                runs=tuple(NewRun(new_ulid(), fn.id) for fn in self.match(ev.name)),
            )
            for ev in events
        ]
        created = await self.store.ingest(env, now, prepared)
        for run_id in created:
            self.schedule(run_id, now)
        return [ev.internal_id for ev in prepared]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Schedule every unfinished run found in the database (resume after a restart)."""
        self._started = True
        parked: dict[str, int] = {}
        for run_id, function_id, next_at in await self.store.unfinished_runs():
            if function_id in self._functions:
                self.schedule(run_id, next_at)
            else:
                parked[function_id] = parked.get(function_id, 0) + 1
        for function_id, count in parked.items():
            log.warning("%d unfinished run(s) of %s wait until that function is registered",
                        count, function_id)

    async def stop(self) -> None:
        """Stop timers and cancel executing invocations; their runs resume on the next start.

        Sync functions already running in a thread can't be interrupted; they are abandoned
        and their runs resume from the last committed step on the next start too.
        """
        self._started = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> int:
        """Runs executing now or waiting on a timer."""
        return len(self._tasks) + len(self._timers)

    async def wait_idle(self) -> None:
        """Return once no run is executing or scheduled."""
        await self._idle.wait()

    def _update_idle(self) -> None:
        if self._tasks or self._timers:
            self._idle.clear()
        else:
            self._idle.set()

    # -- scheduling --------------------------------------------------------------------------

    def schedule(self, run_id: str, at_ms: int) -> None:
        """Execute `run_id` once the clock reaches `at_ms`."""
        if not self._started:
            return
        old = self._timers.pop(run_id, None)
        if old is not None:
            old.cancel()
        if at_ms <= self.clock.now_ms():
            self._wake(run_id)
        else:
            self._timers[run_id] = self.clock.call_at(at_ms, lambda: self._wake(run_id))
        self._update_idle()

    def _wake(self, run_id: str) -> None:
        self._timers.pop(run_id, None)
        if run_id in self._tasks:
            self._rewake.add(run_id)
        elif self._started:
            task = asyncio.get_running_loop().create_task(self._execute(run_id))
            self._tasks[run_id] = task
            task.add_done_callback(lambda _: self._done(run_id))
        self._update_idle()

    def _done(self, run_id: str) -> None:
        self._tasks.pop(run_id, None)
        if run_id in self._rewake:
            self._rewake.discard(run_id)
            self._wake(run_id)
        self._update_idle()

    # -- execution ---------------------------------------------------------------------------

    async def _execute(self, run_id: str) -> None:
        async with self._slots:
            try:
                await self._invoke(run_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in devserver, not in the user's function
                log.exception("run %s: internal error while executing", run_id)

    async def _invoke(self, run_id: str) -> None:
        state = await self.store.run_state(run_id)
        if state is None or state.run.status not in UNFINISHED:
            return
        run = state.run
        fn = self._functions.get(run.function_id)
        if fn is None:
            log.warning("run %s waits: function %s is not registered", run_id, run.function_id)
            return
        if run.status == QUEUED:
            await self.store.start_run(run_id, self.clock.now_ms())
        inv = Invocation(run_id=run_id, function=fn, memo=dict(state.memo), attempt=run.attempt,
                         store=self.store, clock=self.clock, backoff=self.backoff)
        events = [Event.from_stored(ev) for ev in state.events]
        loop = asyncio.get_running_loop()
        step = Step(inv, self._executor) if fn.is_async else SyncStep(inv, loop)
        ctx = Context(event=events[0], events=events, run_id=run_id, function_id=fn.id,
                      env=run.env, sessions=dict(run.sessions), step=step, invocation=inv)
        started = self.clock.now_ms()
        try:
            if fn.is_async:
                result = await fn.handler(ctx)
            else:
                call = contextvars.copy_context().run
                result = await loop.run_in_executor(self._executor, call, fn.handler, ctx)
        except Reschedule as resched:
            self.schedule(run_id, resched.at_ms)
            return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit fails the run too
            await self._function_failed(inv, exc, started)
            return
        await self._function_returned(inv, result, started)

    async def _function_returned(self, inv: Invocation, result: Any, started: int) -> None:
        try:
            output = to_json_value(result, "the value returned by the function")
        except TypeError as exc:
            await self._function_failed(inv, NonRetriableError(str(exc)), started)
            return
        await self.store.finish_run(inv.run_id, COMPLETED, self.clock.now_ms(), output=output)

    async def _function_failed(self, inv: Invocation, exc: BaseException, started: int) -> None:
        now = self.clock.now_ms()
        if isinstance(exc, StepError):
            error: dict[str, Any] = {"name": exc.name, "message": exc.message,
                                     "stack": exc.stack, "step_id": exc.step_id}
        else:
            error = error_info(exc)
        if inv.can_retry(exc):
            next_at = inv.next_attempt_at(exc, now)
            attempt = StepAttempt(0, None, "function", inv.attempt, FAILED, started, now, None,
                                  error, final=False)
            await self.store.record_attempt(inv.run_id, attempt, inv.attempt + 1, next_at)
            self.schedule(inv.run_id, next_at)
            return
        attempt = StepAttempt(0, None, "function", inv.attempt, FAILED, started, now, None,
                              error, final=True)
        await self.store.finish_run(inv.run_id, FAILED, now, error=error, attempt=attempt)
