"""Event API validation: turns a `POST /e/{key}` body into `IncomingEvent`s or one user error.

Pure logic (SPEC 2.1, 2.2): strict JSON decoding, the per-field rules, the per-event and
per-request limits, and the sessions rules (merging `sessions`, `meta.sessions` and
`meta.propagated_sessions`; values stored as strings, numbers as JavaScript's `String(n)`).
Validation is atomic: `parse_body` returns every event or raises on the first problem, an
`InvalidEvent` (400) or `PayloadTooLarge` (413) whose message names the event index and field.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devserver.errors import InvalidEvent, PayloadTooLarge

MAX_EVENT_BYTES = 3 * 1024 * 1024  # one event as compact JSON, UTF-8 bytes
MAX_EVENTS_PER_REQUEST = 5000
MAX_BODY_BYTES = 64 * 1024 * 1024  # whole request body (enforced by the HTTP layer)
MAX_DEPTH = 100
"""Levels of nesting a request body may have (the array, the event, its data...). Deeper
JSON decodes, but Python's recursion limit would then stop it being encoded or shown."""
MAX_SESSIONS = 5
MAX_IDENTIFIER_CHARS = 128
MAX_VALUE_CHARS = 512
TS_MIN_MS = 315532800000  # 1980-01-01T00:00:00Z
TS_MAX_MS = 4102444800000  # 2100-01-01T00:00:00Z (exclusive)
RESERVED_PREFIX = "inngest/"

_COMPACT = (",", ":")
# Re-encoding can make an event longer than its source: `1e15,` (5 bytes) comes back as
# `1000000000000000.0,` (19). Nothing grows more than 4x, so smaller bodies need no measuring.
_MEASURE_ABOVE_BYTES = MAX_EVENT_BYTES // 4
# Strict UTF-8 never decodes to a surrogate, so only a `\uD800`-`\uDFFF` escape can produce one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Failure path only: a string, constant or number token, to find a bad number's position.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?Infinity|NaN|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?')
_NOT_JSON = "request body is not valid JSON: "
_SURROGATE = "contains an unpaired UTF-16 surrogate, which cannot be stored as UTF-8"
_JSON_TYPES: dict[type, str] = {bool: "boolean", int: "number", float: "number", str: "string"}
_JSON_TYPES |= {list: "array", dict: "object", type(None): "null"}


@dataclass(slots=True)  # not frozen: made on every request, and frozen init is slow
class IncomingEvent:
    """One validated event, ready to store; `ts` None means "use the receive time"."""

    name: str
    data: dict[str, Any]
    id: str | None  # the user's idempotency key
    ts: int | None  # milliseconds since the epoch
    v: Any
    user: Any
    meta: dict[str, Any] | None  # `meta` without `sessions`/`propagated_sessions`
    sessions: dict[str, str]  # merged and normalised: identifier -> value string
    decoded: bool = field(default=False, compare=False, repr=False)
    """True when `data`, `v`, `user` and `meta` were decoded from a request's JSON text just
    now (`parse_body`) and nothing else holds them: a new run's first invocation may use them
    as they are instead of decoding what was stored (they are equal to it)."""


class _BadNumber(Exception):
    """Raised from inside the JSON scanner; args[0] is the offending token."""


def _finite(token: str) -> float:
    """The scanner's hook for numbers with a fraction or exponent and for NaN/Infinity."""
    value = float(token)
    if not math.isfinite(value):
        raise _BadNumber(token)
    return value


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_finite)


def _locate(text: str, wanted: Callable[[str], bool]) -> str:
    for match in _TOKEN.finditer(text):
        if not match.group().startswith('"') and wanted(match.group()):
            pos = match.start()
            line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
            return f" at line {line} column {column}"
    return ""


def _too_long_int(token: str) -> bool:
    digits = token.lstrip("-")
    return digits.isdigit() and len(digits) > sys.get_int_max_str_digits() > 0


def _decode_utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        pos = e.start
        line, column = body.count(b"\n", 0, pos) + 1, pos - body.rfind(b"\n", 0, pos)
        raise InvalidEvent(
            f"request body is not valid UTF-8: byte 0x{body[pos]:02x} at line {line} "
            f"column {column} (byte offset {pos})"
        ) from None


