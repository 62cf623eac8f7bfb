"""What user code touches: the `Context` a function receives, `ctx.step`, and `Event`.

`ctx.step` offers `run`, `sleep`, `sleep_until`, `wait_for_event`, `send_event`, `invoke` and
`parallel` (branches of steps run at once); their durable logic lives in
`devserver.runtime.invocation` (and the step kinds' modules it is built from). Async functions
get `Step`; sync functions, which run in a worker thread, get `SyncStep`, whose methods block
that thread while the event loop commits. Only `run` executes user code itself: a sync body
from an async function goes to a worker thread so it never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime as dt
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from devserver.errors import InvocationOver, Reschedule, Unwind
from devserver.model.records import StoredEvent

if TYPE_CHECKING:
    from devserver.runtime.invocation import Invocation

T = TypeVar("T")


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

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Event:
        """Build from the dict a `wait_for_event` step stores."""
        return cls(
            name=doc["name"], data=doc.get("data") or {}, id=doc.get("id") or None,
            ts=doc["ts"], v=doc.get("v"), user=doc.get("user"),
            sessions=dict(doc.get("sessions") or {}), internal_id=doc.get("internal_id", ""),
        )


Duration = str | int | float | dt.timedelta
Moment = dt.datetime | str | int | float


class RunLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`ctx.logger`: the function's logger (`devserver.functions.<function id>`), its lines
    starting with the run id so the terminal says which run wrote them (`run_id` is also on
    each record, for handlers of your own).

    With a `sink`, every line (at any level, whatever the logging configuration lets through
    to the terminal) is also handed to it as (level, text): the server keeps them with the
    run, for its page."""

    def __init__(self, logger: logging.Logger, extra: dict[str, Any],
                 sink: Callable[[int, str], None] | None = None) -> None:
        super().__init__(logger, extra)
        self._sink = sink

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        """Prefix the run id; keep `run_id` in the record's extra."""
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"run {extra.get('run_id')}: {msg}", kwargs

    def isEnabledFor(self, level: int) -> bool:
        """True for every level when lines are kept for the run page."""
        return self._sink is not None or self.logger.isEnabledFor(level)

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        """Keep the line for the run (if there is a sink), and log it as configured."""
        if self._sink is not None:
            try:
                text = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                text = f"{msg} {args!r}"
            if kwargs.get("exc_info"):
                text += " (with a traceback: see the terminal)"
            try:
                self._sink(level, text)
            except Exception:
                logging.getLogger(__name__).debug("could not keep a log line", exc_info=True)
        if self.logger.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)


class ThreadAbandoned(BaseException):
    """Raised in a worker thread whose sync code ran past its function's timeout, to stop it;
    a BaseException, so that `except Exception` in user code doesn't swallow it."""


Branch = Callable[[], Any]
"""A branch of `ctx.step.parallel`: a callable taking no arguments whose steps run beside the
other branches' (async: returns an awaitable, e.g. `lambda: ctx.step.run("a", fetch_a)`)."""

_in_branch: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "devserver_in_branch", default=False)


def _combine(outcomes: list[BaseException | None]) -> BaseException | None:
    """What a parallel group raises when branches failed: an unwind first (the run can't go
    on: the earliest `Reschedule`), else the first branch's error, in branch order."""
    unwinds = [exc for exc in outcomes if isinstance(exc, Unwind)]
    if unwinds:
        waits = [exc for exc in unwinds if isinstance(exc, Reschedule)]
        if len(waits) < len(unwinds):
            return next(exc for exc in unwinds if not isinstance(exc, Reschedule))
        times = [exc.at_ms for exc in waits if exc.at_ms is not None]
        return Reschedule(min(times) if times else None)
    return next((exc for exc in outcomes if exc is not None), None)


