"""What a step or a function may return: a value stored as JSON text, at most 4 MiB and at most
`MAX_DEPTH` levels deep, and the error that says why a value can't be stored.
"""

from __future__ import annotations

import json
from typing import Any

from devserver.jsontext import dump_json
from devserver.model.events import MAX_DEPTH, too_deep

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
