"""Fixture files in: reading them, and grouping their events for sending.

A fixture is `.jsonl` (one event per line) or `.json` (an event or an array), every event exactly
what `POST /e/` accepts. Files are read and validated as a whole before anything is sent: a bad
line is reported as `file:line: what` and nothing is sent, as with the event API's atomic
validation. The events then go in `batches` (the event API's request size), or in
`timed_groups` that keep the gaps between their `ts` values for `timing="original"`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from devserver.errors import UserError
from devserver.model.events import (
    MAX_EVENT_BYTES,
    MAX_EVENTS_PER_REQUEST,
    loads,
    validate_event,
)

STDIN = "-"
"""The file name that reads JSON Lines from standard input."""
BATCH_EVENTS = 500
"""Events per request (the event API takes up to 5000)."""
TIMINGS = ("fast", "original")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of one fixture file, validated; `UserError` says which file and line is bad.

    `-` reads JSON Lines from standard input.
    """
    if str(path) == STDIN:
        return parse_events(sys.stdin.buffer.read(), "<stdin>", array=False)
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_events(text, str(path), array=path.suffix.lower() == ".json")


def parse_events(text: bytes, name: str, *, array: bool) -> list[dict[str, Any]]:
    """Events from fixture text: a JSON event or array (`array`), else one event per line."""
    # Re-encoding never makes an event more than 4x longer, so small files need no measuring.
    measure = len(text) > MAX_EVENT_BYTES // 4
    if array:
        try:
            doc = loads(text)
        except UserError as exc:
            raise UserError(f"{name}: {_not_json(exc.message, one_line=False)}") from None
        events = doc if isinstance(doc, list) else [doc]
        for index, event in enumerate(events):
            _check(event, f"{name}: event {index}", measure)
        return events
    events = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(b"#"):  # blank lines and `#` comments
            continue
        where = f"{name}:{number}"
        try:
            event = loads(line)
        except UserError as exc:
            raise UserError(f"{where}: {_not_json(exc.message, one_line=True)}") from None
        _check(event, where, measure)
        events.append(event)
    return events


def _not_json(message: str, *, one_line: bool) -> str:
    """The event API's "request body is not valid JSON: ..." said of a fixture file, or of
    one of its lines (where "at line 1 column 9" is just "at column 9")."""
    message = re.sub(r"^request body is not valid JSON", "not valid JSON", message)
    return re.sub(r" at line 1 column (\d+)", r" at column \1", message) if one_line else message


def _check(event: Any, where: str, measure: bool) -> None:
    try:
        validate_event(event, 0)
    except UserError as exc:
        raise UserError(f"{where}: {exc.message.removeprefix('events[0].')}") from None
    if measure:
        size = len(dumps(event).encode())
        if size > MAX_EVENT_BYTES:
            raise UserError(f"{where}: event is {size} bytes as compact JSON; at most "
                            f"{MAX_EVENT_BYTES} bytes (3 MiB) are allowed")


def read_all(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every file's events in order, all validated before the caller sends any."""
    return [event for path in paths for event in read_events(path)]


def batches(events: list[dict[str, Any]], size: int = BATCH_EVENTS) -> list[list[dict[str, Any]]]:
    """Events in request-sized batches, in order."""
    size = max(1, min(size, MAX_EVENTS_PER_REQUEST))
    return [events[i:i + size] for i in range(0, len(events), size)]


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def timed_groups(
    events: list[dict[str, Any]], timing: str,
) -> list[tuple[int, list[dict[str, Any]]]]:
    """Events as (milliseconds to wait first, events to send together), in order.

    `fast` sends everything at once. `original` keeps the gaps between `ts` values: an event
    without `ts`, or with one earlier than the event before it, follows with no gap.
    """
    if timing not in TIMINGS:
        raise UserError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    if timing == "fast" or not events:
        return [(0, list(events))] if events else []
    groups: list[tuple[int, list[dict[str, Any]]]] = []
    now: int | None = None
    for event in events:
        ts, gap = _ts(event), 0
        if ts is not None:
            gap = 0 if now is None else max(0, ts - now)
            now = ts if now is None else max(now, ts)
        if groups and gap == 0:
            groups[-1][1].append(event)
        else:
            groups.append((gap, [event]))
    return groups


def _ts(event: dict[str, Any]) -> int | None:
    ts = event.get("ts")
    return int(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None


def first_ts(events: list[dict[str, Any]]) -> int | None:
    """The first `ts` among the events, where `timing="original"` starts the clock."""
    return next((ts for ts in map(_ts, events) if ts is not None), None)


def span_ms(events: list[dict[str, Any]]) -> int:
    """Milliseconds from the first `ts` to the last (0 without any)."""
    stamps = [ts for ts in map(_ts, events) if ts is not None]
    return max(stamps) - min(stamps) if stamps else 0


def human_ms(ms: int) -> str:
    """A duration such as `2h 13m`, `4m 05s`, `1.5s`."""
    if ms < 60_000:
        return f"{ms / 1000:.3g}s"
    minutes, seconds = divmod(ms // 1000, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s"