def loads(body: bytes | str) -> Any:
    """Decode strict JSON (RFC 8259) from UTF-8 bytes or a str; every failure is `InvalidEvent`.

    Rejects invalid UTF-8, a byte order mark, `NaN`/`Infinity`/`-Infinity`, numbers that overflow
    to infinity (`1e400`), integers too long to convert and absurd nesting, with line and column.
    """
    text = _decode_utf8(body) if isinstance(body, bytes) else body
    if text.startswith("\ufeff"):
        raise InvalidEvent(_NOT_JSON + "it starts with a byte order mark")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise InvalidEvent(f"{_NOT_JSON}{e.msg} at line {e.lineno} column {e.colno}") from None
    except _BadNumber as e:
        bad: str = e.args[0]
        where = _locate(text, lambda token: token == bad)
        raise InvalidEvent(f"{_NOT_JSON}{bad} is not a finite number{where}") from None
    except RecursionError:
        raise InvalidEvent(_NOT_JSON + "it is nested too deeply") from None
    except ValueError:  # int() refusing a number with thousands of digits
        where = _locate(text, _too_long_int)
        limit = sys.get_int_max_str_digits()
        raise InvalidEvent(f"{_NOT_JSON}number too long{where}: at most {limit} digits") from None


def parse_body(body: bytes) -> list[IncomingEvent]:
    """Parse and validate a whole /e/ request body (one event object or an array).

    Atomic: raises on the first problem, returns all events only when every one is valid.
    """
    if not body.strip(b" \t\r\n"):
        raise InvalidEvent("request body is empty")
    text = _decode_utf8(body)
    doc = loads(text)
    # Nesting needs at least as many brackets as levels: counting them (in C) spares the
    # walk for almost every body.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and too_deep(doc, MAX_DEPTH):
        raise InvalidEvent(f"request body is nested more than {MAX_DEPTH} levels deep; "
                           f"at most {MAX_DEPTH} are allowed")
    if isinstance(doc, dict):
        doc = [doc]
    elif not isinstance(doc, list):
        raise InvalidEvent(
            f"request body must be an event object or an array of event objects, got {_type(doc)}"
        )
    elif not doc:
        raise InvalidEvent("request body is an empty array: no events")
    elif len(doc) > MAX_EVENTS_PER_REQUEST:
        raise PayloadTooLarge(
            f"request has {len(doc)} events; at most {MAX_EVENTS_PER_REQUEST} are allowed"
        )
    check_text = _SURROGATE_ESCAPE.search(text) is not None
    measure = len(body) > _MEASURE_ABOVE_BYTES
    events: list[IncomingEvent] = []
    for index, obj in enumerate(doc):
        event = _validate(obj, index, check_text=check_text)
        event.decoded = True
        events.append(event)
        if measure:
            _check_size(obj, index)
    return events


def too_deep(doc: object, limit: int) -> bool:
    """Whether JSON arrays and objects (dicts, lists, tuples) nest more than `limit` levels.
    Level by level, without recursion (so no recursion limit to hit)."""
    level = [doc] if isinstance(doc, _NESTED) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [child for item in level
                 for child in (item.values() if type(item) is dict else item)
                 if type(child) in _NESTED_TYPES or isinstance(child, _NESTED)]
    return False


_NESTED = (dict, list, tuple)
_NESTED_TYPES = frozenset(_NESTED)


def _check_size(obj: object, index: int) -> None:
    try:
        size = len(json.dumps(obj, separators=_COMPACT, ensure_ascii=False).encode("utf-8"))
    except RecursionError:
        raise InvalidEvent(f"events[{index}]: nested too deeply") from None
    if size > MAX_EVENT_BYTES:
        raise PayloadTooLarge(
            f"events[{index}]: event is {size} bytes as compact JSON; "
            f"at most {MAX_EVENT_BYTES} bytes (3 MiB) are allowed"
        )


def validate_event(obj: object, index: int) -> IncomingEvent:
    """Validate one decoded event; `index` is used in error messages."""
    return _validate(obj, index, check_text=True)


