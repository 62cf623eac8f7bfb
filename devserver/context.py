"""What user code touches: the `Context` a function receives, `ctx.step`, and `Event`.

`ctx.step` offers `run`, `sleep`, `sleep_until`, `wait_for_event`, `send_event` and `invoke`;
their durable logic lives in `devserver.runtime.invocation`. Async functions get `Step`; sync
functions, which run in a worker thread, get `SyncStep`, whose methods block that thread while
the event loop commits. Only `run` executes user code itself: a sync body from an async
function goes to a worker thread so it never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from devserver.errors import Unwind
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


class Step:
    """`ctx.step` in async functions."""

    def __init__(self, invocation: Invocation, executor: concurrent.futures.Executor) -> None:
        self._inv = invocation
        self._executor = executor
        self.running: concurrent.futures.Future[Any] | None = None
        """The sync step body running in a worker thread now, if any (for the executor to
        interrupt when the function times out)."""

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
                # Left set if the wait is cancelled: the executor may interrupt the body.
                self.running = job = self._executor.submit(handler, *args)
                output = await asyncio.wrap_future(job)
                self.running = None
                if inspect.isawaitable(output):
                    output = await output
        except Unwind:
            raise
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the run is cancelled, timed out or the server stops
            return await self._inv.step_failed(uid, exc, started)  # raised by the step itself
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit fails the step too
            return await self._inv.step_failed(uid, exc, started)
        return await self._inv.step_succeeded(uid, output, started)

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
        except (Unwind, ThreadAbandoned):
            raise
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit fails the step too
            return self._on_loop(self._inv.step_failed(uid, exc, started))
        return self._on_loop(self._inv.step_succeeded(uid, output, started))

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
        self.logger: logging.LoggerAdapter[logging.Logger] = RunLogger(
            logging.getLogger(f"devserver.functions.{function_id}"), {"run_id": run_id},
            log_sink)
        self._invocation = invocation

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
