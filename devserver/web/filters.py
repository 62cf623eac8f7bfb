"""The filters the dashboard's lists take as query parameters (SPEC 5): `status`, and a time
range as `last=1h` or `start`/`end`; and the one-line form of a stored error the lists show.
Plain functions of a request's query; a bad value is a `UserError` saying what and where.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from aiohttp import web

from devserver.clock import iso
from devserver.errors import UserError
from devserver.model.records import FINISHED, UNFINISHED
from devserver.store.listing import Window

STATUSES = (*UNFINISHED, *FINISHED)
LAST_UNITS = {"s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000,
              "w": 7 * 86_400_000}
LAST_CHOICES = ("15m", "1h", "24h", "7d", "30d")
"""The time ranges the pages offer (any `<n><unit>` is accepted)."""
_LAST = re.compile(r"^([0-9]{1,6})(s|m|min|h|d|w)$")




def status_param(request: web.Request) -> str | None:
    """`?status=`: a run status (any case), or None."""
    raw = request.query.get("status") or None
    if raw is None:
        return None
    for status in STATUSES:
        if raw.lower() == status.lower():
            return status
    raise UserError(f"status must be one of {', '.join(STATUSES)}, got {raw[:40]!r}")


MAX_STAMP_MS = 253_402_300_799_999
"""The last millisecond of year 9999: the latest time bound a filter takes."""


def _stamp(name: str, raw: str) -> int:
    """A time bound: ms since the epoch, or an ISO 8601 date or time (UTC unless it says)."""
    problem = UserError(f"{name} must be an ISO 8601 time (2025-01-15T10:00:00Z) or "
                        f"milliseconds since the epoch up to year 9999, got {raw[:40]!r}")
    if raw.isascii() and raw.isdigit():
        if len(raw) > 15 or int(raw) > MAX_STAMP_MS:
            raise problem
        return int(raw)
    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        ms = round(parsed.timestamp() * 1000)
    except (ValueError, OverflowError):
        raise problem from None
    if not 0 <= ms <= MAX_STAMP_MS:
        raise problem
    return ms


def window_param(request: web.Request, now: int) -> tuple[Window, dict[str, Any]]:
    """`?last=1h` (`s`, `m`, `h`, `d`, `w`), or `?start=` and/or `?end=`; and the filter as the
    documents echo it (`start`/`end` as ISO times)."""
    last = request.query.get("last") or None
    start_raw, end_raw = request.query.get("start") or None, request.query.get("end") or None
    if last is not None:
        if start_raw is not None or end_raw is not None:
            raise UserError("give either last= or start=/end=, not both")
        match = _LAST.match(last)
        if match is None:
            raise UserError(f"last must be a number and a unit (30s, 15m, 1h, 24h, 7d, 2w), "
                            f"got {last[:40]!r}")
        window = Window(start=max(0, now - int(match[1]) * LAST_UNITS[match[2]]))
    else:
        window = Window(start=None if start_raw is None else _stamp("start", start_raw),
                        end=None if end_raw is None else _stamp("end", end_raw))
        if window.start is not None and window.end is not None and window.start > window.end:
            raise UserError("start must not be after end")
    return window, {"last": last, "start": iso(window.start), "end": iso(window.end)}




def error_line(error: dict[str, Any] | None) -> str | None:
    """`Name: first line of the message`, or None without an error."""
    if not error:
        return None
    message = str(error.get("message") or "").strip().partition("\n")[0]
    name = str(error.get("name") or "Error")
    return f"{name}: {message}" if message else name