def _check_branches(branches: tuple[Any, ...]) -> None:
    for index, branch in enumerate(branches):
        if not callable(branch):
            raise TypeError(f"parallel branch {index} must be a callable taking no arguments "
                            f"(e.g. lambda: ctx.step.run(...)), got {type(branch).__name__}")


async def _run_branch(branch: Branch) -> Any:
    result = branch()
    return await result if inspect.isawaitable(result) else result


def _outcome(job: asyncio.Future[Any] | concurrent.futures.Future[Any]) -> BaseException | None:
    if job.cancelled():
        return asyncio.CancelledError()
    return job.exception()


class Step:
    """`ctx.step` in async functions."""

    def __init__(self, invocation: Invocation, executor: concurrent.futures.Executor) -> None:
        self._inv = invocation
        self._executor = executor
        self._main = asyncio.current_task()
        self.running: set[concurrent.futures.Future[Any]] = set()
        """The sync step bodies running in worker threads now (for the executor to
        interrupt when the function times out)."""
        self._active = 0  # steps whose body is running or whose outcome is being committed
        self._idle: asyncio.Future[None] | None = None  # awaited by `settle` while active
        self._over = False

    async def run(self, step_id: str, handler: Callable[..., Any], *args: Any) -> Any:
        """Run `handler(*args)` once as step `step_id` and return its (JSON) result.

        On a resumed run the stored result is returned without calling `handler`. A sync
        `handler` runs in a worker thread so it never blocks the event loop. An exception
        retries the step (the function resumes later); once attempts are spent it is raised
        here as `StepError`. Steps may run at once: see `parallel`.
        """
        uid = self._inv.unique_id(step_id)
        memo = self._inv.memo.get(uid)
        if memo is not None:
            return self._inv.replay(memo)
        if self._over:
            raise InvocationOver
        # A step outside the function's own task (a `parallel` branch, `asyncio.gather`)
        # counts its own attempts: its siblings' failures and successes aren't its own.
        attempt = (self._inv.tries.get(uid, 0)
                   if asyncio.current_task() is not self._main or _in_branch.get() else None)
        started = self._inv.clock.now_ms()
        self._active += 1
        try:
            return await self._execute(uid, handler, args, started, attempt)
        finally:
            self._active -= 1
            if not self._active and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)

    async def _execute(self, uid: str, handler: Callable[..., Any], args: tuple[Any, ...],
                       started: int, attempt: int | None) -> Any:
        try:
            if inspect.iscoroutinefunction(handler):
                output = await handler(*args)
            else:
                job = self._executor.submit(handler, *args)
                self.running.add(job)
                try:
                    output = await asyncio.wrap_future(job)
                finally:
                    # Left set if the wait is cancelled: the executor may interrupt the body.
                    if job.done():
                        self.running.discard(job)
                if inspect.isawaitable(output):
                    output = await output
        except Unwind:
            raise
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the run is cancelled, timed out or the server stops
            return await self._inv.step_failed(uid, exc, started, attempt=attempt)
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit fails the step too
            return await self._inv.step_failed(uid, exc, started, attempt=attempt)
        return await self._inv.step_succeeded(uid, output, started, attempt=attempt)

    async def parallel(self, *branches: Branch | Awaitable[Any]) -> tuple[Any, ...]:
        """Run `branches` at once and return their results, in order, once all are done.

        A branch is a callable with no arguments that returns an awaitable, typically
        `lambda: ctx.step.run("a", fetch_a)` or an async function running several steps in
        sequence, or an awaitable itself (`ctx.step.run("a", fetch_a)`, not awaited).

        Every step commits its result as soon as it is done, whatever its siblings do, and
        counts its own attempts: a step that fails is retried alone, the finished ones replay
        from the memo (a crash mid-group re-runs only the unfinished ones). If branches fail,
        this raises once all have ended: a retry or a wait first (the function resumes
        later), else the first failed branch's error, in branch order. Give the steps of
        different branches distinct ids: a repeated id is numbered (`id:1`) in the order the
        branches reach it.

        `asyncio.gather` over steps runs them at once too (each step then also counts its
        own attempts), but raises as soon as one fails while its siblings still run; the
        function's end waits for them to commit either way.
        """
        _check_branches(tuple(b for b in branches if not inspect.isawaitable(b)))
        tasks = []
        for branch in branches:
            context = contextvars.copy_context()
            context.run(_in_branch.set, True)
            work = _await(branch) if inspect.isawaitable(branch) else _run_branch(branch)
            tasks.append(asyncio.create_task(work, context=context))
        if not tasks:
            return ()
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        failed = _combine([_outcome(task) for task in tasks])
        if failed is not None:
            raise failed
        return tuple(task.result() for task in tasks)

    def close(self) -> None:
        """Let no new step begin (the invocation is over)."""
        self._over = True

    async def settle(self) -> None:
        """The function has returned or unwound: wait for steps still running in branches it
        left behind to commit, and let no new step begin."""
        self._over = True
        if self._active:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    async def sleep(self, step_id: str, duration: Duration) -> None:
        """Pause the run for `duration` (`"30s"`, `"1h30m"`, seconds or a timedelta).

        Durable: the wake time is stored, so a restart doesn't shorten or restart the sleep.
        """
        await self._inv.sleep(step_id, duration)

    async def sleep_until(self, step_id: str, until: Moment) -> None:
        """Pause the run until a datetime (naive means UTC), ISO 8601 string or ms timestamp."""
        await self._inv.sleep_until(step_id, until)

    async def wait_for_event(
        self, step_id: str, *, event: str, timeout: Duration, if_: str | None = None,
        match: str | None = None,
    ) -> Event | None:
        """Wait for an event named `event` sent after the wait began; None after `timeout`.

        `if_` is a CEL condition over `event` (this run's trigger) and `async` (the
        candidate), e.g. `"async.data.order_id == event.data.order_id"`; `match="data.id"`
        is shorthand for exactly that comparison.
        """
        found = await self._inv.wait_for_event(step_id, event, timeout, if_, match)
        return None if found is None else Event.from_dict(found)

    async def send_event(self, step_id: str, events: dict[str, Any] | list[dict[str, Any]]
                         ) -> list[str]:
        """Send one event or a list (validated as `/e/` does) exactly once; returns their ids.

        The events carry this run's sessions unless they set sessions of their own.
        """
        return await self._inv.send_event(step_id, events)

    async def invoke(self, step_id: str, *, function: object, data: dict[str, Any] | None = None,
                     timeout: Duration | None = None) -> Any:
        """Run another registered function (its handler or id) and return its output.

        Its failure is raised here as `StepError`; so is not finishing within `timeout`.
        """
        return await self._inv.invoke(step_id, function, data, timeout)


