"""The dashboard's list and detail reads (SPEC 5): every run and every event of an environment
with filters and keyset pages, per-function figures, the links between runs (the run that sent
a run's event, reruns, the runs a run started), a session's timeline, failure figures per
identifier and per session, and the write that reruns a run.

Like `queries`, plain functions of a `sqlite3.Connection`; every value reaches SQLite as a `?`
parameter, and the f-strings interpolate only fixed fragments and column names checked against
a whitelist. Pages are keyset pages (`?` bounds on indexed columns), never OFFSET.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from devserver.errors import UserError
from devserver.model.records import FAILED, QUEUED, Page, RunRecord, StoredEvent
from devserver.store import session_counts
from devserver.store.queries import (
    _functions_of,
    _session_stats,
    decode_cursor,
    encode_cursor,
    event_from_row,
    run_from_row,
)
from devserver.store.session_index import (
    merge_runs,
    run_pairs,
    run_sources,
    session_events,
    unindexed_runs,
)

_ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
"""A run or event id (a ULID, as devserver makes them)."""
SESSION_SORTS = ("last_active", "runs", "failed_runs", "failure_rate", "value")
MAX_TIMELINE_RUNS = 500
"""The most runs a session's timeline draws (the newest; the page says when there are more)."""
MAX_LOG_LINES = 500
"""The most `ctx.logger` lines kept per run (later lines are counted, not stored)."""
MAX_LOG_CHARS = 4000
"""The longest log line kept (longer ones are cut, saying so)."""


@dataclass(frozen=True, slots=True)
class Window:
    """A time range in ms since the epoch (either end may be open) and what it applies to."""

    start: int | None = None
    end: int | None = None


ALL_TIME = Window()


