"""One invocation's step bookkeeping: its memo, its step ids, its attempts, and the outcome of
each step recorded before the function may continue.

Every step kind (`step.run` here; sleeps and waits in `runtime.waits`, sending events and
invoking functions in `runtime.child_runs`) looks up its memoized outcome first, and commits
its outcome through `record_attempt`, `begin_wait` and `end_wait`. A write that finds the run
ended raises `RunEnded`; one the database refused raises `StoreInterrupted`. The whole of an
invocation is `runtime.invocation.Invocation`.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any, Protocol, cast

from devserver.app import FunctionDef, NonRetriableError, RetryAfterError, StepError
from devserver.clock import Clock
from devserver.errors import Reschedule, RunEnded, StoreInterrupted, StoreUnavailable
from devserver.model.events import IncomingEvent
from devserver.model.failures import error_info, step_error
from devserver.model.records import (
    COMPLETED,
    FAILED,
    WAITING,
    NewEvent,
    StepAttempt,
    StoredEvent,
    WaitSpec,
)
from devserver.model.retry import Backoff
from devserver.runtime import runlog
from devserver.runtime.outputs import to_json_value

if TYPE_CHECKING:
    from devserver.store.facade import Store


class Runtime(Protocol):
    """What steps need from the runner."""

    max_tree_runs: int
    """The most runs one tree of runs may hold (see `devserver.model.limits`)."""

    def prepare(
        self, env: str, events: list[IncomingEvent], now: int, *, skip_function: str | None = None,
        source: str | None = None,
    ) -> list[NewEvent]:
        """Give events ids and the runs their triggers start."""

    async def after_ingest(self, env: str, events: list[NewEvent], created: list[str]) -> None:
        """Schedule new runs, wake waiting runs, apply cancellations."""

    def resolve_function(self, ref: object) -> FunctionDef:
        """A registered function from a FunctionDef, its handler or its id."""

    def note_wait(self, env: str, event_name: str) -> None:
        """A run is about to wait for events with this name."""


class _StepWrites:
    """The store as an invocation uses it: a write the database refuses (`StoreUnavailable`,
    an Exception) is raised as `StoreInterrupted` (an Unwind), so that user code catching
    `Exception` around a step can't swallow it; the runner executes the run again later."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await attr(*args, **kwargs)
            except StoreUnavailable as exc:
                raise StoreInterrupted(exc) from exc

        setattr(self, name, call)  # made once per name and invocation
        return call


