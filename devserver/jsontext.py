"""JSON text as devserver stores and sends it: compact, and always valid UTF-8."""

from __future__ import annotations

import json
from typing import Any

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dump_json(value: Any) -> str:
    """Compact JSON text as stored in the database: always valid UTF-8.

    A string with a lone surrogate (an SDK's `\\ud800` escape, say) can't be UTF-8 text, so
    SQLite would refuse the whole write; such a value is stored with its non-ASCII characters
    escaped instead, which is still valid JSON and reads back as the same value.
    """
    text = _ENCODER.encode(value)
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
