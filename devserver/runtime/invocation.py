"""One invocation of a run's function, and the durable logic of every step kind.

A run's function is invoked from the top every time it resumes. Each step first looks for its
memoized outcome: when found, the stored result is returned (or the stored failure raised) and
nothing runs again. Otherwise the step does its work, commits its result, and only then does the
function continue. A step that must wait (a sleep, an event, an invoked run, a retry's backoff)
records what it waits for and unwinds the invocation with `Reschedule`, a `BaseException` so that
`except Exception` in user code can't swallow it; the runner resumes the run when it is due.

Waiting steps are resolved by the invocation itself when the run resumes: a sleep checks the
clock, a wait looks for matching events received after it began, an invoke reads the child run.
So a wake-up lost to a crash only delays a run; on restart every unfinished run is resumed once.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
import threading
from typing import TYPE_CHECKING, Any, Protocol, cast

from devserver.app import (
    INVOKED_EVENT,
    FunctionDef,
    NonRetriableError,
    RetryAfterError,
    StepError,
)
from devserver.clock import Clock, parse_duration, to_ms
from devserver.errors import Reschedule, RunEnded, StoreInterrupted, StoreUnavailable, UserError
from devserver.ids import new_ulid
from devserver.jsontext import dump_json
from devserver.model.events import MAX_DEPTH, IncomingEvent, too_deep, validate_event
from devserver.model.expressions import compile_expression
from devserver.model.failures import (
    INVOKE_TIMEOUT_MESSAGE,
    INVOKE_TIMEOUT_NAME,
    FinalReportedError,
    error_info,
    step_error,
    stored_error,
)
from devserver.model.lifecycle import INNGEST_DATA_KEY, invoke_metadata
from devserver.model.limits import RunTreeTooLarge
from devserver.model.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    FINISHED,
    WAITING,
    NewEvent,
    NewRun,
    StepAttempt,
    StoredEvent,
    WaitSpec,
    event_dict,
)
from devserver.model.registry import FunctionNotFound
from devserver.model.retry import Backoff
from devserver.runtime import runlog

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


MAX_OUTPUT_BYTES = 4 * 1024 * 1024
"""The most a step or a function may return, as JSON (Inngest's limit for step data)."""


def encode_output(value: Any, what: str) -> str:
    """`value` as stored JSON text, or `TypeError` saying why it can't be stored: not JSON,
    nested more than MAX_DEPTH levels, or larger than MAX_OUTPUT_BYTES."""
    try:
        text = dump_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{what} is not JSON-serializable: {exc}") from None
    except BaseException as exc:  # noqa: BLE001 - user code (a __iter__, a __str__...) raised
        # SystemExit, KeyboardInterrupt, CancelledError...: the value can't be stored, and
        # what it raised must not escape into the runner or the event loop.
        raise TypeError(f"{what} could not be encoded as JSON: encoding it raised "
                        f"{type(exc).__name__}: {_describe(exc)}") from None
    if len(text) > MAX_OUTPUT_BYTES // 4 and len(text.encode()) > MAX_OUTPUT_BYTES:
        raise TypeError(
            f"{what} is {len(text.encode()):,} bytes as JSON; at most {MAX_OUTPUT_BYTES:,} "
            "(4 MiB) can be stored. Keep large data elsewhere and return a reference to it")
    if text.count("[") + text.count("{") > MAX_DEPTH and too_deep(value, MAX_DEPTH):
        raise TypeError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return text


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - user code: a __str__ that fails (or exits)
        return "<str() failed>"


def to_json_value(value: Any, what: str) -> Any:
    """`value` as it will read back from storage, or `TypeError` saying what can't be stored."""
    return json.loads(encode_output(value, what))


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


class Invocation:
    """One execution of a run's function: its memo, its step ids and its attempt counter.

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

    # -- waiting steps -----------------------------------------------------------------------

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

    async def sleep_until(self, step_id: str, until: Any) -> None:
        """Durable sleep until a point in time; the wake time survives restarts."""
        await self.sleep_until_step(self.unique_id(step_id), until)

    async def sleep_until_step(self, uid: str, until: Any) -> None:
        """`sleep_until` for a step id that is already unique (SDK steps come that way)."""
        if uid in self.memo:
            return
        pending = self.pending.get(uid)
        if pending is None:
            try:
                when = to_ms(until)
            except ValueError as exc:
                raise TypeError(f"step {uid!r}: {exc}") from None
            pending = await self._wait(uid, "sleep", when, {"until": when})
        await self._settle_sleep(pending)

    async def _settle_sleep(self, pending: StepAttempt) -> None:
        assert pending.wait_until is not None
        if self.clock.now_ms() < pending.wait_until:
            raise Reschedule(pending.wait_until)
        await self._resolve(pending, COMPLETED)

    async def sleep(self, step_id: str, duration: Any) -> None:
        """Durable sleep for a duration (`"2s"`, `"1h30m"`, seconds, a timedelta)."""
        try:
            ms = parse_duration(duration)
        except ValueError as exc:
            raise TypeError(f"step {step_id!r}: {exc}") from None
        await self.sleep_until(step_id, self.clock.now_ms() + ms)

    async def wait_for_event(
        self, step_id: str, event: str, timeout: Any, if_: str | None = None,
        match: str | None = None,
    ) -> dict[str, Any] | None:
        """Wait for an event named `event` received after the wait began; None on timeout.

        `if_` is a CEL condition with `event` (this run's trigger) and `async` (the candidate);
        `match="data.user_id"` is shorthand for `event.data.user_id == async.data.user_id`.
        """
        return await self.wait_for_event_step(self.unique_id(step_id), event, timeout, if_, match)

    async def wait_for_event_step(
        self, uid: str, event: str, timeout: Any, if_: str | None = None,
        match: str | None = None,
    ) -> dict[str, Any] | None:
        """`wait_for_event` for a step id that is already unique (SDK steps come that way)."""
        if uid in self.memo:
            return self.replay(self.memo[uid])  # type: ignore[no-any-return]
        pending = self.pending.get(uid)
        if pending is None:
            if not isinstance(event, str) or not event:
                raise TypeError(f"step {uid!r}: event must be a non-empty event name")
            condition = if_
            if match is not None:
                condition = f"event.{match} == async.{match}"
            if condition is not None:
                compile_expression(condition)  # a bad expression fails here, at the call
            try:
                expires = self.clock.now_ms() + parse_duration(timeout)
            except ValueError as exc:
                raise TypeError(f"step {uid!r}: timeout: {exc}") from None
            detail = {"event": event, "if": condition, "after": new_ulid(),
                      "timeout_at": expires}
            pending = await self._wait(uid, "wait_for_event", expires, detail,
                                       WaitSpec(event_name=event))
        return await self._settle_wait(pending)

    async def _settle_wait(self, pending: StepAttempt) -> dict[str, Any] | None:
        found = await self._find_event(pending.detail)
        if found is not None:
            await self._resolve(pending, COMPLETED, output=found)
            return found
        assert pending.wait_until is not None
        if self.clock.now_ms() < pending.wait_until:
            raise Reschedule(pending.wait_until)
        await self._resolve(pending, COMPLETED, output=None)
        return None

    async def _find_event(self, detail: dict[str, Any]) -> dict[str, Any] | None:
        condition = detail.get("if")
        expression = None if condition is None else compile_expression(condition)
        trigger = event_dict(self.events[0]) if self.events else {}
        after = str(detail["after"])
        while True:
            batch = await self.store.events_after(self.env, detail["event"], after)
            for candidate in batch:
                doc = event_dict(candidate)
                if expression is None or expression.matches(event=trigger, **{"async": doc}):
                    return doc
            if len(batch) < 100:
                return None
            after = batch[-1].internal_id

    async def send_event(self, step_id: str, events: Any) -> list[str]:
        """Send events (exactly once) through the same validation as `/e/`; returns their ids.

        Events inherit the run's sessions unless they set sessions of their own.
        """
        uid = self.unique_id(step_id)
        if uid in self.memo:
            return list(self.replay(self.memo[uid]))
        started = self.clock.now_ms()
        raw = [events] if isinstance(events, dict) else events
        try:
            if not isinstance(raw, list) or not raw:
                raise UserError("send_event needs an event object or a non-empty list of them")
            incoming = [validate_event(self._inherit(obj), i) for i, obj in enumerate(raw)]
        except UserError as exc:
            await self.step_failed(uid, NonRetriableError(exc.message), started,
                                   kind="send_event")
            raise AssertionError("step_failed always raises") from None
        now = self.clock.now_ms()
        prepared = self.runtime.prepare(self.env, incoming, now, source=self.run_id)
        ids = [ev.internal_id for ev in prepared]
        record = StepAttempt(0, uid, "send_event", self.attempt, COMPLETED, started, now, ids,
                             None, final=True)
        try:
            created = await self.store.send_events(self.env, now, prepared, self.run_id, record,
                                                   self.runtime.max_tree_runs)
        except RunTreeTooLarge as exc:
            await self.step_failed(uid, NonRetriableError(str(exc)), started, kind="send_event")
            raise AssertionError("step_failed always raises") from None
        self._check_live(created is not None)
        assert created is not None
        self._done(record)
        await self.runtime.after_ingest(self.env, prepared, created)
        return ids

    def _inherit(self, obj: Any) -> Any:
        if not isinstance(obj, dict) or not self.sessions:
            return obj
        meta = obj.get("meta")
        if obj.get("sessions") or (isinstance(meta, dict) and meta.get("sessions")):
            return obj
        merged_meta = dict(meta) if isinstance(meta, dict) else {}
        merged_meta["propagated_sessions"] = dict(self.sessions)
        return {**obj, "meta": merged_meta}

    async def invoke(self, step_id: str, function: object, data: Any = None,
                     timeout: Any = None) -> Any:
        """Run another function with `data` as its event data and return its output.

        The child run carries this run's sessions. Its failure is raised here as `StepError`.
        """
        return await self.invoke_step(self.unique_id(step_id), function, data, timeout)

    async def invoke_step(self, uid: str, function: object, data: Any = None,
                          timeout: Any = None) -> Any:
        """`invoke` for a step id that is already unique (SDK steps come that way)."""
        if uid in self.memo:
            return self.replay(self.memo[uid])
        pending = self.pending.get(uid)
        if pending is None:
            started = self.clock.now_ms()
            try:
                target = self.runtime.resolve_function(function)
                if data is not None and not isinstance(data, dict):
                    raise UserError("invoke data must be a JSON object")
                payload = to_json_value(data or {}, "invoke data")
                expires = None if timeout is None else started + parse_duration(timeout)
            except FunctionNotFound as exc:
                # As Inngest resolves it: `{name: "Error", message}`, no stack, no retry.
                return await self.step_failed(
                    uid, FinalReportedError(stored_error("Error", exc.message)), started,
                    kind="invoke")
            except (UserError, TypeError, ValueError) as exc:
                message = exc.message if isinstance(exc, UserError) else str(exc)
                return await self.step_failed(uid, NonRetriableError(message), started,
                                              kind="invoke")
            child_id = new_ulid()
            payload[INNGEST_DATA_KEY] = invoke_metadata(
                source_app_id=self.function.app_id, source_fn_id=self.function.id,
                target_fn_id=target.id, correlation_id=f"{self.run_id}.{_hashed(uid)}",
                expires_at=expires, name=uid)
            event = NewEvent(
                internal_id=new_ulid(), name=INVOKED_EVENT, event_id=None, ts=started,
                data=dump_json(payload), v=None, user=None, meta=None,
                sessions=dict(self.sessions), runs=(NewRun(child_id, target.id),),
                source=self.run_id)
            record = StepAttempt(0, uid, "invoke", 0, WAITING, started, started, None, None,
                                 final=False, wait_until=expires,
                                 detail={"function_id": target.id, "run_id": child_id})
            try:
                created = await self.store.invoke(self.env, started, event, self.run_id, record,
                                                  WaitSpec(child_run_id=child_id),
                                                  self.runtime.max_tree_runs)
            except RunTreeTooLarge as exc:
                return await self.step_failed(uid, NonRetriableError(str(exc)), started,
                                              kind="invoke")
            self._check_live(created is not None)
            assert created is not None
            self.pending[uid] = pending = record
            await self.runtime.after_ingest(self.env, [event], created)
        return await self._settle_invoke(pending)

    async def _settle_invoke(self, pending: StepAttempt) -> Any:
        child = await self.store.run(str(pending.detail["run_id"]))
        if child is not None and child.status in FINISHED:
            if child.status == COMPLETED:
                return (await self._resolve(pending, COMPLETED, output=child.output)).output
            error = child.error or stored_error(
                "FunctionCancelledError", f"invoked run {child.run_id} was {CANCELLED}")
            raise step_error(await self._resolve(pending, FAILED, error=error))
        if pending.wait_until is not None and self.clock.now_ms() >= pending.wait_until:
            # Inngest's own words, which the SDKs raise as-is (`step.invoke` callers match
            # on the name).
            error = stored_error(INVOKE_TIMEOUT_NAME, INVOKE_TIMEOUT_MESSAGE)
            raise step_error(await self._resolve(pending, FAILED, error=error))
        raise Reschedule(pending.wait_until)

    async def settle(self, uid: str) -> None:
        """Check a waiting step again: resolve it (its outcome joins the memo) if what it
        waits for happened, else raise `Reschedule`. A failed invoke raises `StepError`."""
        pending = self.pending.get(uid)
        if pending is None:
            return
        if pending.kind == "sleep":
            await self._settle_sleep(pending)
        elif pending.kind == "wait_for_event":
            await self._settle_wait(pending)
        elif pending.kind == "invoke":
            await self._settle_invoke(pending)


def _hashed(uid: str) -> str:
    """A step id as the SDKs hash it (the SHA-1 of the user's id), for correlation ids."""
    if re.fullmatch(r"[0-9a-f]{40}", uid):
        return uid
    return hashlib.sha1(uid.encode("utf-8"), usedforsecurity=False).hexdigest()


class FunctionExecutor(Protocol):
    """Executes one invocation of a function: local Python code (`runtime.local`) or an SDK
    app over HTTP (`sdk.executor`). Returns the function's output, or raises what the runner
    handles: `Reschedule`, `RunEnded`, or the error that ends the attempt."""

    async def __call__(self, inv: Invocation) -> Any:
        """Run `inv` until it returns, waits or fails."""
