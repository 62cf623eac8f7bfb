"""JSON text as devserver stores and sends it: compact, and always valid UTF-8."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
# The same encoding, built once instead of on every call (`JSONEncoder.encode` makes its C
# encoder anew each time: half the cost of encoding an event's small `data`), and without the
# circular-reference bookkeeping: a value nested into itself ends in RecursionError, and is
# then encoded again by `_ENCODER` to say what is wrong.
_FAST: Callable[[Any, int], Iterable[str]] | None = None
if c_make_encoder is not None:
    _FAST = c_make_encoder(None, _ENCODER.default, encode_basestring, None, ":", ",", False,
                           False, False)


def dump_json(value: Any) -> str:
    """Compact JSON text as stored in the database: always valid UTF-8.

    A string with a lone surrogate (an SDK's `\\ud800` escape, say) can't be UTF-8 text, so
    SQLite would refuse the whole write; such a value is stored with its non-ASCII characters
    escaped instead, which is still valid JSON and reads back as the same value.
    """
    if _FAST is None:
        text = _ENCODER.encode(value)
    else:
        try:
            text = "".join(_FAST(value, 0))
        except RecursionError:
            text = _ENCODER.encode(value)  # "Circular reference detected", where it is one
    if not text.isascii() and not utf8_encodable(text):
        return _ASCII_ENCODER.encode(value)
    return text


def utf8_encodable(text: str) -> bool:
    """True when `text` has no lone surrogates (so it can be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
