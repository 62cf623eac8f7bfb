"""The Jinja2 environment that renders the top-level `templates/` folder, and its filters: times
(absolute, clock, "ago", ISO), durations, percentages, pretty JSON, status classes.

The formatters are pure functions (the tests call them; `format_percent` is the CLI's too);
the environment is built once per process and autoescapes everything. (Not `web.filters`:
those are the lists' query filters.)
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

from devserver.clock import iso
from devserver.errors import ConfigError
from devserver.model.records import FINISHED, UNFINISHED, WAITING
from devserver.model.records import format_percent as format_percent  # the CLI's too

STRICT_ENV_VAR = "DEVSERVER_STRICT_TEMPLATES"
"""Set to 1 to render templates with `jinja2.StrictUndefined` (the tests do)."""
STATUS_CLASSES = {s: f"status-{s.lower()}" for s in (*UNFINISHED, *FINISHED, WAITING)}


# ---------------------------------------------------------------------------------------------
# Formatting (pure; used as Jinja filters)


def to_ms(stamp: str | int | None) -> int | None:
    """Milliseconds since the epoch from a `clock.iso` string (or ms already), or None."""
    if stamp is None or isinstance(stamp, int):
        return stamp
    return round(dt.datetime.fromisoformat(stamp).timestamp() * 1000)


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def format_absolute(stamp: str | int | None) -> str:
    """`2025-01-02 14:03:12.345 UTC`, or an em dash."""
    ms = to_ms(stamp)
    return "—" if ms is None else _utc(ms).strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d} UTC"


def format_clock(stamp: str | int | None, now_ms: int) -> str:
    """A short absolute time (UTC): `14:03:12` today, `Jan 02 14:03` on other days."""
    ms = to_ms(stamp)
    if ms is None:
        return "—"
    same_day = _utc(ms).date() == _utc(now_ms).date()
    return _utc(ms).strftime("%H:%M:%S" if same_day else "%b %d %H:%M")


def format_ago(stamp: str | int | None, now_ms: int) -> str:
    """`just now`, `12 s ago`, `5 min ago`, `3 h ago`, `2 d ago`, or the date when older."""
    ms = to_ms(stamp)
    if ms is None:
        return "never"
    seconds = (now_ms - ms) // 1000
    for limit, unit, size in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600),
                              (30 * 86400, "d", 86400)):
        if seconds < limit:
            return "just now" if seconds < 1 else f"{seconds // size} {unit} ago"
    return _utc(ms).strftime("%Y-%m-%d")


def format_duration(ms: int | None) -> str:
    """`850 ms`, `1.25 s`, `2 min 05 s`, `1 h 02 min`, `3 d 4 h`; an em dash for None."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f}".rstrip("0").rstrip(".") + " s"
    minutes, seconds = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def pretty_json(value: Any) -> str:
    """JSON indented for reading, non-ASCII kept (escaping is the template's job).

    Indenting recurses in Python; a value nested deeper than that allows (user code can
    return one) is shown compact, or as a note, rather than failing the page.
    """
    try:
        return json.dumps(value, indent=2, ensure_ascii=False)
    except RecursionError:
        try:
            return json.dumps(value, ensure_ascii=False)
        except RecursionError:
            return "(nested too deeply to show)"


def iso_stamp(stamp: str | int | None) -> str | None:
    """A `clock.iso` string from milliseconds (strings pass through): for `<time datetime>`."""
    return iso(stamp) if isinstance(stamp, int) else stamp


def status_class(status: str) -> str:
    """The CSS class of a run or step status."""
    return STATUS_CLASSES.get(status, "status-unknown")


@jinja2.pass_context
def _ago_filter(context: jinja2.runtime.Context, stamp: str | int | None) -> str:
    return format_ago(stamp, context["now_ms"])


@jinja2.pass_context
def _clock_filter(context: jinja2.runtime.Context, stamp: str | int | None) -> str:
    return format_clock(stamp, context["now_ms"])


# ---------------------------------------------------------------------------------------------
# The environment


def templates_dir() -> Path:
    """The templates: inside the installed package, else the checkout's top-level folder."""
    package = Path(__file__).resolve().parent.parent
    candidates = (package / "templates", package.parent / "templates")
    for candidate in candidates:
        if (candidate / "base.html").is_file():
            return candidate
    raise ConfigError(
        f"devserver's templates are missing (looked in {' and '.join(map(str, candidates))}); "
        "reinstall devserver")


@functools.cache
def make_environment(directory: Path, *, strict: bool = False) -> jinja2.Environment:
    """The Jinja2 environment: autoescaped, with the dashboard's filters.

    Shared by every app in the process, so templates compile once, not once per test server.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory), autoescape=True, trim_blocks=True,
        lstrip_blocks=True, undefined=jinja2.StrictUndefined if strict else jinja2.Undefined)
    env.filters.update(
        absolute=format_absolute, ago=_ago_filter, clock=_clock_filter,
        duration=format_duration, iso=iso_stamp, percent=format_percent, pretty=pretty_json,
        pathpart=lambda text: quote(str(text), safe=""),
        status_class=status_class,
    )
    return env
