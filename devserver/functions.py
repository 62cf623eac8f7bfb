"""The function-authoring API: `App`, `@app.function`, and the errors user code raises.

This is what users import. It holds definitions only; running them is `runner`'s job and steps
are `steps`' job.
"""

from __future__ import annotations

import datetime as dt
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import UserError
from .retry import DEFAULT_RETRIES
from .triggers import EventTrigger, parse_event_trigger

if TYPE_CHECKING:
    from .steps import Context

Handler = Callable[["Context"], Any]
F = TypeVar("F", bound=Handler)

_SLUG_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    triggers: tuple[EventTrigger, ...]
    retries: int
    handler: Handler

    @property
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
        trigger: str | Sequence[str],
        retries: int = DEFAULT_RETRIES,
        id: str | None = None,
        name: str | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated (sync or async) function to run on events matching `trigger`.

        `trigger` is one event name or wildcard (`app/*`, `app/user.*`) or a list of them.
        `retries` is the number of retries after the first attempt (default 4).
        `id` defaults to the Python name in kebab case; the full id is `<app id>-<id>`.
        The decorated function is returned unchanged, so it stays callable in unit tests.
        """
        triggers = [trigger] if isinstance(trigger, str) else list(trigger)
        if not triggers:
            raise UserError("a function needs at least one trigger")
        parsed = tuple(parse_event_trigger(t) for t in triggers)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise UserError(f"retries must be an integer from 0 to 20, got {retries!r}")

        def register(handler: F) -> F:
            if not callable(handler):
                raise UserError(f"@app.function must decorate a function, got {handler!r}")
            local_id = id if id is not None else kebab_case(handler.__name__)
            if not local_id or not _SLUG_OK.match(local_id):
                raise UserError(f"function id {local_id!r} must be letters, digits, '.', '_', '-'")
            full_id = f"{self.id}-{local_id}"
            if full_id in self._functions:
                raise UserError(f"app {self.id!r} already has a function with id {full_id!r}")
            self._functions[full_id] = FunctionDef(
                id=full_id,
                name=name or handler.__name__,
                app_id=self.id,
                triggers=parsed,
                retries=retries,
                handler=handler,
            )
            return handler

        return register