class Steps:
    """The bookkeeping of one execution of a run's function: its memo, its step ids and its
    attempt counter, and each step's outcome recorded.

    `attempt` is 0-based and counts attempts of the current unit of work: it returns to 0 once
    a step completes, as every step gets its own attempts.
    """

    def __init__(
        self, *, run_id: str, env: str, function: FunctionDef, events: list[StoredEvent],
        sessions: dict[str, str], memo: dict[str, StepAttempt], pending: dict[str, StepAttempt],
        attempt: int, store: Store, clock: Clock, backoff: Backoff, runtime: Runtime,
        tries: dict[str, int] | None = None,
    ) -> None:
        self.run_id = run_id
        self.env = env
        self.function = function
        self.events = events
        self.sessions = sessions
        self.memo = memo
        self.pending = pending
        self.attempt = attempt
        self.store = cast("Store", _StepWrites(store))
        self.clock = clock
        self.backoff = backoff
        self.runtime = runtime
        self.tries = tries or {}
        """Failed attempts so far of each unfinished step: the attempt a step in a parallel
        branch runs as (branches have their own attempts; see `Step.parallel`)."""
        self._seen: dict[str, int] = {}
        self._seen_lock = threading.Lock()  # sync parallel branches name steps from threads

    # -- bookkeeping -------------------------------------------------------------------------

    def unique_id(self, step_id: str) -> str:
        """`step_id` for its first use in this invocation, then `step_id:1`, `step_id:2`..."""
        if not isinstance(step_id, str) or not step_id:
            raise TypeError(f"step id must be a non-empty string, got {step_id!r}")
        with self._seen_lock:
            count = self._seen.get(step_id, 0)
            self._seen[step_id] = count + 1
        return step_id if count == 0 else f"{step_id}:{count}"

    def replay(self, memo: StepAttempt) -> Any:
        """The memoized outcome of a step: its output, or its final error raised as StepError."""
        if memo.error is not None:
            raise step_error(memo)
        return memo.output

    def next_attempt_at(self, exc: BaseException, now: int, attempt: int | None = None) -> int:
        """When to try again after `exc` ended the current attempt (or attempt `attempt`)."""
        if isinstance(exc, RetryAfterError):
            return exc.retry_at_ms(now)
        return now + self.backoff.delay_ms(self.attempt if attempt is None else attempt)

    def can_retry(self, exc: BaseException, attempt: int | None = None) -> bool:
        """Whether `exc` leaves attempts for the current unit of work (or after `attempt`)."""
        if isinstance(exc, NonRetriableError | StepError):
            return False
        return (self.attempt if attempt is None else attempt) + 1 < self.function.max_attempts

    @staticmethod
    def _check_live(live: bool | None) -> None:
        if not live:
            raise RunEnded

    def _done(self, record: StepAttempt) -> None:
        assert record.step_id is not None
        self.memo[record.step_id] = record
        self.pending.pop(record.step_id, None)
        self.attempt = 0

    # -- step.run ----------------------------------------------------------------------------

    async def step_failed(self, uid: str, exc: BaseException, started: int,
                          kind: str = "run", *, attempt: int | None = None) -> Any:
        """Record a failed step attempt; raise `Reschedule` to retry, else `StepError`.

        `attempt`: the step's own attempt (a step in a parallel branch), else the current one.
        """
        now = self.clock.now_ms()
        error = error_info(exc)
        tried = self.attempt if attempt is None else attempt
        if self.can_retry(exc, tried):
            next_at = self.next_attempt_at(exc, now, tried)
            record = StepAttempt(0, uid, kind, tried, FAILED, started, now, None, error,
                                 final=False)
            self._check_live(await self.store.record_attempt(
                self.run_id, record, tried + 1, next_at))
            runlog.will_retry(run_id=self.run_id, function_id=self.function.id, step_id=uid,
                              attempt=tried, error=error, at_ms=next_at)
            raise Reschedule(next_at)
        record = StepAttempt(0, uid, kind, tried, FAILED, started, now, None, error,
                             final=True)
        self._check_live(await self.store.record_attempt(self.run_id, record, 0))
        self._done(record)
        raise step_error(record) from exc

    async def step_succeeded(self, uid: str, output: Any, started: int, *,
                             attempt: int | None = None) -> Any:
        """Commit a step's result before the function may continue; return it as stored."""
        try:
            value = to_json_value(output, f"the value returned by step {uid!r}")
        except TypeError as exc:
            # A programming error that another attempt can't fix: fail the step for good.
            return await self.step_failed(uid, NonRetriableError(str(exc)), started,
                                          attempt=attempt)
        record = StepAttempt(0, uid, "run", self.attempt if attempt is None else attempt,
                             COMPLETED, started,
                             self.clock.now_ms(), value, None, final=True)
        self._check_live(await self.store.record_attempt(self.run_id, record, 0))
        self._done(record)
        return value

    async def record_step(self, uid: str, kind: str, output: Any, started: int) -> None:
        """Commit a step that does no work of its own (an SDK's deferred run, started when
        this run ends), leaving the attempt count of the work in progress as it is; recording
        the same id again replaces it (a defer aborted)."""
        value = to_json_value(output, f"step {uid!r}")
        record = StepAttempt(0, uid, kind, 0, COMPLETED, started, self.clock.now_ms(), value,
                             None, final=True)
        self._check_live(await self.store.record_attempt(self.run_id, record, self.attempt))
        self.memo[uid] = record

    # -- waiting steps: begun, and resolved --------------------------------------------------

    async def _wait(self, uid: str, kind: str, until: int | None, detail: dict[str, Any],
                    wait: WaitSpec | None = None) -> StepAttempt:
        if wait is not None and wait.event_name is not None:
            self.runtime.note_wait(self.env, wait.event_name)
        now = self.clock.now_ms()
        record = StepAttempt(0, uid, kind, 0, WAITING, now, now, None, None, final=False,
                             wait_until=until, detail=detail)
        self._check_live(await self.store.begin_wait(self.env, self.run_id, record, wait))
        self.pending[uid] = record
        return record

    async def _resolve(self, pending: StepAttempt, status: str, *, output: Any = None,
                       error: dict[str, Any] | None = None) -> StepAttempt:
        assert pending.step_id is not None
        now = self.clock.now_ms()
        self._check_live(await self.store.end_wait(
            self.run_id, pending.step_id, status, now, output=output, error=error))
        record = StepAttempt(0, pending.step_id, pending.kind, 0, status, pending.started_at,
                             now, output, error, final=True, detail=pending.detail)
        self._done(record)
        return record