def _validate(obj: object, index: int, *, check_text: bool) -> IncomingEvent:
    # check_text=False: the event came from our strict decoder, out of text without surrogate
    # escapes, so data/v/user/meta are plain JSON that encodes to UTF-8; skip that scan.
    where = f"events[{index}]"
    if not isinstance(obj, dict):
        raise _wrong_type(where, "an event object", obj)
    name = obj.get("name")
    if name is None:
        raise InvalidEvent(f"{where}.name: required (a non-empty string)")
    if not isinstance(name, str):
        raise _wrong_type(f"{where}.name", "a string", name)
    if not name:
        raise InvalidEvent(f"{where}.name: must not be empty")
    if check_text:
        _check_utf8(name, f"{where}.name")
    if name[: len(RESERVED_PREFIX)].lower() == RESERVED_PREFIX:
        raise InvalidEvent(
            f"{where}.name: {_show(name)} is reserved: names starting with "
            f'"{RESERVED_PREFIX}" (any case) are for internal events'
        )
    data = obj.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise _wrong_type(f"{where}.data", "an object", data)
    event_id = obj.get("id")
    if event_id is not None:
        if not isinstance(event_id, str):
            raise _wrong_type(f"{where}.id", "a string", event_id)
        if check_text:
            _check_utf8(event_id, f"{where}.id")
    ts = _validate_ts(obj.get("ts"), f"{where}.ts")
    meta = obj.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise _wrong_type(f"{where}.meta", "an object", meta)
    raw_sessions = obj.get("sessions")
    sessions = None
    if not meta and not check_text and type(raw_sessions) is dict:
        sessions = _plain_sessions(raw_sessions)
    if sessions is None:  # not the common shape (or a rule is broken): the full rules
        sessions = normalize_sessions(
            raw_sessions, meta.get("sessions"), meta.get("propagated_sessions"), where)
    rest = {k: v for k, v in meta.items() if k not in ("sessions", "propagated_sessions")} \
        if meta else None
    v, user = obj.get("v"), obj.get("user")
    if check_text:
        for field, value in (("data", data), ("v", v), ("user", user), ("meta", rest)):
            _check_json_value(value, f"{where}.{field}")
    return IncomingEvent(name, data, event_id or None, ts, v, user, rest or None, sessions)


def _plain_sessions(sessions: dict[Any, Any]) -> dict[str, str] | None:
    """The common case of `normalize_sessions`, fast: only top-level sessions, every value a
    string within the limits, out of text known to encode (no surrogate escapes). None when
    anything else is there: the full rules then apply, and explain any problem."""
    if len(sessions) > MAX_SESSIONS:
        return None
    for key, value in sessions.items():
        if (type(value) is not str or not 0 < len(value) <= MAX_VALUE_CHARS
                or not 0 < len(key) <= MAX_IDENTIFIER_CHARS):
            return None
    return sessions


def _validate_ts(ts: object, where: str) -> int | None:
    if ts is None:
        return None
    if isinstance(ts, float) and ts.is_integer():
        ts = int(ts)
    if not isinstance(ts, int) or isinstance(ts, bool):
        shown = repr(ts) if isinstance(ts, float) else _type(ts)
        raise InvalidEvent(
            f"{where}: must be an integer (milliseconds since the epoch), got {shown}"
        )
    if not TS_MIN_MS <= ts < TS_MAX_MS:
        hint = " (seconds? ts is in milliseconds)" if TS_MIN_MS <= ts * 1000 < TS_MAX_MS else ""
        raise InvalidEvent(
            f"{where}: {ts} is out of range{hint}; it must be milliseconds since the epoch in "
            f"[{TS_MIN_MS}, {TS_MAX_MS}), i.e. from 1980-01-01 up to 2100-01-01 UTC"
        )
    return ts


def normalize_sessions(
    sessions: object, meta_sessions: object, propagated: object, where: str
) -> dict[str, str]:
    """Merge and normalise an event's three session sources; `where` is its prefix (`events[2]`).

    Applied in order: `meta.propagated_sessions`; `meta.sessions`, where a null value is a
    tombstone removing a propagated key; the top-level `sessions`. One identifier with different
    values in `sessions` and `meta.sessions` is an error. Returns identifier -> value string in
    insertion order, at most `MAX_SESSIONS` entries.
    """
    merged: dict[str, str] = {}
    from_meta: dict[str, str] = {}
    sources = (
        ("meta.propagated_sessions", propagated),
        ("meta.sessions", meta_sessions),
        ("sessions", sessions),
    )
    field, key = "", None  # what an error names; labels are built only on failure
    try:
        for field, source in sources:
            key = None
            if source is None:
                continue
            if not isinstance(source, dict):
                raise _Problem(f"must be an object, got {_type(source)}")
            for key, value in source.items():
                _check_identifier(key)
                if value is None and field == "meta.sessions":
                    merged.pop(key, None)  # an Inngest tombstone
                    continue
                text = _stringify(value)
                if field == "meta.sessions":
                    from_meta[key] = text
                elif from_meta.get(key, text) != text:
                    raise _Problem(
                        f"conflicts with meta.sessions[{_show(key)}]: {_show(text)} vs "
                        f"{_show(from_meta[key])}; an identifier may have one value only"
                    )
                merged[key] = text
    except _Problem as problem:
        label = "" if key is None else f"[{_show(key) if isinstance(key, str) else repr(key)}]"
        raise InvalidEvent(f"{where}.{field}{label}: {problem}") from None
    if len(merged) > MAX_SESSIONS:
        raise InvalidEvent(
            f"{where}.sessions: {len(merged)} sessions after merging sessions, meta.sessions and "
            f"meta.propagated_sessions; at most {MAX_SESSIONS} are allowed"
        )
    return merged


