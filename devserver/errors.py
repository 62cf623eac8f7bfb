"""The one error hierarchy: every error a user can cause, with the HTTP status it maps to.

HTTP handlers turn any `DevserverError` into the canonical JSON error body; the CLI turns it into
one line on stderr and exit code 2. Anything else that escapes is a bug in devserver.
"""

from __future__ import annotations


class DevserverError(Exception):
    """Base class. `status` is the HTTP status the error maps to."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserError(DevserverError):
    """Bad input from a user: a request, a command-line argument, an app definition."""

    status = 400


class InvalidEvent(UserError):
    """An event that breaks the rules of the event API (SPEC 2.1, 2.2)."""


class PayloadTooLarge(UserError):
    """A request, or one event inside it, over the size or count limits."""

    status = 413


class NotFound(UserError):
    """An id or route that does not exist (in the selected environment)."""

    status = 404


class ConfigError(UserError):
    """A bad command-line option or app: bad path, bad module, busy port, unwritable DB."""


class StoreUnavailable(DevserverError):
    """The database can't take a write now: locked by another process, read-only, damaged,
    deleted while running. Nothing of the write is stored; it can be sent again once the
    cause is gone."""

    status = 503


class StoreFull(StoreUnavailable):
    """The disk holding the database is full: nothing of the write is stored."""

    status = 507


# Control flow, not errors: BaseExceptions so that `except Exception` in user code can't
# swallow them (see devserver.runtime.invocation).


class Unwind(BaseException):
    """Base of the control-flow exceptions that end an invocation early."""


class Reschedule(Unwind):
    """The run continues at `at_ms` (None: when something wakes it, e.g. an invoked run ends)."""

    def __init__(self, at_ms: int | None) -> None:
        super().__init__(at_ms)
        self.at_ms = at_ms


class RunEnded(Unwind):
    """The run ended (was cancelled) while this invocation was executing."""


class InvocationOver(Unwind):
    """A step was started in a parallel branch still running after its function returned or
    unwound: it does nothing (the run goes on from the steps already committed)."""


class StoreInterrupted(Unwind):
    """A write a step needed was refused by the database (`error`): the invocation ends and
    the run is executed again later from its last commit. An Unwind, so that user code's
    `except Exception` around a step can't swallow it and go on as if the step's result
    were stored."""

    def __init__(self, error: StoreUnavailable) -> None:
        super().__init__(error.message)
        self.error = error