class SyncStep:
    """`ctx.step` in sync functions; each method blocks the worker thread it is called from."""

    def __init__(self, invocation: Invocation, loop: asyncio.AbstractEventLoop,
                 executor: concurrent.futures.Executor) -> None:
        self._inv = invocation
        self._loop = loop
        self._executor = executor
        self.running: set[concurrent.futures.Future[Any]] = set()
        """The parallel branches running in worker threads now (for the executor to
        interrupt when the function times out)."""

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def run(self, step_id: str, handler: Callable[..., Any], *args: Any) -> Any:
        """Run `handler(*args)` once as step `step_id`; see `Step.run`."""
        uid = self._inv.unique_id(step_id)
        memo = self._inv.memo.get(uid)
        if memo is not None:
            return self._inv.replay(memo)
        attempt = self._inv.tries.get(uid, 0) if _in_branch.get() else None
        started = self._inv.clock.now_ms()
        try:
            output = handler(*args)
            if inspect.isawaitable(output):
                output = self._on_loop(_await(output))
        except (Unwind, ThreadAbandoned):
            raise
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit fails the step too
            return self._on_loop(self._inv.step_failed(uid, exc, started, attempt=attempt))
        return self._on_loop(self._inv.step_succeeded(uid, output, started, attempt=attempt))

    def parallel(self, *branches: Callable[[], Any]) -> tuple[Any, ...]:
        """Run `branches` at once, each in a worker thread of its own, and return their
        results in order once all are done; see `Step.parallel` (a branch here is a plain
        callable, e.g. `lambda: ctx.step.run("a", fetch_a)`)."""
        _check_branches(branches)
        jobs = []
        for branch in branches:
            context = contextvars.copy_context()
            context.run(_in_branch.set, True)
            jobs.append(self._executor.submit(context.run, branch))
        self.running.update(jobs)
        try:
            concurrent.futures.wait(jobs)
        finally:
            self.running.difference_update(job for job in jobs if job.done())
        failed = _combine([_outcome(job) for job in jobs])
        if failed is not None:
            raise failed
        return tuple(job.result() for job in jobs)

    def sleep(self, step_id: str, duration: Duration) -> None:
        """See `Step.sleep`."""
        self._on_loop(self._inv.sleep(step_id, duration))

    def sleep_until(self, step_id: str, until: Moment) -> None:
        """See `Step.sleep_until`."""
        self._on_loop(self._inv.sleep_until(step_id, until))

    def wait_for_event(
        self, step_id: str, *, event: str, timeout: Duration, if_: str | None = None,
        match: str | None = None,
    ) -> Event | None:
        """See `Step.wait_for_event`."""
        found = self._on_loop(self._inv.wait_for_event(step_id, event, timeout, if_, match))
        return None if found is None else Event.from_dict(found)

    def send_event(self, step_id: str, events: dict[str, Any] | list[dict[str, Any]]
                   ) -> list[str]:
        """See `Step.send_event`."""
        return self._on_loop(self._inv.send_event(step_id, events))

    def invoke(self, step_id: str, *, function: object, data: dict[str, Any] | None = None,
               timeout: Duration | None = None) -> Any:
        """See `Step.invoke`."""
        return self._on_loop(self._inv.invoke(step_id, function, data, timeout))


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


