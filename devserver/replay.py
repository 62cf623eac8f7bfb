"""Fixture files: events recorded as `.jsonl` (one event per line) or `.json` (an event or an
array), read and validated as a whole before anything is sent.

Every event must be exactly what `POST /e/` accepts. A bad line is reported as `file:line: what`
and nothing from the file is sent, as with the event API's atomic validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .events import MAX_EVENTS_PER_REQUEST, loads, validate_event


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of one fixture file, validated; `UserError` says which file and line is bad."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            doc = loads(text)
        except UserError as exc:
            raise UserError(f"{path}: {exc.message}") from None
        events = doc if isinstance(doc, list) else [doc]
        for index, event in enumerate(events):
            _check(event, f"{path}: event {index}")
        return events
    events = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            event = loads(line)
        except UserError as exc:
            raise UserError(f"{where}: {exc.message}") from None
        _check(event, where)
        events.append(event)
    return events


def _check(event: Any, where: str) -> None:
    try:
        validate_event(event, 0)
    except UserError as exc:
        raise UserError(f"{where}: {exc.message.removeprefix('events[0].')}") from None


def batches(events: list[dict[str, Any]], size: int = 500) -> list[list[dict[str, Any]]]:
    """Events in request-sized batches, in order."""
    size = max(1, min(size, MAX_EVENTS_PER_REQUEST))
    return [events[i:i + size] for i in range(0, len(events), size)]


def to_jsonl(events: list[dict[str, Any]]) -> str:
    """Events as a `.jsonl` fixture: one compact JSON object per line."""
    return "".join(json.dumps(ev, ensure_ascii=False, separators=(",", ":")) + "\n"
                   for ev in events)
