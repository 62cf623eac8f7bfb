"""The stored shape of an error, built here and nowhere else: `{name, message, stack, ...}`,
as Inngest records it, with its text capped and made storable.

`stored_error` builds one from its parts; `error_info` from an exception raised by user code
(its stack starting at the user's frames); `ReportedError` carries one that someone else
reported (an SDK app) so it is stored as given; `step_error` turns a failed step's record back
into the `StepError` raised into the function.
"""

from __future__ import annotations

import concurrent.futures
import os
import traceback
from pathlib import Path
from typing import Any

from devserver.app import StepError
from devserver.model.records import StepAttempt


def stored_error(name: str, message: str, stack: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """An error as stored: `{name, message, stack}` plus any `extra` keys (e.g. `step_id`)."""
    return {"name": name, "message": message, "stack": stack, **extra}


_INTERNAL_DIRS = (
    str(Path(__file__).resolve().parent.parent) + os.sep,  # devserver/
    str(Path(concurrent.futures.__file__).resolve().parent) + os.sep,
)


class ReportedError(Exception):
    """An error someone else reported in Inngest's shape (an SDK app): stored as given.

    Subclasses mix in `NonRetriableError` or `RetryAfterError` to say how it retries.
    """

    def __init__(self, error: dict[str, Any]) -> None:
        # Not super(): a subclass may mix in an exception whose __init__ wants more arguments.
        Exception.__init__(self, f"{error.get('name', 'Error')}: {error.get('message', '')}")
        self.error = error


def error_info(exc: BaseException) -> dict[str, Any]:
    """The stored shape of an error: `{name, message, stack}`, as Inngest records it.

    The stack starts at the user's code: devserver's own frames above it are dropped. An
    error an SDK reported (`ReportedError`) keeps the shape the SDK gave it.
    """
    if isinstance(exc, ReportedError):
        return dict(exc.error)
    tb = traceback.TracebackException.from_exception(exc)
    frames = list(tb.stack)
    while len(frames) > 1 and frames[0].filename.startswith(_INTERNAL_DIRS):
        frames.pop(0)
    tb.stack = traceback.StackSummary.from_list(frames)
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001 - user code: a __str__ that fails (or exits)
        message = f"<{type(exc).__name__}: str() failed>"
    return stored_error(_cap(type(exc).__name__), _cap(message), _cap("".join(tb.format())))


MAX_ERROR_CHARS = 64 * 1024
"""The longest error message or stack stored (an exception can carry megabytes of text)."""


def _cap(text: str) -> str:
    """Error text as stored: lone surrogates escaped (they can't be UTF-8), at most
    MAX_ERROR_CHARS characters."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= MAX_ERROR_CHARS:
        return text
    half = MAX_ERROR_CHARS // 2  # the start says what, the end where (the stack's last line)
    return (f"{text[:half]}\n… [{len(text) - 2 * half:,} characters cut] …\n"
            f"{text[-half:]}")




def step_error(memo: StepAttempt) -> StepError:
    """The `StepError` a failed step raises into the function."""
    error = memo.error or {}
    return StepError(
        memo.step_id or "", str(error.get("name", "Error")), str(error.get("message", "")),
        error.get("stack"),
    )
