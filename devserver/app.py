"""The function-authoring API: `App`, `@app.function`, and the errors user code raises.

This is what users import. It holds definitions only; running them is the job of
`devserver.runtime`, and `ctx.step` is `devserver.context`.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from devserver.clock import parse_duration
from devserver.errors import UserError
from devserver.model.expressions import Expression
from devserver.model.flow import (
    Batch,
    Concurrency,
    Debounce,
    FlowConfig,
    Priority,
    RateLimit,
    Singleton,
    Throttle,
    Timeouts,
    parse_local,
)
from devserver.model.retry import DEFAULT_RETRIES
from devserver.model.triggers import CronTrigger, EventTrigger, parse_event_trigger

if TYPE_CHECKING:
    from devserver.context import Context, SyncContext

Handler = Callable[["Context"], Any] | Callable[["SyncContext"], Any]
"""An async function taking a `Context`, or a sync one taking a `SyncContext`."""
F = TypeVar("F", bound=Handler)

_SLUG_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FAILED_EVENT = "inngest/function.failed"
FINISHED_EVENT = "inngest/function.finished"
CANCELLED_EVENT = "inngest/function.cancelled"
INVOKED_EVENT = "inngest/function.invoked"
CRON_EVENT = "inngest/scheduled.timer"


@dataclass(frozen=True)
class TriggerEvent:
    """Trigger on events named `event` (`app/*` wildcards too) that pass `expression` (CEL)."""

    event: str
    expression: str | None = None


@dataclass(frozen=True)
class TriggerCron:
    """Trigger on a cron schedule, e.g. `"*/5 * * * *"` or `"TZ=Europe/Paris 0 9 * * 1-5"`."""

    cron: str


@dataclass(frozen=True)
class Cancel:
    """Cancel a run when an event named `event` arrives and `if_` (CEL) holds.

    In `if_`, `event` is the run's triggering event and `async` the incoming one, e.g.
    `"event.data.order_id == async.data.order_id"`.
    """

    event: str
    if_: str | None = None


@dataclass(frozen=True)
class CancelTrigger:
    """A compiled `Cancel`."""

    event: EventTrigger
    condition: Expression | None


Trigger = str | TriggerEvent | TriggerCron


class NonRetriableError(Exception):
    """Raise to fail the run (or step) at once, without further attempts."""


class RetryAfterError(Exception):
    """Raise to retry, but not before `delay` (seconds, a timedelta, or an aware datetime)."""

    def __init__(self, message: str, delay: float | dt.timedelta | dt.datetime) -> None:
        super().__init__(message)
        self.delay = delay

    def retry_at_ms(self, now_ms: int) -> int:
        """The earliest time of the next attempt, in ms since the epoch."""
        if isinstance(self.delay, dt.datetime):
            when = self.delay if self.delay.tzinfo else self.delay.replace(tzinfo=dt.UTC)
            return max(now_ms, int(when.timestamp() * 1000))
        seconds = self.delay.total_seconds() if isinstance(self.delay, dt.timedelta) else self.delay
        return now_ms + max(0, int(float(seconds) * 1000))


class StepError(Exception):
    """A step that failed for good, raised into the function at the step's call.

    Leaving it uncaught fails the run at once: the step already spent its attempts.
    """

    def __init__(self, step_id: str, name: str, message: str, stack: str | None) -> None:
        super().__init__(f"step {step_id!r} failed: {name}: {message}")
        self.step_id = step_id
        self.name = name
        self.message = message
        self.stack = stack


def kebab_case(name: str) -> str:
    """`summarize_thread` and `SummarizeThread` → `summarize-thread`."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name)
    return re.sub(r"[^A-Za-z0-9]+", "-", spaced).strip("-").lower()


@dataclass(frozen=True)
class FunctionDef:
    """A registered function: what it is called, what starts it and how it retries."""

    id: str
    """The full id, `<app id>-<function id>`."""
    name: str
    app_id: str
    triggers: tuple[EventTrigger | CronTrigger, ...]
    retries: int
    handler: Handler
    cancel_on: tuple[CancelTrigger, ...] = ()
    timeout: float | None = None
    """Seconds one execution of the function may take; None: the server's default."""
    remote: str | None = None
    """For a function of an Inngest SDK app: the URL the SDK serves it at (its
    `steps.step.runtime.url`); runs go through the SDK call protocol. None for local ones."""
    flow: FlowConfig | None = None
    """Flow control (SPEC 3.3): concurrency, throttle, debounce, batching...; None: none."""
    endpoint: bool = False
    """A durable endpoint of a TypeScript SDK app (`inngest.endpoint`): its runs start in
    the app, and are continued by calling the endpoint again (`devserver.sdk.endpoints`)."""

    @property
    def event_triggers(self) -> list[EventTrigger]:
        """The triggers that events start."""
        return [t for t in self.triggers if isinstance(t, EventTrigger)]

    @property
    def crons(self) -> list[CronTrigger]:
        """The cron schedules."""
        return [t for t in self.triggers if isinstance(t, CronTrigger)]

    @functools.cached_property
    def is_async(self) -> bool:
        """True for `async def` handlers; sync ones run in a worker thread."""
        return inspect.iscoroutinefunction(self.handler)

    @property
    def max_attempts(self) -> int:
        """Attempts in all: the first one plus `retries`."""
        return self.retries + 1