@dataclass(frozen=True, slots=True)
class FunctionFigures:
    """A function's recent runs and its failures among its latest `window` finished runs."""

    function_id: str
    runs: int
    finished: int
    failed: int
    recent: list[RunRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RunLinks:
    """How a run is linked to others."""

    parent_run_id: str | None
    """The run that sent (or invoked) this run's trigger event."""
    source: str | None
    """The trigger event's source: a run id, "cron", or None (sent from outside)."""
    rerun_of: str | None
    reruns: list[str]
    children: list[tuple[str, str, str, str]]
    """(run id, function id, status, event name) of the runs this run's events started."""


@dataclass(frozen=True, slots=True)
class TimelineStep:
    """One step attempt as the timeline draws it."""

    run_id: str
    step_id: str | None
    kind: str
    status: str
    attempt: int
    started_at: int
    ended_at: int
    wait_until: int | None


@dataclass(frozen=True, slots=True)
class Timeline:
    """A session's runs (oldest first), their steps, and the session's events."""

    runs: list[RunRecord]
    steps: list[TimelineStep]
    events: list[StoredEvent]
    more: bool
    """True when the session has more runs than the timeline draws."""


@dataclass(frozen=True, slots=True)
class IdentifierFigures:
    """An identifier's failure figures, summed over its sessions."""

    identifier: str
    runs: int
    failed_runs: int
    failing_sessions: int


@dataclass(frozen=True, slots=True)
class LogLine:
    """One `ctx.logger` line of a run."""

    at: int
    level: str
    message: str


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _window(where: list[str], params: list[Any], column: str, window: Window) -> None:
    """Add a time range on `column` (a fixed column name of the caller's)."""
    if window.start is not None:
        where.append(f"{column} >= ?")
        params.append(window.start)
    if window.end is not None:
        where.append(f"{column} < ?")
        params.append(window.end)


# ---------------------------------------------------------------------------------------------
# Runs and events


def read_runs_page(
    db: sqlite3.Connection, env: str, *, status: str | None, function_id: str | None,
    q: str | None, window: Window, limit: int, cursor: str | None,
) -> Page:
    """Runs of `env`, newest first; `q` finds a run id, a trigger event id or an event name
    (exact, or a part of it). Without a function, `+env` keeps SQLite walking the primary key
    newest first (an O(page) read) instead of sorting every run of the environment found
    through the by-function index."""
    where, params = ["env = ?" if function_id is not None else "+env = ?"], [env]
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if function_id is not None:
        where.append("function_id = ?")
        params.append(function_id)
    if q and _ULID.match(q):  # an id: two index lookups, no scan
        where.append("run_id IN (SELECT ? UNION ALL SELECT run_id FROM runs WHERE event_id = ?)")
        params.extend([q, q])
    elif q:
        where.append("event_name LIKE ? ESCAPE '\\'")
        params.append(f"%{_escape_like(q)}%")
    _window(where, params, "queued_at", window)
    if cursor is not None:
        where.append("run_id < ?")
        params.extend(decode_cursor(cursor, 1))
    rows = [run_from_row(r) for r in db.execute(
        f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY run_id DESC LIMIT ?",
        (*params, limit + 1))]
    more = len(rows) > limit
    return Page(rows=rows[:limit],
                next_cursor=encode_cursor([rows[limit - 1].run_id]) if more else None)


def read_events_page(
    db: sqlite3.Connection, env: str, *, q: str | None, window: Window, limit: int,
    cursor: str | None,
) -> Page:
    """Events of `env`, newest first; `q` finds an event id, an idempotency id or a name
    (`+env`: walk the primary key newest first, as for runs)."""
    where, params = ["+env = ?"], [env]
    if q and _ULID.match(q):  # an internal id: one lookup
        where.append("internal_id = ?")
        params.append(q)
    elif q:
        where.append("(event_id = ? OR name LIKE ? ESCAPE '\\')")
        params.extend([q, f"%{_escape_like(q)}%"])
    _window(where, params, "received_at", window)
    if cursor is not None:
        where.append("internal_id < ?")
        params.extend(decode_cursor(cursor, 1))
    rows = [event_from_row(r) for r in db.execute(
        f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY internal_id DESC LIMIT ?",
        (*params, limit + 1))]
    more = len(rows) > limit
    return Page(rows=rows[:limit],
                next_cursor=encode_cursor([rows[limit - 1].internal_id]) if more else None)


def read_runs_of_events(db: sqlite3.Connection, event_ids: list[str]) -> dict[str, list[RunRecord]]:
    """The runs each event started, oldest first (a batched run counts for each of its
    events, as in `queries.read_event_runs`)."""
    found: dict[str, list[RunRecord]] = {ev: [] for ev in event_ids}
    for start in range(0, len(event_ids), 250):  # two parameters an id, well under the limit
        chunk = event_ids[start:start + 250]
        marks = ", ".join("?" * len(chunk))
        for row in db.execute(
                f"SELECT r.event_id AS of_event, r.* FROM runs r WHERE r.event_id IN ({marks}) "
                "UNION SELECT re.internal_id, r.* FROM run_events re JOIN runs r "
                f"ON r.run_id = re.run_id WHERE re.internal_id IN ({marks}) ORDER BY run_id",
                (*chunk, *chunk)):
            found[row["of_event"]].append(run_from_row(row))
    return found


def read_function_figures(
    db: sqlite3.Connection, env: str, function_ids: list[str], recent: int, window: int,
) -> dict[str, FunctionFigures]:
    """Each function's `recent` latest runs and its failures among its `window` latest runs
    (an index on (env, function_id, run_id) keeps it a bounded range read)."""
    figures: dict[str, FunctionFigures] = {}
    for fid in function_ids:
        rows = db.execute(
            "SELECT * FROM runs WHERE env = ? AND function_id = ? ORDER BY run_id DESC LIMIT ?",
            (env, fid, window)).fetchall()
        finished = [r for r in rows if r["ended_at"] is not None]
        figures[fid] = FunctionFigures(
            function_id=fid, runs=len(rows), finished=len(finished),
            failed=sum(r["status"] == FAILED for r in finished),
            recent=[run_from_row(r) for r in rows[:recent]])
    return figures


def read_run_links(db: sqlite3.Connection, run: RunRecord, limit: int) -> RunLinks:
    """The run that started `run`, its reruns, and the runs it started."""
    source_row = db.execute("SELECT source FROM events WHERE internal_id = ?",
                            (run.event_id,)).fetchone()
    source = None if source_row is None else source_row[0]
    parent = None
    if source is not None and db.execute("SELECT 1 FROM runs WHERE run_id = ?",
                                         (source,)).fetchone() is not None:
        parent = source
    rerun_row = db.execute("SELECT rerun_of FROM runs WHERE run_id = ?",
                           (run.run_id,)).fetchone()
    reruns = [r[0] for r in db.execute(
        "SELECT run_id FROM runs WHERE rerun_of = ? ORDER BY run_id LIMIT ?",
        (run.run_id, limit))]
    children = [(r[0], r[1], r[2], r[3]) for r in db.execute(
        "SELECT r.run_id, r.function_id, r.status, r.event_name FROM events e "
        "JOIN runs r ON r.event_id = e.internal_id WHERE e.source = ? ORDER BY r.run_id "
        "LIMIT ?", (run.run_id, limit))]
    return RunLinks(parent_run_id=parent, source=source,
                    rerun_of=None if rerun_row is None else rerun_row[0], reruns=reruns,
                    children=children)


def rerun(db: sqlite3.Connection, run_id: str, new_run_id: str, now: int) -> RunRecord | None:
    """A new Queued run of the same function on the same trigger event, linked to `run_id`
    (`rerun_of`); it counts toward the same sessions. None when `run_id` is unknown."""
    row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        return None
    db.execute(
        "INSERT INTO runs (run_id, env, function_id, event_id, event_name, status, queued_at, "
        "next_at, sessions, tree, rerun_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (new_run_id, row["env"], row["function_id"], row["event_id"], row["event_name"],
         QUEUED, now, now, row["sessions"], row["tree"], run_id))
    sessions = [(row["env"], identifier, value)
                for identifier, value in sorted(run_pairs(db, [run_id])[run_id])]
    db.executemany("INSERT INTO run_sessions (env, identifier, value, run_id) "
                   "VALUES (?, ?, ?, ?)", ((*key, new_run_id) for key in sessions))
    # Queued is no activity yet (SPEC 2.3): the rerun's start and end will be.
    # One more run for each of its sessions (and so for its identifier's sum, once per
    # session), summed by the next pass.
    session_counts.add(db, ((*key, None, 0, 1, 0) for key in sessions))
    db.executemany("INSERT OR IGNORE INTO session_functions (env, identifier, value, "
                   "function_id) VALUES (?, ?, ?, ?)",
                   ((*key, row["function_id"]) for key in sessions))
    if row["tree"] is not None:
        db.execute("UPDATE run_trees SET runs = runs + 1 WHERE root = ?", (row["tree"],))
    return next(map(run_from_row, db.execute("SELECT * FROM runs WHERE run_id = ?",
                                             (new_run_id,))))


