"""The runtime: turns events into runs, schedules runs on the clock and executes them.

`Runner.ingest` stores a request's events with the runs their triggers start, in one commit, and
then schedules those runs, wakes runs waiting for those events and applies `cancel_on`. Each run
executes as an asyncio task (sync functions in a worker thread); its outcome is written through
the store, which keeps the per-session figures. When a run ends, its lifecycle events
(`inngest/function.finished`, `.failed`, `.cancelled`) are stored in the same commit and start
the functions they trigger (`on_failure` handlers among them).

Runs survive restarts: on start, every Queued or Running run is scheduled again and resumes from
its memoized steps; sleeps keep their wake time, waits are re-checked at once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from devserver.app import (
    CRON_EVENT,
    INVOKED_EVENT,
    CancelTrigger,
    FunctionDef,
    NonRetriableError,
    StepError,
)
from devserver.clock import Clock, TimerHandle, VirtualClock
from devserver.errors import NotFound, Reschedule, RunEnded, StoreInterrupted, StoreUnavailable
from devserver.ids import new_ulid
from devserver.jsontext import dump_json
from devserver.model import flow
from devserver.model.events import IncomingEvent
from devserver.model.failures import ReportedError, error_info, stored_error
from devserver.model.lifecycle import deferred_events, lifecycle_events, lifecycle_names
from devserver.model.limits import MAX_RESTARTS, MAX_TREE_RUNS, restarts_message
from devserver.model.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    UNFINISHED,
    NewEvent,
    NewRun,
    RunRecord,
    RunState,
    StepAttempt,
    StoredEvent,
    event_dict,
)
from devserver.model.registry import Registry, is_local
from devserver.model.retry import Backoff
from devserver.model.triggers import CronTrigger
from devserver.runtime import runlog
from devserver.runtime.crons import CronSchedule
from devserver.runtime.flow import FlowRuntime, note_cancel
from devserver.runtime.invocation import FunctionExecutor, Invocation, encode_output
from devserver.store.facade import Store

log = logging.getLogger(__name__)

DEFAULT_ENV = "dev"
DEFAULT_CONCURRENCY = 256
"""Invocations executing at once; more wait their turn."""
STORE_RETRY_MS, STORE_RETRY_MAX_MS, STORE_RETRIES = 500, 30_000, 20
"""A run whose write failed for the database's sake (locked, full, ...) is executed again on
the clock after 0.5 s, doubling to 30 s, at most 20 times (about 8 minutes); after that it
resumes at the next start."""


def _log_write_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        if isinstance(future.exception(), StoreUnavailable):  # the store has logged it
            return
        log.error("recording a run's start failed", exc_info=future.exception())


def _cancelled_by_us() -> bool:
    """Whether the CancelledError being handled comes from cancelling the current task
    (a cancelled run, a shutdown, a timeout), not from user code raising it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Runner:
    """Registered functions, the runs scheduled on the clock, and their execution."""

    def __init__(
        self, store: Store, clock: Clock, backoff: Backoff, *, local: FunctionExecutor,
        remote: FunctionExecutor | None = None, concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.store = store
        self.local = local
        """Executes invocations of local Python functions."""
        self.remote = remote
        """Executes invocations of SDK functions (`FunctionDef.remote`), when SDK apps are on."""
        self.dashboard_url: str | None = None
        """The dashboard's base URL once the server is bound: log lines link runs there."""
        self.clock = clock
        self.backoff = backoff
        self.registry = Registry()
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self.max_tree_runs = MAX_TREE_RUNS
        """The most runs one tree of runs may hold (`devserver.model.limits`)."""
        self.max_restarts = MAX_RESTARTS
        """Restarts a run may be executing at without progress before it is failed."""
        self._timers: dict[str, TimerHandle] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rewake: set[str] = set()  # woken while executing: run again once it returns
        self._cancelled: set[str] = set()  # tasks cancelled because their run was cancelled
        self._crons = CronSchedule(clock, self._fire_cron)
        self._waited: set[tuple[str, str]] = set()  # (env, event name) some run waits for
        self._changed = asyncio.Event()
        self._started = False
        # State of runs just created, so their first invocation needn't read it back.
        self._fresh: dict[str, RunState] = {}
        # Start times not written yet (see `_invoke`), by run id.
        self._unstarted: dict[str, int] = {}
        # Runs whose end could not be written (the database failed): the write to retry
        # instead of executing the function again, and how many tries each has had.
        self._unwritten_ends: dict[str, Callable[[], Awaitable[None]]] = {}
        self._store_tries: dict[str, int] = {}
        self.flow = FlowRuntime(self)
        """Flow control's timers, concurrency slots and deadlines (`runtime.flow`)."""

    # -- functions ---------------------------------------------------------------------------

    @property
    def functions(self) -> list[FunctionDef]:
        """Every registered function, in registration order."""
        return self.registry.functions

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

    def resolve_function(self, ref: object) -> FunctionDef:
        """A registered function from its FunctionDef, its decorated handler or its id."""
        return self.registry.resolve(ref)

    # -- events in ---------------------------------------------------------------------------

    def prepare(
        self, env: str, events: list[IncomingEvent], now: int, *, skip_function: str | None = None,
        source: str | None = None, internal_ids: list[str] | None = None,
    ) -> list[NewEvent]:
        """Give events their ids (new ULIDs unless `internal_ids` are given) and the runs
        their triggers start."""
        prepared = []
        for index, ev in enumerate(events):
            ts = now if ev.ts is None else ev.ts
            matched = self.registry.match_incoming(ev, ts)
            requests: list[flow.FlowRequest] = []
            if any(fn.flow is not None and fn.flow.at_intake for fn in matched):
                doc = flow.event_doc(ev.name, ev.data, ev.id, ts, ev.v, ev.user)
                requests = [flow.request(fn.id, new_ulid(), fn.flow, doc) for fn in matched
                            if fn.flow is not None and fn.flow.at_intake
                            and fn.id != skip_function]
                matched = [fn for fn in matched if fn.flow is None or not fn.flow.at_intake]
            runs = tuple(NewRun(new_ulid(), fn.id) for fn in matched if fn.id != skip_function)
            prepared.append(NewEvent(
                internal_id=new_ulid() if internal_ids is None else internal_ids[index],
                name=ev.name, event_id=ev.id, ts=ts,
                data=dump_json(ev.data), v=None if ev.v is None else dump_json(ev.v),
                user=None if ev.user is None else dump_json(ev.user),
                meta=None if ev.meta is None else dump_json(ev.meta),
                sessions=ev.sessions, runs=runs, source=source, flow=tuple(requests)))
        return prepared

    async def ingest(self, env: str, events: list[IncomingEvent], *,
                     ids: list[str] | None = None) -> list[str]:
        """Store events (all or none) with the runs they start; return their internal ids.

        Returns once everything is committed; the runs are scheduled after the commit.
        With `ids` (one per event, derived from an SDK's `x-inngest-event-id-seed`), a
        request whose events are already stored is a retry: nothing happens and the same
        ids are returned.
        """
        now = self.clock.now_ms()
        prepared = self.prepare(env, events, now, internal_ids=ids)
        if ids is None:
            created: list[str] | None = await self.store.ingest(env, now, prepared)
        else:
            created = await self.store.ingest_once(env, now, prepared)
        if created or (created is not None and (
                self._waited or self.registry.cancels_anything
                or any(ev.flow for ev in prepared))):
            await self.after_ingest(env, prepared, created)
        return [ev.internal_id for ev in prepared]

    async def after_ingest(self, env: str, events: list[NewEvent], created: list[str]) -> None:
        """After a commit: schedule the new runs, wake waiting runs, apply `cancel_on`."""
        now = self.clock.now_ms()
        if created:
            self._remember_fresh(env, events, set(created), now)
        for run_id in created:
            self.schedule(run_id, now)
        await self.flow.after_ingest(env, events, now)
        names = list({ev.name for ev in events if (env, ev.name) in self._waited})
        if names:
            for run_id in await self.store.waiting_for_events(env, names):
                self.schedule(run_id, now)
        for ev in events:
            for fn, cancel in self.registry.cancels(ev.name):
                await self._cancel_matching(env, fn, cancel, ev)

    def _remember_fresh(self, env: str, events: list[NewEvent], created: set[str],
                        now: int) -> None:
        for ev in events:
            runs = [run for run in ev.runs if run.run_id in created]
            if not runs:
                continue
            stored = StoredEvent(
                internal_id=ev.internal_id, env=env, name=ev.name, event_id=ev.event_id,
                ts=ev.ts, received_at=now, data=json.loads(ev.data),
                v=None if ev.v is None else json.loads(ev.v),
                user=None if ev.user is None else json.loads(ev.user),
                meta=None if ev.meta is None else json.loads(ev.meta),
                sessions=ev.sessions, duplicate=False, source=ev.source)
            for run in runs:
                record = RunRecord(
                    run_id=run.run_id, env=env, function_id=run.function_id,
                    event_id=ev.internal_id, event_name=ev.name, status=QUEUED, attempt=0,
                    queued_at=now, started_at=None, ended_at=None, next_at=now, output=None,
                    error=None, sessions=ev.sessions)
                self._fresh[run.run_id] = RunState(run=record, events=[stored], memo={})

    def note_wait(self, env: str, event_name: str) -> None:
        """A run is about to wait for `event_name`: wake it when one arrives."""
        self._waited.add((env, event_name))

    async def _cancel_matching(
        self, env: str, fn: FunctionDef, cancel: CancelTrigger, ev: NewEvent,
    ) -> None:
        incoming = await self.store.event(ev.internal_id)
        if incoming is None:
            return
        incoming_doc = event_dict(incoming)
        for run, trigger in await self.store.unfinished_runs_of(env, fn.id, ev.internal_id):
            if cancel.condition is None or cancel.condition.matches(
                    event=event_dict(trigger), **{"async": incoming_doc}):
                log.info("run %s of %s cancelled by event %s", run.run_id, fn.id, ev.name)
                await self.cancel(run.run_id)

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

    # -- scheduling --------------------------------------------------------------------------

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

    async def _fire_cron(self, fn: FunctionDef, cron: CronTrigger, due: int) -> None:
        if not self._started or self.registry.get(fn.id) is not fn:
            return
        runs: tuple[NewRun, ...] = (NewRun(new_ulid(), fn.id),)
        requests: tuple[flow.FlowRequest, ...] = ()
        if fn.flow is not None and fn.flow.at_intake:  # e.g. a singleton cron: no overlap
            runs, requests = (), (flow.request(fn.id, new_ulid(), fn.flow, flow.event_doc(
                CRON_EVENT, {"cron": cron.cron}, None, due, None, None)),)
        event = NewEvent(internal_id=new_ulid(), name=CRON_EVENT, event_id=None, ts=due,
                         data=dump_json({"cron": cron.cron}), v=None, user=None, meta=None,
                         sessions={}, runs=runs, source="cron", flow=requests)
        try:
            created = await self.store.ingest(DEFAULT_ENV, self.clock.now_ms(), [event])
        except StoreUnavailable as exc:
            # The schedule goes on; this fire is lost (a cron only runs for times to come).
            log.warning("cron %r of %s did not fire at %d: %s", cron.cron, fn.id, due,
                        exc.message)
            return
        await self.after_ingest(DEFAULT_ENV, [event], created)

    async def complete(self, state: RunState, output: Any) -> None:
        """End a run its SDK ran to the end itself (a durable endpoint's, synchronously) as
        if an invocation had: its end recorded with the lifecycle events it emits."""
        await self._finish(state.run, state.events, COMPLETED, output_json=dump_json(output))

    # -- cancelling --------------------------------------------------------------------------

    async def cancel(self, run_id: str, *, reason: str | None = None) -> RunRecord:
        """Cancel a run (no-op if it has ended); returns its record. Unknown → NotFound.
        `reason` (flow control's: a singleton, a timeout) is recorded with the run."""
        self._fresh.pop(run_id, None)
        state = await self.store.run_state(run_id)
        if state is None:
            raise NotFound(f"no run with id {run_id!r}")
        if state.run.status in UNFINISHED:
            self.flow.forget(run_id)
            if reason is not None:
                log.info("run %s of %s %s", run_id, state.run.function_id, reason)
                await note_cancel(self, run_id, reason)
            emitted = self._lifecycle(state.run, state.events, CANCELLED, None, None)
            created = await self.store.finish_run(
                run_id, CANCELLED, self.clock.now_ms(), emitted=emitted)
            if created is not None:
                timer = self._timers.pop(run_id, None)
                if timer is not None:
                    timer.cancel()
                task = self._tasks.get(run_id)
                if task is not None:
                    self._cancelled.add(run_id)
                    task.cancel()
                await self._ended(state.run, emitted, created)
        run = await self.store.run(run_id)
        assert run is not None
        return run

    # -- execution ---------------------------------------------------------------------------

    async def _execute(self, run_id: str) -> None:
        async with self._slots:
            try:
                await self._invoke(run_id)
                self._store_tries.pop(run_id, None)
            except asyncio.CancelledError:
                if run_id not in self._cancelled:
                    raise
                self._cancelled.discard(run_id)
            except StoreUnavailable as exc:  # nothing of the failed write is stored
                self._retry_after_store_fault(run_id, exc)
            except Exception as exc:  # a bug in devserver, not in the user's function
                log.exception("run %s: internal error while executing", run_id)
                await self._fail_outright(run_id, exc)
            except BaseException as exc:  # noqa: BLE001 - user code's, got past every handler
                log.error("run %s: %s escaped its invocation; the run fails", run_id,
                          type(exc).__name__)
                await self._fail_outright(run_id, exc)

    async def _fail_outright(self, run_id: str, exc: BaseException) -> None:
        """Fail a run whose invocation ended in an error nothing else handled, so that it
        doesn't stay Running until the next start (and end the same way again)."""
        try:
            state = await self.store.run_state(run_id)
            if state is not None and state.run.status in UNFINISHED:
                await self._finish(state.run, state.events, FAILED, error=error_info(exc))
        except Exception:
            log.exception("run %s: could not record its failure", run_id)

    def _retry_after_store_fault(self, run_id: str, exc: StoreUnavailable) -> None:
        """Execute the run again later (its end, when that was the write that failed): a
        run is never left Running for a write the database refused."""
        tries = self._store_tries.get(run_id, 0) + 1
        if tries > STORE_RETRIES:
            self._store_tries.pop(run_id, None)
            self._unwritten_ends.pop(run_id, None)
            log.error("run %s: gave up writing it after %d tries; it resumes at the next "
                      "start: %s", run_id, STORE_RETRIES, exc.message)
            return
        self._store_tries[run_id] = tries
        delay = min(STORE_RETRY_MS * 2 ** (tries - 1), STORE_RETRY_MAX_MS)
        log.debug("run %s: %s; trying again in %d ms", run_id, exc.message, delay)
        self.schedule(run_id, self.clock.now_ms() + delay)

    async def _invoke(self, run_id: str) -> None:
        unwritten = self._unwritten_ends.pop(run_id, None)
        if unwritten is not None:
            await unwritten()
            return
        state = self._fresh.pop(run_id, None) or await self.store.run_state(run_id)
        if state is None or state.run.status not in UNFINISHED:
            return
        run = state.run
        fn = self.registry.get(run.function_id)
        if fn is None:
            log.warning("run %s waits: function %s is not registered", run_id, run.function_id)
            return
        if fn.flow is not None and not await self.flow.admit(state, fn):
            return  # queued for concurrency, or cancelled by a timeout
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"run {run_id} of {fn.id}")  # named for the loop watchdog
        if run.status == QUEUED:
            # The start is written on the next turn of the loop, not awaited: the function
            # starts at once. A function that is done by then records its start with its end
            # (one write instead of two). If the run was cancelled meanwhile, its later writes
            # find it ended and the invocation stops (RunEnded).
            self._unstarted[run_id] = self.clock.now_ms()
            asyncio.get_running_loop().call_soon(self._write_start, run_id)
        inv = Invocation(run_id=run_id, env=run.env, function=fn, events=state.events,
                         sessions=dict(run.sessions), memo=dict(state.memo),
                         pending=dict(state.pending), attempt=run.attempt, store=self.store,
                         clock=self.clock, backoff=self.backoff, runtime=self,
                         tries=dict(state.tries))
        started = self.clock.now_ms()
        try:
            result = await self._executor_for(fn)(inv)
        except Reschedule as resched:
            self.schedule(run_id, resched.at_ms)
            return
        except RunEnded:
            return
        except StoreUnavailable:  # not the function's failure
            raise
        except StoreInterrupted as interrupted:  # a step's write refused, under user code
            raise interrupted.error from None
        except asyncio.CancelledError as exc:
            if _cancelled_by_us():
                raise
            # The function raised CancelledError itself (or awaited something cancelled
            # elsewhere): its failure, like any other error.
            await self._function_failed(inv, run, exc, started)
            return
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit fails the run too
            await self._function_failed(inv, run, exc, started)
            return
        try:
            output_json = encode_output(result, "the value returned by the function")
        except TypeError as exc:  # not JSON, too large or too deep: retrying can't help
            await self._function_failed(inv, run, NonRetriableError(str(exc)), started)
            return
        await self._finish(run, inv.events, COMPLETED, output_json=output_json,
                           deferred=deferred_events(run, inv.memo))

    def _executor_for(self, fn: FunctionDef) -> FunctionExecutor:
        if fn.remote is None:
            return self.local
        if self.remote is None:
            raise RuntimeError(f"{fn.id} is served by an SDK app, but this server has no "
                               "SDK executor")
        return self.remote

    async def _function_failed(
        self, inv: Invocation, run: RunRecord, exc: BaseException, started: int,
    ) -> None:
        now = self.clock.now_ms()
        if isinstance(exc, StepError):
            error = stored_error(exc.name, exc.message, exc.stack, step_id=exc.step_id)
        else:
            error = error_info(exc)
        if inv.can_retry(exc):
            next_at = inv.next_attempt_at(exc, now)
            attempt = StepAttempt(0, None, "function", inv.attempt, FAILED, started, now, None,
                                  error, final=False)
            if await self.store.record_attempt(run.run_id, attempt, inv.attempt + 1, next_at):
                runlog.will_retry(run_id=run.run_id, function_id=run.function_id, step_id=None,
                                  attempt=inv.attempt, error=error, at_ms=next_at,
                                  base_url=self.dashboard_url)
                self.schedule(run.run_id, next_at)
            return
        attempt = StepAttempt(0, None, "function", inv.attempt, FAILED, started, now, None,
                              error, final=True)
        reason = exc.reason if isinstance(exc, ReportedError) else None
        await self._finish(run, inv.events, FAILED, error=error, attempt=attempt,
                           reason=reason, deferred=deferred_events(run, inv.memo))

    def _write_start(self, run_id: str) -> None:
        started_at = self._unstarted.pop(run_id, None)
        if started_at is not None and self._started:
            marking = self.store.submit_start_run(run_id, started_at)
            marking.add_done_callback(_log_write_failure)

    async def _finish(
        self, run: RunRecord, events: list[StoredEvent], status: str, *,
        output_json: str | None = None, error: dict[str, Any] | None = None,
        attempt: StepAttempt | None = None, emitted: list[NewEvent] | None = None,
        started_at: int | None = None, reason: str | None = None,
        deferred: list[IncomingEvent] | None = None,
    ) -> None:
        if emitted is None:
            emitted = self._lifecycle(run, events, status, output_json, error, reason,
                                      deferred or [])
        if started_at is None:
            started_at = self._unstarted.pop(run.run_id, None)
        try:
            created = await self.store.finish_run(run.run_id, status, self.clock.now_ms(),
                                                  output_json=output_json, error=error,
                                                  attempt=attempt, emitted=emitted,
                                                  started_at=started_at,
                                                  max_tree_runs=self.max_tree_runs)
        except StoreUnavailable:
            # Retried by `_execute`'s reschedule: this write, not the function again.
            self._unwritten_ends[run.run_id] = functools.partial(
                self._finish, run, events, status, output_json=output_json, error=error,
                attempt=attempt, emitted=emitted, started_at=started_at)
            raise
        if created is not None:
            self.flow.forget(run.run_id)
            if status == FAILED:
                runlog.run_failed(run_id=run.run_id, function_id=run.function_id,
                                  sessions=run.sessions, error=error, base_url=self.dashboard_url)
            await self._ended(run, emitted, created)

    async def _ended(self, run: RunRecord, emitted: list[NewEvent], created: list[str]) -> None:
        await self.after_ingest(run.env, emitted, created)
        if run.event_name == INVOKED_EVENT:
            for parent in await self.store.waiting_for_run(run.run_id):
                self.schedule(parent, self.clock.now_ms())

    def _lifecycle(
        self, run: RunRecord, events: list[StoredEvent], status: str, output_json: str | None,
        error: dict[str, Any] | None, reason: str | None = None,
        deferred: list[IncomingEvent] | None = None,
    ) -> list[NewEvent]:
        """The events a run's end emits, prepared to store: its lifecycle events, then the
        `inngest/deferred.schedule` events of the runs it deferred. Only stored when some
        function or waiting run could use them: nothing else reads them."""
        wanted = [name for name in lifecycle_names(status)
                  if (run.env, name) in self._waited or self.registry.triggered_by(name)]
        deferred = [ev for ev in deferred or [] if self.registry.triggered_by(ev.name)]
        if not wanted and not deferred:
            return []
        return self.prepare(
            run.env, lifecycle_events(run, events, status, output_json, error, wanted, reason)
            + deferred,
            self.clock.now_ms(), skip_function=run.function_id, source=run.run_id)
