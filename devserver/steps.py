"""Steps and the context a function receives: memoized, durable, retried one step at a time.

A run's function is invoked from the top every time it resumes. Each `ctx.step.run(id, ...)`
first looks for the step's memoized result: when found, the body is skipped and the stored
result returned (or the stored failure raised); otherwise the body runs, its result is committed
to the database, and only then does the function continue. A failing step whose attempts are not
spent unwinds the invocation with `Reschedule` (a `BaseException`, so `except Exception` in user
code can't swallow it) and the run resumes at the backoff time.

Async functions get `Step`; sync functions, which run in a worker thread, get `SyncStep`, whose
methods block that thread while the event loop commits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import json
import logging
import os
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .clock import Clock
from .functions import FunctionDef, NonRetriableError, RetryAfterError, StepError
from .records import COMPLETED, FAILED, StepAttempt, StoredEvent
from .retry import Backoff
from .store import Store, dump_json

T = TypeVar("T")


class Reschedule(BaseException):
    """Unwinds an invocation that resumes at `at_ms` (a step's next attempt)."""

    def __init__(self, at_ms: int) -> None:
        super().__init__(at_ms)
        self.at_ms = at_ms


@dataclass(frozen=True, slots=True)
class Event:
    """An event as a function sees it (`ctx.event`)."""

    name: str
    data: dict[str, Any]
    id: str | None
    """The sender's idempotency id, if any."""
    ts: int
    """Milliseconds since the epoch."""
    v: Any
    user: Any
    sessions: dict[str, str]
    internal_id: str
    """The id the event API returned for this event."""

    @classmethod
    def from_stored(cls, ev: StoredEvent) -> Event:
        """Build from a stored event."""
        return cls(
            name=ev.name, data=ev.data, id=ev.event_id, ts=ev.ts, v=ev.v, user=ev.user,
            sessions=dict(ev.sessions), internal_id=ev.internal_id,
        )


_INTERNAL_DIRS = (
    str(Path(__file__).resolve().parent) + os.sep,
    str(Path(concurrent.futures.__file__).resolve().parent) + os.sep,
)


def error_info(exc: BaseException) -> dict[str, Any]:
    """The stored shape of an error: `{name, message, stack}`, as Inngest records it.

    The stack starts at the user's code: devserver's own frames above it are dropped.
    """
    tb = traceback.TracebackException.from_exception(exc)
    frames = list(tb.stack)
    while len(frames) > 1 and frames[0].filename.startswith(_INTERNAL_DIRS):
        frames.pop(0)
    tb.stack = traceback.StackSummary.from_list(frames)
    return {"name": type(exc).__name__, "message": str(exc), "stack": "".join(tb.format())}


def to_json_value(value: Any, what: str) -> Any:
    """`value` as it will read back from storage, or `TypeError` saying what can't be stored."""
    try:
        return json.loads(dump_json(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serializable: {exc}") from None


class Invocation:
    """One execution of a run's function: its memo, its step ids and its attempt counter.

    `attempt` is 0-based and counts attempts of the current unit of work: it returns to 0 once
    a step completes, as every step gets its own attempts.
    """

    def __init__(
        self, *, run_id: str, function: FunctionDef, memo: dict[str, StepAttempt],
        attempt: int, store: Store, clock: Clock, backoff: Backoff,
    ) -> None:
        self.run_id = run_id
        self.function = function
        self.memo = memo
        self.attempt = attempt
        self.store = store
        self.clock = clock
        self.backoff = backoff
        self._seen: dict[str, int] = {}

    def unique_id(self, step_id: str) -> str:
        """`step_id` for its first use in this invocation, then `step_id:1`, `step_id:2`..."""
        if not isinstance(step_id, str) or not step_id:
            raise TypeError(f"step id must be a non-empty string, got {step_id!r}")
        count = self._seen.get(step_id, 0)
        self._seen[step_id] = count + 1
        return step_id if count == 0 else f"{step_id}:{count}"

    def replay(self, memo: StepAttempt) -> Any:
        """The memoized outcome of a step: its output, or its final error raised as StepError."""
        if memo.error is not None:
            raise _step_error(memo)
        return memo.output

    def next_attempt_at(self, exc: BaseException, now: int) -> int:
        """When to try again after `exc` ended the current attempt."""
        if isinstance(exc, RetryAfterError):
            return exc.retry_at_ms(now)
        return now + self.backoff.delay_ms(self.attempt)

    def can_retry(self, exc: BaseException) -> bool:
        """Whether `exc` leaves attempts for the current unit of work."""
        if isinstance(exc, NonRetriableError | StepError):
            return False
        return self.attempt + 1 < self.function.max_attempts

    async def step_failed(self, uid: str, exc: BaseException, started: int) -> Any:
        """Record a failed step attempt; raise `Reschedule` to retry, else `StepError`."""
        now = self.clock.now_ms()
        error = error_info(exc)
        if self.can_retry(exc):
            next_at = self.next_attempt_at(exc, now)
            record = StepAttempt(0, uid, "run", self.attempt, FAILED, started, now, None, error,
                                 final=False)
            await self.store.record_attempt(self.run_id, record, self.attempt + 1, next_at)
            raise Reschedule(next_at)
        record = StepAttempt(0, uid, "run", self.attempt, FAILED, started, now, None, error,
                             final=True)
        await self.store.record_attempt(self.run_id, record, 0)
        self.memo[uid] = record
        self.attempt = 0
        raise _step_error(record) from exc

    async def step_succeeded(self, uid: str, output: Any, started: int) -> Any:
        """Commit a step's result before the function may continue; return it as stored."""
        try:
            value = to_json_value(output, f"the value returned by step {uid!r}")
        except TypeError as exc:
            # A programming error that another attempt can't fix: fail the step for good.
            return await self.step_failed(uid, NonRetriableError(str(exc)), started)
        record = StepAttempt(0, uid, "run", self.attempt, COMPLETED, started,
                             self.clock.now_ms(), value, None, final=True)
        await self.store.record_attempt(self.run_id, record, 0)
        self.memo[uid] = record
        self.attempt = 0
        return value


def _step_error(memo: StepAttempt) -> StepError:
    error = memo.error or {}
    return StepError(
        memo.step_id or "", str(error.get("name", "Error")), str(error.get("message", "")),
        error.get("stack"),
    )


class Step:
    """`ctx.step` in async functions."""

    def __init__(self, invocation: Invocation, executor: concurrent.futures.Executor) -> None:
        self._inv = invocation
        self._executor = executor

    async def run(self, step_id: str, handler: Callable[..., Any], *args: Any) -> Any:
        """Run `handler(*args)` once as step `step_id` and return its (JSON) result.

        On a resumed run the stored result is returned without calling `handler`. A sync
        `handler` runs in a worker thread so it never blocks the event loop. An exception
        retries the step (the function resumes later); once attempts are spent it is raised
        here as `StepError`.
        """
        uid = self._inv.unique_id(step_id)
        memo = self._inv.memo.get(uid)
        if memo is not None:
            return self._inv.replay(memo)
        started = self._inv.clock.now_ms()
        try:
            if inspect.iscoroutinefunction(handler):
                output = await handler(*args)
            else:
                loop = asyncio.get_running_loop()
                output = await loop.run_in_executor(
                    self._executor, functools.partial(handler, *args))
                if inspect.isawaitable(output):
                    output = await output
        except (asyncio.CancelledError, Reschedule):
            raise
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit fails the step too
            return await self._inv.step_failed(uid, exc, started)
        return await self._inv.step_succeeded(uid, output, started)


class SyncStep:
    """`ctx.step` in sync functions; each method blocks the worker thread it is called from."""

    def __init__(self, invocation: Invocation, loop: asyncio.AbstractEventLoop) -> None:
        self._inv = invocation
        self._loop = loop

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def run(self, step_id: str, handler: Callable[..., Any], *args: Any) -> Any:
        """Run `handler(*args)` once as step `step_id`; see `Step.run`."""
        uid = self._inv.unique_id(step_id)
        memo = self._inv.memo.get(uid)
        if memo is not None:
            return self._inv.replay(memo)
        started = self._inv.clock.now_ms()
        try:
            output = handler(*args)
            if inspect.isawaitable(output):
                output = self._on_loop(_await(output))
        except Reschedule:
            raise
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit fails the step too
            return self._on_loop(self._inv.step_failed(uid, exc, started))
        return self._on_loop(self._inv.step_succeeded(uid, output, started))


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


class Context:
    """What a function receives: the triggering event(s), the run, its sessions and `step`."""

    def __init__(
        self, *, event: Event, events: list[Event], run_id: str, function_id: str, env: str,
        sessions: dict[str, str], step: Step | SyncStep, invocation: Invocation,
    ) -> None:
        self.event = event
        self.events = events
        self.run_id = run_id
        self.function_id = function_id
        self.env = env
        self.sessions = sessions
        self.step = step
        self.logger: logging.LoggerAdapter[logging.Logger] = logging.LoggerAdapter(
            logging.getLogger(f"devserver.functions.{function_id}"), {"run_id": run_id})
        self._invocation = invocation

    @property
    def attempt(self) -> int:
        """0-based attempt of the current step (or of the function, outside steps)."""
        return self._invocation.attempt

    def __repr__(self) -> str:
        return f"<Context run_id={self.run_id} function_id={self.function_id}>"
