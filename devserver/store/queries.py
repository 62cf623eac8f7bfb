"""The store's reads, as plain functions of a `sqlite3.Connection` run in the reader's thread
(one snapshot each), and the row-to-record mapping and page cursors every query module shares.
The writes are in `ingest` (events in), `steps` (a run's progress: attempts, waits,
restarts), `run_ends` (a run's end) and, for flow control and the dashboard, `flow_queries`
and `listing`.
Every value reaches SQLite as a `?` parameter; the few f-strings interpolate only column names
checked against a whitelist, placeholders and fixed fragments (tests/test_safety.py checks).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import sqlite3
from typing import Any

from devserver.errors import UserError
from devserver.jsontext import dump_json
from devserver.model.metadata import MetadataUpdate
from devserver.model.records import (
    FAILED,
    WAITING,
    EnvironmentSummary,
    IdentifierSummary,
    Page,
    RunDetail,
    RunRecord,
    RunState,
    SessionStats,
    StepAttempt,
    StoredEvent,
)
from devserver.store.flow_queries import read_run_event_ids
from devserver.store.session_index import merge_runs, run_sources, session_events

# ---------------------------------------------------------------------------------------------
# Encoding


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def encode_cursor(key: list[Any]) -> str:
    """An opaque, URL-safe page cursor."""
    return base64.urlsafe_b64encode(dump_json(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, length: int) -> list[Any]:
    """Decode a cursor from `encode_cursor`, or raise `UserError`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        key = None
    if (not isinstance(key, list) or len(key) != length
            or not all(_cursor_part(k) for k in key)):
        raise UserError(f"cursor {cursor[:40]!r} is not a cursor this server returned")
    return key


def _cursor_part(part: object) -> bool:
    """A value SQLite can compare with a column: text, a finite REAL or a 64-bit INTEGER
    (binding a larger int raises OverflowError, a text with surrogates UnicodeEncodeError)."""
    if isinstance(part, str):
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(part, float):
        return math.isfinite(part)
    return isinstance(part, int) and not isinstance(part, bool) and -(2**63) <= part < 2**63


def event_from_row(row: sqlite3.Row) -> StoredEvent:
    return StoredEvent(
        internal_id=row["internal_id"],
        env=row["env"],
        name=row["name"],
        event_id=row["event_id"],
        ts=row["ts"],
        received_at=row["received_at"],
        data=json.loads(row["data"]),
        v=_load(row["v"]),
        user=_load(row["user"]),
        meta=_load(row["meta"]),
        sessions=json.loads(row["sessions"]),
        duplicate=bool(row["duplicate"]),
        source=row["source"],
    )