# ---------------------------------------------------------------------------------------------
# Sessions


def read_identifier_figures(
    db: sqlite3.Connection, env: str, identifiers: list[str],
) -> dict[str, IdentifierFigures]:
    """Runs and failed runs of each identifier (counters), and its failing sessions (a range
    of the by-failed-runs index: as many as fail, not as many as there are)."""
    found = {}
    for ident in identifiers:
        row = db.execute(
            "SELECT runs, failed_runs, (SELECT count(*) FROM sessions s WHERE s.env = i.env "
            "AND s.identifier = i.identifier AND s.failed_runs > 0) FROM identifiers i "
            "WHERE env = ? AND identifier = ?", (env, ident)).fetchone()
        found[ident] = IdentifierFigures(ident, *(row or (0, 0, 0)))
    return found


def read_sessions_page(
    db: sqlite3.Connection, env: str, ident: str, *, q: str | None, sort: str, failing: bool,
    window: Window, limit: int, cursor: str | None,
) -> Page:
    """A page of an identifier's sessions (rows are `SessionStats`): `failing` keeps those
    with a failed run, `window` those active in the range (by last activity)."""
    if sort not in SESSION_SORTS:
        raise UserError(f"sort must be one of {', '.join(SESSION_SORTS)}, got {sort!r}")
    # `sort` is checked against SESSION_SORTS just above: a column name.
    where = ["env = ?", "identifier = ?"]
    params: list[Any] = [env, ident]
    if q:
        where.append("value LIKE ? ESCAPE '\\'")
        params.append(f"%{_escape_like(q)}%")
    if failing:
        where.append("failed_runs > 0")
    _window(where, params, "last_active", window)
    if sort == "value":
        order, key_cols = "value ASC", ["value"]
        if cursor is not None:
            where.append("value > ?")
            params.extend(decode_cursor(cursor, 1))
    else:
        order, key_cols = f"{sort} DESC, value DESC", [sort, "value"]
        if cursor is not None:
            where.append(f"({sort}, value) < (?, ?)")
            params.extend(decode_cursor(cursor, 2))
    rows = db.execute(
        "SELECT identifier, value, runs, failed_runs, last_active, failure_rate "
        f"FROM sessions WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?",
        (*params, limit + 1)).fetchall()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor([rows[limit - 1][c] for c in key_cols])
    stats = [_session_stats(r, _functions_of(db, env, ident, r["value"])) for r in rows[:limit]]
    return Page(rows=stats, next_cursor=next_cursor)


def read_latest_errors(
    db: sqlite3.Connection, env: str, ident: str, values: list[str],
) -> dict[str, RunRecord]:
    """The latest failed run of each session that has one (two statements for a page)."""
    if not values:
        return {}
    marks = ", ".join("?" * len(values))  # placeholders only; the values are parameters
    latest = dict(db.execute(
        "SELECT rs.value, max(rs.run_id) FROM run_sessions rs JOIN runs r ON "
        f"r.run_id = rs.run_id WHERE rs.env = ? AND rs.identifier = ? AND rs.value IN ({marks}) "
        "AND r.status = ? GROUP BY rs.value", (env, ident, *values, FAILED)).fetchall())
    # The runs after the last session-index pass, by their JSON (`session_index`).
    wanted = set(values)
    for run_id, sessions in unindexed_runs(db, env, FAILED):
        value = sessions.get(ident)
        if value in wanted:
            latest[value] = max(latest.get(value, run_id), run_id)
    if not latest:
        return {}
    run_marks = ", ".join("?" * len(latest))
    runs = {r["run_id"]: run_from_row(r) for r in db.execute(
        f"SELECT * FROM runs WHERE run_id IN ({run_marks})", list(latest.values()))}
    return {value: runs[run_id] for value, run_id in latest.items() if run_id in runs}