class _ContextBase:
    """What every function receives: the triggering event(s), the run and its sessions."""

    def __init__(
        self, *, event: Event, events: list[Event], run_id: str, function_id: str, env: str,
        sessions: dict[str, str], invocation: Invocation,
        log_sink: Callable[[int, str], None] | None = None,
    ) -> None:
        self.event = event
        self.events = events
        self.run_id = run_id
        self.function_id = function_id
        self.env = env
        self.sessions = sessions
        self._log_sink = log_sink
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._invocation = invocation

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """The run's logger (`RunLogger`), made on first use: most runs never log, and
        making it was a tenth of a trivial run's time in the executor."""
        if self._logger is None:
            self._logger = RunLogger(
                logging.getLogger(f"devserver.functions.{self.function_id}"),
                {"run_id": self.run_id}, self._log_sink)
        return self._logger

    @logger.setter
    def logger(self, logger: logging.LoggerAdapter[logging.Logger]) -> None:
        self._logger = logger

    @property
    def attempt(self) -> int:
        """0-based attempt of the current step (or of the function, outside steps)."""
        return self._invocation.attempt

    def __repr__(self) -> str:
        return f"<{type(self).__name__} run_id={self.run_id} function_id={self.function_id}>"


class Context(_ContextBase):
    """What an async function receives; `await ctx.step.run(...)` and the other steps."""

    def __init__(self, *, step: Step, **fields: Any) -> None:
        super().__init__(**fields)
        self.step = step


class SyncContext(_ContextBase):
    """What a sync function receives; its `ctx.step.run(...)` calls block its thread."""

    def __init__(self, *, step: SyncStep, **fields: Any) -> None:
        super().__init__(**fields)
        self.step = step