def run_from_row(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        env=row["env"],
        function_id=row["function_id"],
        event_id=row["event_id"],
        event_name=row["event_name"],
        status=row["status"],
        attempt=row["attempt"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        next_at=row["next_at"],
        output=_load(row["output"]),
        error=_load(row["error"]),
        sessions=json.loads(row["sessions"]),
    )


def step_from_row(row: sqlite3.Row) -> StepAttempt:
    return StepAttempt(
        seq=row["seq"],
        step_id=row["step_id"],
        kind=row["kind"],
        attempt=row["attempt"],
        status=row["status"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        output=_load(row["output"]),
        error=_load(row["error"]),
        final=bool(row["final"]),
        wait_until=row["wait_until"],
        detail=_load(row["detail"]),
    )


# ---------------------------------------------------------------------------------------------
# Reads


def run_events(db: sqlite3.Connection, run: RunRecord) -> list[StoredEvent]:
    """A run's events: a batch's in order, else its one trigger."""
    ids = read_run_event_ids(db, run.run_id)
    if not ids:
        return [event_from_row(r) for r in db.execute(
            "SELECT * FROM events WHERE internal_id = ?", (run.event_id,))]
    by_id = {r["internal_id"]: event_from_row(r) for r in db.execute(
        "SELECT e.* FROM run_events re JOIN events e ON e.internal_id = re.internal_id "
        "WHERE re.run_id = ?", (run.run_id,))}
    return [by_id[i] for i in ids if i in by_id]


def read_run_state(db: sqlite3.Connection, run_id: str) -> RunState | None:
    row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        return None
    run = run_from_row(row)
    events = run_events(db, run)
    memo: dict[str, StepAttempt] = {}
    pending: dict[str, StepAttempt] = {}
    tries: dict[str, int] = {}
    for step in map(step_from_row, db.execute(
            "SELECT * FROM steps WHERE run_id = ? AND step_id IS NOT NULL "
            "AND (final = 1 OR status IN (?, ?)) ORDER BY seq", (run_id, WAITING, FAILED))):
        assert step.step_id is not None
        if step.final:
            memo[step.step_id] = step
        elif step.status == WAITING:
            pending[step.step_id] = step
        else:
            tries[step.step_id] = tries.get(step.step_id, 0) + 1
    for uid in memo:
        tries.pop(uid, None)
    return RunState(run=run, events=events, memo=memo, pending=pending, tries=tries)


def read_run_detail(db: sqlite3.Connection, run_id: str) -> RunDetail | None:
    row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        return None
    run = run_from_row(row)
    events = run_events(db, run)
    steps = [step_from_row(r) for r in db.execute(
        "SELECT * FROM steps WHERE run_id = ? ORDER BY seq", (run_id,))]
    emitted = [r[0] for r in db.execute(
        "SELECT internal_id FROM events WHERE source = ? ORDER BY internal_id LIMIT ?",
        (run_id, MAX_EMITTED_SHOWN))]
    metadata = [MetadataUpdate(r["scope"], r["step_id"], r["step_attempt"], r["kind"], r["op"],
                               json.loads(r["values"]), r["created_at"]) for r in db.execute(
        "SELECT * FROM run_metadata WHERE run_id = ? ORDER BY seq LIMIT ?",
        (run_id, MAX_METADATA_SHOWN))]
    return RunDetail(run=run, events=events, steps=steps, emitted=emitted, metadata=metadata)


MAX_EMITTED_SHOWN = 1000
"""The most event ids a run document lists as produced by the run (a bound on its size)."""
MAX_METADATA_SHOWN = 1000
"""The most metadata updates a run document lists (a bound on its size)."""


def _functions_of(db: sqlite3.Connection, env: str, ident: str, value: str) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT function_id FROM session_functions WHERE env = ? AND identifier = ? "
        "AND value = ? ORDER BY function_id", (env, ident, value))]


def _session_stats(row: sqlite3.Row, functions: list[str]) -> SessionStats:
    return SessionStats(
        identifier=row["identifier"], value=row["value"], runs=row["runs"],
        failed_runs=row["failed_runs"], last_active=row["last_active"], functions=functions,
    )


def read_session(
    db: sqlite3.Connection, env: str, ident: str, value: str, limit: int, cursor: str | None,
) -> tuple[SessionStats, Page] | None:
    row = db.execute(
        "SELECT identifier, value, runs, failed_runs, last_active FROM sessions "
        "WHERE env = ? AND identifier = ? AND value = ?", (env, ident, value)).fetchone()
    if row is None:
        return None
    stats = _session_stats(row, _functions_of(db, env, ident, value))
    params: list[Any] = []
    after = "1"  # a fixed fragment, the only thing the f-string below interpolates
    if cursor is not None:
        after = "rs.run_id < ?"
        params.extend(decode_cursor(cursor, 1))
    runs = [run_from_row(r) for r in merge_runs([db.execute(
        f"SELECT r.* FROM {members} rs JOIN runs r ON r.run_id = rs.run_id WHERE {after} "
        "ORDER BY rs.run_id DESC LIMIT ?", (*keys, *params, limit + 1)).fetchall()
        for members, keys in run_sources(db, env, ident, value)],
        newest_first=True, limit=limit + 1)]
    next_cursor = encode_cursor([runs[limit - 1].run_id]) if len(runs) > limit else None
    return stats, Page(rows=runs[:limit], next_cursor=next_cursor)


def waiting_for_events(db: sqlite3.Connection, env: str, names: list[str]) -> list[str]:
    """Runs with a `wait_for_event` step waiting for one of these event names."""
    marks = ", ".join("?" * len(names))  # placeholders only; the names are parameters
    return [r[0] for r in db.execute(
        f"SELECT DISTINCT run_id FROM waits WHERE env = ? AND event_name IN ({marks})",
        (env, *names))]