class _Problem(Exception):
    """A session rule broken; the caller adds where (built lazily: the common path is cheap)."""


def _check_identifier(key: object) -> None:
    if not isinstance(key, str):
        raise _Problem("identifier must be a string")
    if not key:
        raise _Problem("identifier must not be empty")
    if len(key) > MAX_IDENTIFIER_CHARS:
        raise _Problem(
            f"identifier is {len(key)} characters; at most {MAX_IDENTIFIER_CHARS} are allowed"
        )
    if not _encodes(key):
        raise _Problem("identifier " + _SURROGATE)


def session_value_string(value: object, where: str) -> str:
    """The stored string for a session value (bool/int/float/str); raises InvalidEvent otherwise.

    Booleans become "true"/"false", numbers JavaScript's `String(n)`; strings are kept exactly.
    The result must be 1 to `MAX_VALUE_CHARS` characters. `where` names the value in messages.
    """
    try:
        return _stringify(value)
    except _Problem as problem:
        raise InvalidEvent(f"{where}: {problem}") from None


def _stringify(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif type(value) is int and -(2**53) < value < 2**53:  # exact as a double: the common case
        text = str(value)
    elif isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise _Problem("number is too large to represent") from None
        text = js_number_string(number)
        if not math.isfinite(number):
            raise _Problem(f"{text} is not a finite number")
    elif isinstance(value, str):
        text = value
    elif value is None:
        raise _Problem(
            "value is null; use a string, number or boolean "
            "(null is only allowed in meta.sessions, to remove a propagated session)"
        )
    else:
        raise _Problem(f"value must be a string, number or boolean, got {_type(value)}")
    if not text:
        raise _Problem("value must not be empty")
    if len(text) > MAX_VALUE_CHARS:
        raise _Problem(f"value is {len(text)} characters; at most {MAX_VALUE_CHARS} are allowed")
    if not _encodes(text):
        raise _Problem("value " + _SURROGATE)
    return text


def js_number_string(x: float) -> str:
    """JavaScript `String(n)` (ECMAScript Number::toString) for the double value of `x`.

    Ints are converted to float first, as JavaScript does (OverflowError if out of range).
    """
    f = float(x)
    if math.isnan(f) or math.isinf(f):
        return "NaN" if math.isnan(f) else ("Infinity" if f > 0 else "-Infinity")
    if f == 0:
        return "0"
    # repr gives the shortest round-tripping digits, as ECMAScript requires; reformat them as
    # value = 0.<s> * 10**n with k = len(s) significant digits.
    mantissa, _, exp = repr(abs(f)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    n = len(whole) + int(exp or 0) - (len(whole + frac) - len(digits))
    s = digits.rstrip("0")
    k = len(s)
    if k <= n <= 21:
        out = s + "0" * (n - k)
    elif 0 < n <= 21:
        out = s[:n] + "." + s[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * -n + s
    else:
        out = (s if k == 1 else s[0] + "." + s[1:]) + ("e+" if n >= 1 else "e-") + str(abs(n - 1))
    return ("-" if f < 0 else "") + out


def _type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _wrong_type(where: str, wanted: str, value: object) -> InvalidEvent:
    return InvalidEvent(f"{where}: must be {wanted}, got {_type(value)}")


def _show(text: str, limit: int = 64) -> str:
    """A string quoted for an error message: shortened, and safe to encode as UTF-8."""
    if len(text) > limit:
        text = text[:limit] + "…"
    quoted = json.dumps(text, ensure_ascii=False)
    return quoted if _encodes(quoted) else json.dumps(text)


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_utf8(text: str, where: str, label: str = "") -> None:
    if not _encodes(text):
        raise InvalidEvent(f"{where}: {label}{_SURROGATE}")


def _check_json_value(value: object, where: str) -> None:
    """Reject a value that is not plain JSON or holds a string UTF-8 cannot encode."""
    try:
        encoded = json.dumps(value, separators=_COMPACT, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidEvent(f"{where}: not a plain JSON value ({e})") from None
    if _encodes(encoded):
        return
    stack: list[tuple[object, str]] = [(value, where)]  # failure path: find the string to name
    while stack:
        item, path = stack.pop()
        if isinstance(item, str) and not _encodes(item):
            raise InvalidEvent(f"{path}: string {_SURROGATE}")
        if isinstance(item, dict):
            for key, child in item.items():
                shown = _show(key) if isinstance(key, str) else repr(key)
                _check_utf8(str(key), path, f"key {shown} ")
                stack.append((child, f"{path}[{shown}]"))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    raise InvalidEvent(f"{where}: {_SURROGATE}")  # not reached: the walk finds the string
