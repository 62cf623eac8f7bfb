"""Executing a run: one invocation of its function, and what its outcome means for the run.

Each due run executes as an asyncio task (sync functions in a worker thread), at most
`concurrency` at once. An invocation is handed to the executor of its function (local Python
code or an SDK app); it returns the function's output (the run completes), raises `Reschedule`
(a step waits, or an attempt is retried on the clock) or fails (retried per the backoff, else
the run fails). A write the database refused re-executes the run later; an error in devserver
itself, or one that escaped user code, fails the run rather than leave it Running.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

from devserver.app import FunctionDef, NonRetriableError, StepError
from devserver.clock import Clock
from devserver.errors import Reschedule, RunEnded, StoreInterrupted, StoreUnavailable
from devserver.model.failures import ReportedError, error_info, stored_error
from devserver.model.lifecycle import deferred_events
from devserver.model.records import COMPLETED, FAILED, QUEUED, UNFINISHED, RunRecord, StepAttempt
from devserver.model.retry import Backoff
from devserver.runtime import runlog
from devserver.runtime.invocation import FunctionExecutor, Invocation
from devserver.runtime.outputs import encode_output
from devserver.runtime.run_ends import RunEnds

if TYPE_CHECKING:
    from devserver.store.facade import Store

log = logging.getLogger("devserver.runtime.runner")  # the name operators' filters know

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


class Slots:
    """At most `size` invocations executing at once; the others wait their turn, in order.
    (An `asyncio.Semaphore`, minus its two coroutines a turn when a slot is free.)"""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    def take_now(self) -> bool:
        """Take a free slot, if there is one and no one waits for it."""
        if self._free and not self._waiting:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot: one ending is handed over to the longest waiting."""
        if self.take_now():
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give()  # handed one just as it was cancelled: on to the next
            elif turn in self._waiting:  # (`give` drops the cancelled it meets)
                self._waiting.remove(turn)
            raise

    def give(self) -> None:
        """Give a slot back: to the longest waiting, else to the free ones."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


class Execution(RunEnds):
    """The runner's execution: invocations of due runs, and their outcomes recorded."""

    def __init__(
        self, store: Store, clock: Clock, backoff: Backoff, *, local: FunctionExecutor,
        remote: FunctionExecutor | None, concurrency: int,
    ) -> None:
        super().__init__(store, clock)
        self.local = local
        """Executes invocations of local Python functions."""
        self.remote = remote
        """Executes invocations of SDK functions (`FunctionDef.remote`), when SDK apps are on."""
        self.backoff = backoff
        self._slots = Slots(concurrency)
        self._concurrency = concurrency
        self._store_tries: dict[str, int] = {}  # tries each run's failed write has had
        self._starts_due = False  # `_write_starts` is called soon

    async def _execute(self, run_id: str) -> None:
        if not self._slots.take_now():
            await self._slots.take()
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
        finally:
            self._slots.give()

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
            # find it ended and the invocation stops (RunEnded). One callback writes the
            # starts of every run that began in the same turn.
            if not self._starts_due:
                self._starts_due = True
                asyncio.get_running_loop().call_soon(self._write_starts)
            self._unstarted[run_id] = self.clock.now_ms()
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

    def _write_starts(self) -> None:
        self._starts_due = False
        unstarted, self._unstarted = self._unstarted, {}
        if self._started:
            for run_id, started_at in unstarted.items():
                self.store.submit_start_run(run_id, started_at).add_done_callback(
                    _log_write_failure)
