"""Stored events as fixture lines: what the session page's download and `export` write.

Only the events users sent are kept: events produced by runs (`send_event`, `invoke`, lifecycle
events) and by cron are left out, because replaying the fixture runs the functions again and
they produce those events anew. So an export replayed into an empty database gives each session
the same figures.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from devserver.model.events import RESERVED_PREFIX
from devserver.model.records import StoredEvent

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def to_jsonl(events: list[dict[str, Any]]) -> str:
    """Events as a `.jsonl` fixture: one compact JSON object per line."""
    return "".join(_ENCODER.encode(ev) + "\n" for ev in events)


def fixture_event(ev: StoredEvent) -> dict[str, Any]:
    """A stored event as one fixture line: exactly what `POST /e/{key}` accepts."""
    line = {"name": ev.name, "data": ev.data, "id": ev.event_id, "ts": ev.ts, "v": ev.v,
            "user": ev.user, "meta": ev.meta or None, "sessions": ev.sessions or None}
    return {key: value for key, value in line.items() if value is not None}


def sent_by_user(ev: StoredEvent) -> bool:
    """Whether an event came in through the event API (not from a run, cron or devserver)."""
    return ev.source is None and not ev.name.lower().startswith(RESERVED_PREFIX)


def export_events(events: Iterable[StoredEvent]) -> list[dict[str, Any]]:
    """A session's events as fixture lines, in the order given: only those users sent.

    Run-produced events (`send_event`, lifecycle events) and cron's are left out: replaying the
    fixture runs the functions again, and they produce those events anew.
    """
    return [fixture_event(ev) for ev in events if sent_by_user(ev)]
