"""The stored shape of an error, built here and nowhere else: `{name, message, stack, ...}`,
as Inngest records it, with its text capped and made storable.

`stored_error` builds one from its parts; `error_info` from an exception raised by user code
(its stack starting at the user's frames); `reported_error` keeps the error body an SDK app
sent verbatim (every key it sent, `code` and `cause` included, none added), and
`ReportedError` carries it so it is stored as given; `memo_error` is a stored error as the
SDKs read it back in a failed step's memo; `failure_event_error` is `data.error` of an
`inngest/function.failed` event, in Inngest's shape; `step_error` turns a failed step's
record back into the `StepError` raised into the function.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import traceback
from pathlib import Path
from typing import Any

from devserver.app import NonRetriableError, StepError
from devserver.model.records import StepAttempt


def stored_error(name: str, message: str, stack: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """An error as stored: `{name, message, stack}` plus any `extra` keys (e.g. `step_id`);
    without a stack, no `stack` key (never `"stack": null`)."""
    error: dict[str, Any] = {"name": name, "message": message}
    if stack is not None:
        error["stack"] = stack
    error.update(extra)
    return error


def reported_error(value: Any, fallback: str) -> dict[str, Any]:
    """The error an SDK app sent, as stored: a JSON object is kept verbatim (its `message`
    and `stack` capped like ours); anything else (a string, an HTML error page) becomes
    `{name: "Error", message}`, `fallback` when there is nothing to say."""
    if isinstance(value, dict):
        error = dict(value)
        for key in ("message", "stack"):
            if isinstance(error.get(key), str):
                error[key] = _cap(error[key])
        return error
    if isinstance(value, str) and value:
        return stored_error("Error", _cap(value))
    return stored_error("Error", fallback)


def memo_error(error: dict[str, Any]) -> dict[str, Any]:
    """A stored error as the SDKs read it in a failed step's memo: every key as stored, with
    the `name` and `message` both SDKs require (Inngest always sends them, empty or not)."""
    return {**error, "name": _text(error.get("name")) or "Error",
            "message": _text(error.get("message"))}


INVOKE_TIMEOUT_NAME = "InngestInvokeTimeoutError"
INVOKE_TIMEOUT_MESSAGE = "Timed out waiting for invoked function to complete"
"""The error an invoke step fails with when the invoked run did not finish in time, in
Inngest's words (the SDKs raise it into the function as is)."""

DEFAULT_FAILURE = "Function execution error"
"""Inngest's `error` and `message` of a failure that says nothing else."""


def failure_event_error(error: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    """`data.error` of an `inngest/function.failed` event, in Inngest's shape: `{error,
    name, message, stack}` with `stack` left out when there is none, and no other key.

    `reason` is why the attempt failed as the server saw it (`"invalid status code: 500"`
    for an SDK app's error answer); the error's own `error` string wins over it, and without
    either `error` reads `"<name>: <message>"`. An error nested under `error` or `body` (an
    object, or an object as a JSON string) is read instead of its wrapper, as Inngest does.
    """
    source = error
    for key in ("error", "body"):
        nested = source.get(key)
        if isinstance(nested, str) and len(nested) <= 32 * 1024:
            try:
                nested = json.loads(nested)
            except ValueError:
                pass
        if isinstance(nested, dict):
            source = nested
            break
    name = _text(source.get("name")) or "Error"
    message = _text(source.get("message")) or reason or DEFAULT_FAILURE
    out: dict[str, Any] = {
        "error": _text(source.get("error")) or reason or f"{name}: {message}",
        "name": name, "message": message}
    stack = _text(source.get("stack"))
    if stack:
        out["stack"] = stack
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


_INTERNAL_DIRS = (
    str(Path(__file__).resolve().parent.parent) + os.sep,  # devserver/
    str(Path(concurrent.futures.__file__).resolve().parent) + os.sep,
)


class ReportedError(Exception):
    """An error someone else reported in Inngest's shape (an SDK app): stored as given.

    Subclasses mix in `NonRetriableError` or `RetryAfterError` to say how it retries.
    """

    reason: str | None = None
    """Why the attempt failed as the server saw it (`"invalid status code: 500"`), for the
    `inngest/function.failed` event; None: the error says it all."""

    def __init__(self, error: dict[str, Any]) -> None:
        # Not super(): a subclass may mix in an exception whose __init__ wants more arguments.
        Exception.__init__(self, f"{error.get('name', 'Error')}: {error.get('message', '')}")
        self.error = error


class FinalReportedError(ReportedError, NonRetriableError):
    """An error in Inngest's shape that ends its step at once, stored as given (e.g. the
    `{name: "Error", message}` an invoke of an unknown function resolves with)."""


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
    stack = error.get("stack")
    return StepError(
        memo.step_id or "", str(error.get("name", "Error")), str(error.get("message", "")),
        stack if isinstance(stack, str) else None,
    )