def read_session_runs(
    db: sqlite3.Connection, env: str, ident: str, value: str, *, status: str | None,
    window: Window, limit: int, cursor: str | None,
) -> Page:
    """A page of a session's runs, newest first, of one status and time range (queued)."""
    where = ["1"]
    params: list[Any] = []
    if status is not None:
        where.append("r.status = ?")
        params.append(status)
    _window(where, params, "r.queued_at", window)
    if cursor is not None:
        where.append("rs.run_id < ?")
        params.extend(decode_cursor(cursor, 1))
    runs = [run_from_row(r) for r in merge_runs([db.execute(
        f"SELECT r.* FROM {members} rs JOIN runs r ON r.run_id = rs.run_id "
        f"WHERE {' AND '.join(where)} ORDER BY rs.run_id DESC LIMIT ?",
        (*keys, *params, limit + 1)).fetchall()
        for members, keys in run_sources(db, env, ident, value)],
        newest_first=True, limit=limit + 1)]
    more = len(runs) > limit
    return Page(rows=runs[:limit],
                next_cursor=encode_cursor([runs[limit - 1].run_id]) if more else None)


def read_session_failed_run_ids(
    db: sqlite3.Connection, env: str, ident: str, value: str, limit: int,
) -> list[str]:
    """The session's failed runs (oldest first) that were not rerun yet."""
    return [r[0] for r in merge_runs([db.execute(
        f"SELECT r.run_id FROM {members} rs JOIN runs r ON r.run_id = rs.run_id "
        "WHERE r.status = ? AND NOT EXISTS (SELECT 1 FROM runs o WHERE o.rerun_of = r.run_id) "
        "ORDER BY rs.run_id LIMIT ?", (*keys, FAILED, limit)).fetchall()
        for members, keys in run_sources(db, env, ident, value)],
        newest_first=False, limit=limit)]


def read_timeline(
    db: sqlite3.Connection, env: str, ident: str, value: str, limit: int = MAX_TIMELINE_RUNS,
) -> Timeline:
    """The newest `limit` runs of a session (returned oldest first) with every step attempt
    and the session's events received in their span."""
    rows = merge_runs([db.execute(
        f"SELECT r.* FROM {members} rs JOIN runs r ON r.run_id = rs.run_id "
        "ORDER BY rs.run_id DESC LIMIT ?", (*keys, limit + 1)).fetchall()
        for members, keys in run_sources(db, env, ident, value)],
        newest_first=True, limit=limit + 1)
    more = len(rows) > limit
    runs = [run_from_row(r) for r in reversed(rows[:limit])]
    steps: list[TimelineStep] = []
    for start in range(0, len(runs), 500):
        chunk = [r.run_id for r in runs[start:start + 500]]
        marks = ", ".join("?" * len(chunk))
        steps.extend(TimelineStep(*r) for r in db.execute(
            "SELECT run_id, step_id, kind, status, attempt, started_at, ended_at, wait_until "
            f"FROM steps WHERE run_id IN ({marks}) ORDER BY run_id, seq", chunk))
    first = runs[0].queued_at if runs else 0
    events = [event_from_row(r) for r in session_events(
        db, env, ident, value, received_since=first, limit=4 * limit)]
    return Timeline(runs=runs, steps=steps, events=events, more=more)


# ---------------------------------------------------------------------------------------------
# Run logs


def add_log_lines(db: sqlite3.Connection, lines: list[tuple[str, int, str, str]]) -> None:
    """Store `ctx.logger` lines (run id, at, level, message), at most MAX_LOG_LINES a run."""
    for run_id, at, level, message in lines:
        if len(message) > MAX_LOG_CHARS:
            message = message[:MAX_LOG_CHARS] + f" … ({len(message) - MAX_LOG_CHARS} more chars)"
        db.execute(
            "INSERT INTO run_logs (run_id, seq, at, level, message) SELECT ?, n + 1, ?, ?, ? "
            "FROM (SELECT count(*) AS n FROM run_logs WHERE run_id = ?) WHERE n < ?",
            (run_id, at, level, message, run_id, MAX_LOG_LINES))


def read_log_lines(db: sqlite3.Connection, run_id: str) -> list[LogLine]:
    """A run's stored log lines, in order."""
    return [LogLine(r[0], r[1], r[2]) for r in db.execute(
        "SELECT at, level, message FROM run_logs WHERE run_id = ? ORDER BY seq", (run_id,))]