def waiting_for_run(db: sqlite3.Connection, child_run_id: str) -> list[str]:
    """Runs with an `invoke` step waiting for this run to end."""
    return [r[0] for r in db.execute(
        "SELECT run_id FROM waits WHERE child_run_id = ?", (child_run_id,))]


def waited_event_names(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """(env, event name) pairs that some run's `wait_for_event` step waits for."""
    return [(r[0], r[1]) for r in db.execute(
        "SELECT DISTINCT env, event_name FROM waits WHERE event_name IS NOT NULL")]


def read_run(db: sqlite3.Connection, run_id: str) -> RunRecord | None:
    """One run's row, or None."""
    return next(map(run_from_row, db.execute(
        "SELECT * FROM runs WHERE run_id = ?", (run_id,))), None)


def read_runs(
    db: sqlite3.Connection, env: str, function_id: str | None, status: str | None, limit: int,
) -> list[RunRecord]:
    """Runs of an environment, newest first, optionally of one function or status."""
    # `where` holds fixed fragments with `?` placeholders; the values go in `params`.
    where, params = ["env = ?"], [env]
    if function_id is not None:
        where.append("function_id = ?")
        params.append(function_id)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    return [run_from_row(r) for r in db.execute(
        f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY run_id DESC LIMIT ?",
        (*params, limit))]


def read_unfinished_runs(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(run_id, function_id, when due) of every Queued or Running run, soonest first.

    A run with a pending wait (event, invoke) is due at once (0); others at their stored
    wake time (`next_at`, 0 when unset).
    """
    return [
        (r[0], r[1], r[2] or 0) for r in db.execute(
            "SELECT r.run_id, r.function_id, CASE WHEN EXISTS (SELECT 1 FROM waits w "
            "WHERE w.run_id = r.run_id) THEN 0 ELSE r.next_at END AS due FROM runs r "
            "WHERE r.status IN ('Queued', 'Running') ORDER BY due")
    ]


def read_unfinished_runs_of(
    db: sqlite3.Connection, env: str, function_id: str, before_internal_id: str,
) -> list[tuple[RunRecord, StoredEvent]]:
    """Unfinished runs of a function created before an event id, with their trigger."""
    return [
        (run_from_row(r), event_from_row(e)) for r in db.execute(
            # The index of unfinished runs, not all the function's runs (a partial index
            # serves only its own condition, spelled out).
            "SELECT * FROM runs INDEXED BY runs_unfinished WHERE env = ? AND function_id = ? "
            "AND status IN ('Queued', 'Running') AND run_id < ?",
            (env, function_id, before_internal_id))
        for e in db.execute("SELECT * FROM events WHERE internal_id = ?", (r["event_id"],))
    ]


def read_event(db: sqlite3.Connection, internal_id: str) -> StoredEvent | None:
    """One event by its internal id, or None."""
    return next(map(event_from_row, db.execute(
        "SELECT * FROM events WHERE internal_id = ?", (internal_id,))), None)


def read_events_after(
    db: sqlite3.Connection, env: str, name: str, after_internal_id: str, limit: int,
) -> list[StoredEvent]:
    """Events called `name` received after the event id boundary, oldest first (duplicates
    left out)."""
    return [event_from_row(r) for r in db.execute(
        "SELECT * FROM events WHERE env = ? AND name = ? AND internal_id > ? "
        "AND duplicate = 0 ORDER BY internal_id LIMIT ?",
        (env, name, after_internal_id, limit))]


def read_event_runs(db: sqlite3.Connection, internal_id: str) -> list[RunRecord]:
    """The runs an event started (a batched run counts for each of its events), oldest
    first."""
    return [run_from_row(r) for r in db.execute(
        "SELECT * FROM runs WHERE event_id = ? UNION SELECT r.* FROM run_events re "
        "JOIN runs r ON r.run_id = re.run_id WHERE re.internal_id = ? ORDER BY run_id",
        (internal_id, internal_id))]


def read_environments(db: sqlite3.Connection) -> list[EnvironmentSummary]:
    """Every environment with data, most recently active first."""
    return [EnvironmentSummary(r["env"], r["events"], r["last_active"]) for r in db.execute(
        "SELECT * FROM environments ORDER BY last_active DESC, env")]


def read_identifiers(db: sqlite3.Connection, env: str) -> list[IdentifierSummary]:
    """The session identifiers seen in `env`, most recently active first."""
    return [
        IdentifierSummary(r["identifier"], r["sessions"], r["last_active"])
        for r in db.execute(
            "SELECT identifier, sessions, (SELECT max(last_active) FROM sessions s "
            "WHERE s.env = i.env AND s.identifier = i.identifier) AS last_active "
            "FROM identifiers i WHERE env = ? ORDER BY last_active DESC, identifier",
            (env,))]


def read_environments_page(db: sqlite3.Connection, limit: int, cursor: str | None) -> Page:
    """A page of `read_environments` (keyset on last_active, env: O(page) per page)."""
    after = decode_cursor(cursor, 2) if cursor is not None else [None, None]
    rows = db.execute(
        "SELECT env, events, last_active FROM environments "
        "WHERE ?1 IS NULL OR (-last_active, env) > (?1, ?2) "
        "ORDER BY last_active DESC, env LIMIT ?3", (*after, limit + 1)).fetchall()
    found = [EnvironmentSummary(r["env"], r["events"], r["last_active"]) for r in rows[:limit]]
    last = found[-1] if len(rows) > limit else None
    return Page(rows=found, next_cursor=encode_cursor([-last.last_active, last.env])
                if last is not None else None)


def read_identifiers_page(
    db: sqlite3.Connection, env: str, limit: int, cursor: str | None,
) -> Page:
    """A page of `read_identifiers`, most recently active first (cursor: the last row's
    activity and identifier)."""
    after = decode_cursor(cursor, 2) if cursor is not None else [None, None]
    rows = db.execute(
        "SELECT * FROM (SELECT identifier, sessions, coalesce((SELECT max(last_active) "
        "FROM sessions s WHERE s.env = i.env AND s.identifier = i.identifier), 0) "
        "AS last_active FROM identifiers i WHERE env = ?1) "
        "WHERE ?2 IS NULL OR (-last_active, identifier) > (?2, ?3) "
        "ORDER BY last_active DESC, identifier LIMIT ?4",
        (env, *after, limit + 1)).fetchall()
    found = [IdentifierSummary(r["identifier"], r["sessions"], r["last_active"])
             for r in rows[:limit]]
    last = found[-1] if len(rows) > limit else None
    return Page(rows=found, next_cursor=encode_cursor([-last.last_active, last.identifier])
                if last is not None else None)


def read_identifier_known(db: sqlite3.Connection, env: str, identifier: str) -> bool:
    """Whether sessions with this identifier were seen in `env` (one index lookup)."""
    return db.execute("SELECT 1 FROM identifiers WHERE env = ? AND identifier = ?",
                      (env, identifier)).fetchone() is not None


def read_session_events(
    db: sqlite3.Connection, env: str, identifier: str, value: str,
) -> list[StoredEvent]:
    """Every event that carried a session, in the order they were received."""
    return [event_from_row(r) for r in session_events(db, env, identifier, value)]


def read_recent_events(db: sqlite3.Connection, limit: int, *, before: str | None = None,
                       after: str | None = None) -> list[StoredEvent]:
    """Received events of every environment, newest first (duplicates left out): the latest
    `limit`, or the `limit` just older than `before` / just newer than `after` (internal ids,
    which sort by receipt); for the GraphQL `events` and `stream` lists."""
    if after is not None:
        rows = db.execute(
            "SELECT * FROM events WHERE duplicate = 0 AND internal_id > ?"
            " ORDER BY internal_id ASC LIMIT ?", (after, limit)).fetchall()
        rows.reverse()
    elif before is not None:
        rows = db.execute(
            "SELECT * FROM events WHERE duplicate = 0 AND internal_id < ?"
            " ORDER BY internal_id DESC LIMIT ?", (before, limit)).fetchall()
    else:
        rows = db.execute(
            "SELECT * FROM events WHERE duplicate = 0 ORDER BY internal_id DESC LIMIT ?",
            (limit,)).fetchall()
    return [event_from_row(r) for r in rows]