class App:
    """A group of functions under one app id, registered with `@app.function(...)`."""

    def __init__(self, app_id: str) -> None:
        if not isinstance(app_id, str) or not _SLUG_OK.match(app_id):
            raise UserError(
                f"app id {app_id!r} must be a non-empty name of letters, digits, '.', '_' or '-'"
            )
        self.id = app_id
        self._functions: dict[str, FunctionDef] = {}

    @property
    def functions(self) -> list[FunctionDef]:
        """The app's functions, in registration order."""
        return list(self._functions.values())

    def function(
        self,
        *,
        trigger: Trigger | Sequence[Trigger],
        retries: int = DEFAULT_RETRIES,
        id: str | None = None,
        name: str | None = None,
        cancel_on: Cancel | Sequence[Cancel] = (),
        on_failure: Handler | None = None,
        timeout: str | float | dt.timedelta | None = None,
        concurrency: Concurrency | Sequence[Concurrency] | int | None = None,
        throttle: Throttle | None = None,
        rate_limit: RateLimit | None = None,
        debounce: Debounce | None = None,
        batch_events: Batch | None = None,
        priority: Priority | None = None,
        singleton: Singleton | None = None,
        idempotency: str | None = None,
        timeouts: Timeouts | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated (sync or async) function to run on `trigger`.

        `trigger` is an event name or wildcard (`app/*`, `app/user.*`), a `TriggerEvent` (with a
        CEL filter), a `TriggerCron`, or a list of them. `retries` is the number of retries
        after the first attempt (default 4). `id` defaults to the Python name in kebab case;
        the full id is `<app id>-<id>`. `cancel_on` cancels runs when matching events arrive.
        `on_failure` is a function run (as `<full id>-failure`) when a run fails for good; its
        `ctx.event` is the `inngest/function.failed` event, with the error and original event.
        `timeout` (`"30s"`, seconds, a timedelta) bounds one execution of the function body
        (sleeps and waits between steps don't count); past it the run fails.
        Flow control takes inngest-py's names and shapes (SPEC 3.3): `concurrency=`
        (`Concurrency`, up to two), `throttle=Throttle(...)`, `rate_limit=RateLimit(...)`,
        `debounce=Debounce(...)`, `batch_events=Batch(...)`, `priority=Priority(run=...)`,
        `singleton=Singleton(...)`, `idempotency="<CEL key>"`, `timeouts=Timeouts(...)`.
        The decorated function is returned unchanged, so it stays callable in unit tests.
        """
        flow = parse_local(concurrency=concurrency, throttle=throttle, rate_limit=rate_limit,
                           debounce=debounce, batch_events=batch_events, priority=priority,
                           singleton=singleton, idempotency=idempotency, timeouts=timeouts)
        triggers = _parse_triggers(trigger)
        cancels = tuple(
            CancelTrigger(parse_event_trigger(c.event),
                          None if c.if_ is None else Expression(c.if_))
            for c in ([cancel_on] if isinstance(cancel_on, Cancel) else list(cancel_on))
        )
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise UserError(f"retries must be an integer from 0 to 20, got {retries!r}")
        seconds = None
        if timeout is not None:
            try:
                seconds = parse_duration(timeout) / 1000
            except ValueError as exc:
                raise UserError(f"timeout: {exc}") from None
            if seconds <= 0:
                raise UserError("timeout must be more than zero")

        def register(handler: F) -> F:
            if not callable(handler):
                raise UserError(f"@app.function must decorate a function, got {handler!r}")
            local_id = id if id is not None else kebab_case(handler.__name__)
            if not local_id or not _SLUG_OK.match(local_id):
                raise UserError(f"function id {local_id!r} must be letters, digits, '.', '_', '-'")
            full_id = f"{self.id}-{local_id}"
            self._add(FunctionDef(id=full_id, name=name or handler.__name__, app_id=self.id,
                                  triggers=triggers, retries=retries, handler=handler,
                                  cancel_on=cancels, timeout=seconds, flow=flow))
            if on_failure is not None:
                condition = f"event.data.function_id == {json.dumps(full_id)}"
                self._add(FunctionDef(
                    id=f"{full_id}-failure", name=f"{name or handler.__name__} (on failure)",
                    app_id=self.id, triggers=(parse_event_trigger(FAILED_EVENT, condition),),
                    retries=retries, handler=on_failure))
            return handler

        return register

    def _add(self, fn: FunctionDef) -> None:
        if fn.id in self._functions:
            raise UserError(f"app {self.id!r} already has a function with id {fn.id!r}")
        self._functions[fn.id] = fn


def _parse_triggers(trigger: Trigger | Sequence[Trigger]) -> tuple[EventTrigger | CronTrigger, ...]:
    items: list[Trigger] = (
        [trigger] if isinstance(trigger, str | TriggerEvent | TriggerCron) else list(trigger))
    if not items:
        raise UserError("a function needs at least one trigger")
    parsed: list[EventTrigger | CronTrigger] = []
    for item in items:
        if isinstance(item, str):
            parsed.append(parse_event_trigger(item))
        elif isinstance(item, TriggerEvent):
            parsed.append(parse_event_trigger(item.event, item.expression))
        elif isinstance(item, TriggerCron):
            parsed.append(CronTrigger(item.cron))
        else:
            raise UserError(f"unknown trigger {item!r}: use an event name, TriggerEvent or "
                            "TriggerCron")
    return tuple(parsed)
