"""SQLite storage: the schema, its migrations, the single batching writer, and every query.

All SQL in the project lives here. Callers pass and get plain dataclasses, never cursors.
Every value reaches SQLite as a `?` parameter; the few f-strings interpolate only column names
checked against a whitelist, placeholders and fixed fragments (tests/test_safety.py checks).

One owner for writes: every write is a small function queued to the writer task, which applies
all pending writes in one transaction (each inside its own savepoint, so one failing write does
not undo the others), commits once and only then resolves the callers' futures. A caller that
awaits a write therefore knows it is durable; under load many writes share one commit.
The writer runs its batches on the event loop's own thread: a batch is a few C-level
`executemany` calls and one commit (WAL, no fsync per commit), cheaper than handing it to a
thread and trading the GIL back and forth for every request (measured in `devserver.bench`).
Reads use their own connection (aiosqlite, in its thread); with WAL they never wait for the
writer.

Per-session figures are counters kept up to date by the writes that change them (run created,
started, finished), so reading them never scans runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from .errors import ConfigError, UserError
from .records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    WAITING,
    EnvironmentSummary,
    IdentifierSummary,
    NewEvent,
    Page,
    RunDetail,
    RunRecord,
    RunState,
    SessionStats,
    StepAttempt,
    StoredEvent,
    WaitSpec,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000
MAX_BATCH = 512
SESSION_SORTS = ("last_active", "runs", "failure_rate", "value")

SCHEMA = """
CREATE TABLE environments (
    env TEXT PRIMARY KEY,
    events INTEGER NOT NULL DEFAULT 0,
    last_active INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE events (
    internal_id TEXT PRIMARY KEY,
    env TEXT NOT NULL,
    name TEXT NOT NULL,
    event_id TEXT,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    data TEXT NOT NULL,
    v TEXT,
    user TEXT,
    meta TEXT,
    sessions TEXT NOT NULL,
    duplicate INTEGER NOT NULL DEFAULT 0,
    source TEXT
);
CREATE INDEX events_by_key ON events (env, event_id, received_at) WHERE event_id IS NOT NULL;

CREATE TABLE event_sessions (
    env TEXT NOT NULL,
    identifier TEXT NOT NULL,
    value TEXT NOT NULL,
    internal_id TEXT NOT NULL,
    PRIMARY KEY (env, identifier, value, internal_id)
) WITHOUT ROWID;

CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    env TEXT NOT NULL,
    function_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_name TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    queued_at INTEGER NOT NULL,
    started_at INTEGER,
    ended_at INTEGER,
    next_at INTEGER,
    output TEXT,
    error TEXT,
    sessions TEXT NOT NULL
);
CREATE INDEX runs_by_event ON runs (event_id);
CREATE INDEX runs_unfinished ON runs (next_at) WHERE status IN ('Queued', 'Running');
CREATE INDEX runs_unfinished_by_function ON runs (env, function_id)
    WHERE status IN ('Queued', 'Running');

CREATE TABLE run_sessions (
    env TEXT NOT NULL,
    identifier TEXT NOT NULL,
    value TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (env, identifier, value, run_id)
) WITHOUT ROWID;
CREATE INDEX run_sessions_by_run ON run_sessions (run_id);

CREATE TABLE steps (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    step_id TEXT,
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER NOT NULL,
    output TEXT,
    error TEXT,
    final INTEGER NOT NULL,
    wait_until INTEGER,
    detail TEXT,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE waits (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    env TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_name TEXT,
    child_run_id TEXT,
    PRIMARY KEY (run_id, step_id)
) WITHOUT ROWID;
CREATE INDEX waits_by_event ON waits (env, event_name) WHERE event_name IS NOT NULL;
CREATE INDEX waits_by_child ON waits (child_run_id) WHERE child_run_id IS NOT NULL;

CREATE TABLE identifiers (
    env TEXT NOT NULL,
    identifier TEXT NOT NULL,
    sessions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (env, identifier)
) WITHOUT ROWID;

CREATE TABLE sessions (
    env TEXT NOT NULL,
    identifier TEXT NOT NULL,
    value TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    failed_runs INTEGER NOT NULL DEFAULT 0,
    first_seen INTEGER NOT NULL,
    last_active INTEGER NOT NULL,
    failure_rate REAL GENERATED ALWAYS AS
        (CASE WHEN runs = 0 THEN 0.0 ELSE CAST(failed_runs AS REAL) / runs END) VIRTUAL,
    PRIMARY KEY (env, identifier, value)
) WITHOUT ROWID;
CREATE INDEX sessions_by_last_active ON sessions (env, identifier, last_active, value);
CREATE INDEX sessions_by_runs ON sessions (env, identifier, runs, value);
CREATE INDEX sessions_by_failure_rate ON sessions (env, identifier, failure_rate, value);

CREATE TABLE session_functions (
    env TEXT NOT NULL,
    identifier TEXT NOT NULL,
    value TEXT NOT NULL,
    function_id TEXT NOT NULL,
    PRIMARY KEY (env, identifier, value, function_id)
) WITHOUT ROWID;

-- The per-session figures (SPEC 2.3) are counters kept by these triggers, in the same
-- transaction as the write that changes them, so reading them never scans runs.

-- A new session value counts toward its identifier. (An identifier's last activity is read
-- as the max over its sessions, one index lookup, rather than written on every event.)
CREATE TRIGGER session_created AFTER INSERT ON sessions BEGIN
    INSERT INTO identifiers (env, identifier, sessions) VALUES (NEW.env, NEW.identifier, 1)
    ON CONFLICT DO UPDATE SET sessions = sessions + 1;
END;

-- A run belongs to every session of its trigger: count it and its function there.
CREATE TRIGGER run_session_added AFTER INSERT ON run_sessions BEGIN
    UPDATE sessions SET runs = runs + 1
    WHERE env = NEW.env AND identifier = NEW.identifier AND value = NEW.value;
    INSERT OR IGNORE INTO session_functions (env, identifier, value, function_id)
    SELECT NEW.env, NEW.identifier, NEW.value, function_id FROM runs WHERE run_id = NEW.run_id;
END;

-- A run starting or ending is activity on its sessions; ending Failed counts as a failure.
CREATE TRIGGER run_status_changed AFTER UPDATE OF status ON runs
WHEN NEW.status != OLD.status BEGIN
    UPDATE sessions SET
        last_active = max(last_active, coalesce(NEW.ended_at, NEW.started_at, last_active)),
        failed_runs = failed_runs + (NEW.status = 'Failed')
    WHERE (env, identifier, value) IN
        (SELECT env, identifier, value FROM run_sessions WHERE run_id = NEW.run_id);
END;
"""
"""Version 1 of the schema, applied as a whole to a new database; MIGRATIONS follow it."""

MIGRATIONS: dict[int, str] = {
    2: """
-- wait_for_event looks for events by name received after the wait began.
CREATE INDEX events_by_name ON events (env, name, internal_id);
""",
}
"""SQL that upgrades a database from version N-1 to N; new databases run them too."""

SCHEMA_VERSION = 1 + len(MIGRATIONS)


# ---------------------------------------------------------------------------------------------
# Encoding helpers


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


def _event(row: sqlite3.Row) -> StoredEvent:
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


def _run(row: sqlite3.Row) -> RunRecord:
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


def _step(row: sqlite3.Row) -> StepAttempt:
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
# Writes (each runs in the writer thread, inside the batch transaction)


def _ingest(
    db: sqlite3.Connection, env: str, received_at: int, events: list[NewEvent]
) -> list[str]:
    """Store events and create their runs; returns the ids of the runs created.

    One `executemany` per table for the whole batch; the schema's triggers keep the
    per-session and per-identifier counters.
    """
    created: list[str] = []
    event_rows: list[tuple[Any, ...]] = []
    session_rows: dict[tuple[str, str], tuple[Any, ...]] = {}
    event_session_rows: list[tuple[Any, ...]] = []
    run_rows: list[tuple[Any, ...]] = []
    run_session_rows: list[tuple[Any, ...]] = []
    keys_seen: set[str] = set()
    for ev in events:
        duplicate = ev.event_id is not None and (
            ev.event_id in keys_seen
            or db.execute(
                "SELECT 1 FROM events WHERE env = ? AND event_id = ? AND received_at > ? "
                "AND duplicate = 0 LIMIT 1",
                (env, ev.event_id, received_at - IDEMPOTENCY_WINDOW_MS),
            ).fetchone() is not None
        )
        if ev.event_id is not None:
            keys_seen.add(ev.event_id)
        sessions_json = dump_json(ev.sessions)
        event_rows.append((ev.internal_id, env, ev.name, ev.event_id, ev.ts, received_at, ev.data,
                           ev.v, ev.user, ev.meta, sessions_json, int(duplicate), ev.source))
        for ident, value in ev.sessions.items():
            session_rows[(ident, value)] = (env, ident, value, received_at, received_at)
            event_session_rows.append((env, ident, value, ev.internal_id))
        if duplicate:
            continue
        for run in ev.runs:
            run_rows.append((run.run_id, env, run.function_id, ev.internal_id, ev.name, QUEUED,
                             received_at, received_at, sessions_json))
            run_session_rows.extend((env, ident, value, run.run_id)
                                    for ident, value in ev.sessions.items())
            created.append(run.run_id)
    db.execute(
        "INSERT INTO environments (env, events, last_active) VALUES (?, ?, ?) ON CONFLICT "
        "DO UPDATE SET events = events + excluded.events, "
        "last_active = max(last_active, excluded.last_active)",
        (env, len(events), received_at),
    )
    db.executemany(
        "INSERT INTO events (internal_id, env, name, event_id, ts, received_at, data, v, "
        "user, meta, sessions, duplicate, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        event_rows)
    if session_rows:
        db.executemany(
            "INSERT INTO sessions (env, identifier, value, first_seen, last_active) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "last_active = max(last_active, excluded.last_active)",
            session_rows.values())
        db.executemany(
            "INSERT INTO event_sessions (env, identifier, value, internal_id) "
            "VALUES (?, ?, ?, ?)", event_session_rows)
    if run_rows:
        db.executemany(
            "INSERT INTO runs (run_id, env, function_id, event_id, event_name, status, "
            "queued_at, next_at, sessions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", run_rows)
        db.executemany(
            "INSERT INTO run_sessions (env, identifier, value, run_id) VALUES (?, ?, ?, ?)",
            run_session_rows)
    return created


def _start_run(db: sqlite3.Connection, *, run_id: str, now: int) -> bool:
    return bool(db.execute(
        "UPDATE runs SET status = ?, started_at = ? WHERE run_id = ? AND status = ?",
        (RUNNING, now, run_id, QUEUED),
    ).rowcount)


def _add_attempt(db: sqlite3.Connection, run_id: str, attempt: StepAttempt) -> None:
    db.execute(
        "INSERT INTO steps (run_id, seq, step_id, kind, attempt, status, started_at, ended_at, "
        "output, error, final, wait_until, detail) VALUES (?, (SELECT coalesce(max(seq), 0) + 1 "
        "FROM steps WHERE run_id = ?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, run_id, attempt.step_id, attempt.kind, attempt.attempt, attempt.status,
         attempt.started_at, attempt.ended_at,
         None if attempt.error is not None else dump_json(attempt.output),
         None if attempt.error is None else dump_json(attempt.error), int(attempt.final),
         attempt.wait_until, None if attempt.detail is None else dump_json(attempt.detail)),
    )


def _live(db: sqlite3.Connection, run_id: str) -> bool:
    row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return row is not None and row[0] in (QUEUED, RUNNING)


def _record_attempt(
    db: sqlite3.Connection, run_id: str, attempt: StepAttempt, next_attempt: int,
    next_at: int | None,
) -> bool:
    if not _live(db, run_id):
        return False
    _add_attempt(db, run_id, attempt)
    db.execute(
        "UPDATE runs SET attempt = ?, next_at = coalesce(?, next_at) WHERE run_id = ?",
        (next_attempt, next_at, run_id),
    )
    return True


def _begin_wait(
    db: sqlite3.Connection, env: str, run_id: str, step: StepAttempt, wait: WaitSpec | None,
) -> bool:
    if not _live(db, run_id):
        return False
    _add_attempt(db, run_id, step)
    if wait is not None:
        db.execute(
            "INSERT OR REPLACE INTO waits (run_id, step_id, env, kind, event_name, child_run_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, step.step_id, env, step.kind, wait.event_name, wait.child_run_id),
        )
    db.execute("UPDATE runs SET next_at = ? WHERE run_id = ?", (step.wait_until, run_id))
    return True


def _end_wait(
    db: sqlite3.Connection, run_id: str, step_id: str, status: str, now: int,
    output: str | None, error: str | None,
) -> bool:
    if not _live(db, run_id):
        return False
    changed = db.execute(
        "UPDATE steps SET status = ?, ended_at = ?, output = ?, error = ?, final = 1 "
        "WHERE run_id = ? AND step_id = ? AND status = ?",
        (status, now, output, error, run_id, step_id, WAITING),
    ).rowcount
    db.execute("DELETE FROM waits WHERE run_id = ? AND step_id = ?", (run_id, step_id))
    db.execute("UPDATE runs SET attempt = 0 WHERE run_id = ?", (run_id,))
    return bool(changed)


def _finish_run(
    db: sqlite3.Connection, run_id: str, status: str, now: int, output: str | None,
    error: str | None, attempt: StepAttempt | None, emitted: list[NewEvent],
    started_at: int | None = None,
) -> list[str] | None:
    """End a run; None if it had already ended, else the ids of runs its events started.

    `started_at` is given when the run's start was never written on its own (it finished
    before that write was due): one UPDATE records both.
    """
    row = db.execute("SELECT status, env FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None or row[0] not in (QUEUED, RUNNING):
        return None
    if attempt is not None:
        _add_attempt(db, run_id, attempt)
    if status == CANCELLED:
        # A cancelled run's pending step stays visible as cancelled rather than "Waiting".
        db.execute("UPDATE steps SET status = ?, ended_at = ?, final = 1 WHERE run_id = ? "
                   "AND status = ?", (CANCELLED, now, run_id, WAITING))
    db.execute("DELETE FROM waits WHERE run_id = ?", (run_id,))
    db.execute(
        "UPDATE runs SET status = ?, ended_at = ?, output = ?, error = ?, next_at = NULL, "
        "started_at = coalesce(started_at, ?) WHERE run_id = ?",
        (status, now, output, error, started_at, run_id),
    )
    return _ingest(db, row[1], now, emitted) if emitted else []


# ---------------------------------------------------------------------------------------------
# Reads (each runs in the reader thread)


def _read_run_state(db: sqlite3.Connection, run_id: str) -> RunState | None:
    row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        return None
    run = _run(row)
    events = [_event(r) for r in db.execute(
        "SELECT * FROM events WHERE internal_id = ?", (run.event_id,))]
    memo: dict[str, StepAttempt] = {}
    pending: dict[str, StepAttempt] = {}
    for step in map(_step, db.execute(
            "SELECT * FROM steps WHERE run_id = ? AND step_id IS NOT NULL "
            "AND (final = 1 OR status = ?) ORDER BY seq", (run_id, WAITING))):
        assert step.step_id is not None
        (memo if step.final else pending)[step.step_id] = step
    return RunState(run=run, events=events, memo=memo, pending=pending)


def _read_run_detail(db: sqlite3.Connection, run_id: str) -> RunDetail | None:
    row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        return None
    run = _run(row)
    events = [_event(r) for r in db.execute(
        "SELECT * FROM events WHERE internal_id = ?", (run.event_id,))]
    steps = [_step(r) for r in db.execute(
        "SELECT * FROM steps WHERE run_id = ? ORDER BY seq", (run_id,))]
    return RunDetail(run=run, events=events, steps=steps)


def _functions_of(db: sqlite3.Connection, env: str, ident: str, value: str) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT function_id FROM session_functions WHERE env = ? AND identifier = ? "
        "AND value = ? ORDER BY function_id", (env, ident, value))]


def _session_stats(row: sqlite3.Row, functions: list[str]) -> SessionStats:
    return SessionStats(
        identifier=row["identifier"], value=row["value"], runs=row["runs"],
        failed_runs=row["failed_runs"], last_active=row["last_active"], functions=functions,
    )


def _read_sessions(
    db: sqlite3.Connection, env: str, ident: str, q: str | None, sort: str, limit: int,
    cursor: str | None,
) -> Page:
    if sort not in SESSION_SORTS:
        raise UserError(f"sort must be one of {', '.join(SESSION_SORTS)}, got {sort!r}")
    # The f-strings below interpolate only `sort` (checked against SESSION_SORTS just above:
    # a column name) and fixed SQL fragments; every value from a request is a `?` parameter.
    # Keyset pagination over an index (env, identifier, <sort>, value): O(page), never OFFSET.
    where = ["env = ?", "identifier = ?"]
    params: list[Any] = [env, ident]
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("value LIKE ? ESCAPE '\\'")
        params.append(f"%{escaped}%")
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
        f"SELECT identifier, value, runs, failed_runs, last_active, failure_rate "
        f"FROM sessions WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    stats = [_session_stats(r, _functions_of(db, env, ident, r["value"])) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor([last[c] for c in key_cols])
    return Page(rows=stats, next_cursor=next_cursor)


def _read_session(
    db: sqlite3.Connection, env: str, ident: str, value: str, limit: int, cursor: str | None,
) -> tuple[SessionStats, Page] | None:
    row = db.execute(
        "SELECT identifier, value, runs, failed_runs, last_active FROM sessions "
        "WHERE env = ? AND identifier = ? AND value = ?", (env, ident, value)).fetchone()
    if row is None:
        return None
    stats = _session_stats(row, _functions_of(db, env, ident, value))
    params: list[Any] = [env, ident, value]
    after = ""  # a fixed fragment, the only thing the f-string below interpolates
    if cursor is not None:
        after = "AND rs.run_id < ?"
        params.extend(decode_cursor(cursor, 1))
    runs = [_run(r) for r in db.execute(
        "SELECT r.* FROM run_sessions rs JOIN runs r ON r.run_id = rs.run_id "
        f"WHERE rs.env = ? AND rs.identifier = ? AND rs.value = ? {after} "
        "ORDER BY rs.run_id DESC LIMIT ?", (*params, limit + 1))]
    next_cursor = encode_cursor([runs[limit - 1].run_id]) if len(runs) > limit else None
    return stats, Page(rows=runs[:limit], next_cursor=next_cursor)


# ---------------------------------------------------------------------------------------------
# The store


def _connect_pragmas(db: sqlite3.Connection) -> None:
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: a commit survives the process being killed (the OS has the WAL);
    # only an OS crash or power cut can lose the last commits. Right for a dev server.
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA temp_store = MEMORY")
    db.execute("PRAGMA cache_size = -8000")  # 8 MB a connection: memory stays flat


def _statements(script: str) -> list[str]:
    """Split an SQL script into statements (triggers hold `;` inside BEGIN ... END)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if not buffer and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement: {buffer[:80]!r}")
    return statements


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database to SCHEMA_VERSION: a new one gets SCHEMA (version 1), then every
    database gets the migrations it lacks, each in order, all in one transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"database schema version {version} is newer than this devserver understands "
            f"({SCHEMA_VERSION}); upgrade devserver or use another --db"
        )
    if version == SCHEMA_VERSION:
        return
    upgrading = version > 0
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise ConfigError("the database file is not a devserver database")
            for statement in _statements(SCHEMA):
                db.execute(statement)
            version = 1
        for target in range(version + 1, SCHEMA_VERSION + 1):
            if upgrading:
                log.info("migrating the database schema to version %d", target)
            for statement in _statements(MIGRATIONS[target]):
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # a constant: PRAGMA takes no ?
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


_Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", bool]
"""A queued write: the function, the caller's future, and whether it needs its own savepoint
(a single statement has nothing to undo when it fails)."""


class Store:
    """The database: open it, write through the batching writer, read through the reader."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._requested = str(path)
        self._tmpdir: str | None = None
        self.path: Path = Path(self._requested)
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Create or migrate the database and start the writer. Raises `ConfigError`."""
        if self._requested == ":memory:":
            # Reader and writer need to share one database, which two connections to
            # ":memory:" can't; a private file deleted on close behaves the same.
            self._tmpdir = tempfile.mkdtemp(prefix="devserver-")
            self.path = Path(self._tmpdir) / "devserver.sqlite3"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Open it once synchronously first: a path SQLite can't use fails here, cleanly,
            # instead of inside aiosqlite's worker thread.
            probe = sqlite3.connect(self.path)
            try:
                probe.execute("PRAGMA schema_version")
            finally:
                probe.close()
            # Used only from the event loop's thread (opened here, on it).
            self._writer = sqlite3.connect(self.path, isolation_level=None)
            _connect_pragmas(self._writer)
            _migrate(self._writer)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._call(self._reader, _connect_pragmas)
            await self._call(self._reader, lambda db: db.execute("PRAGMA query_only = ON"))
        except ConfigError:
            await self.close()
            raise
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise ConfigError(f"cannot open database {self._requested}: {exc}") from exc
        self._writer_task = asyncio.create_task(self._write_loop(), name="devserver-writer")

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close both connections."""
        if self._writer_task is not None:
            await self._queue.put(None)
            await self._writer_task
            self._writer_task = None
        if self._reader is not None:
            await self._reader.close()
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    @staticmethod
    async def _call(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        # One hop to the connection's thread for a whole unit of work, instead of one per
        # statement. aiosqlite has no public API for this; `_execute` has been stable for years.
        execute = cast(Callable[..., Awaitable[T]], conn._execute)
        return await execute(fn, conn._conn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return await self._call(self._reader, functools.partial(_in_snapshot, fn=fn))

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer_task is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((fn, future, True))
        return await future

    async def _write_loop(self) -> None:
        assert self._writer is not None
        stopping = False
        while not stopping:
            item = await self._queue.get()
            batch: list[_Write] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= MAX_BATCH or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            stopping = item is None
            if not batch:
                continue
            if not stopping and len(batch) < MAX_BATCH:
                # One turn of the loop lets requests already being handled queue their writes
                # too, so they share this commit: the batch grows with the load.
                await asyncio.sleep(0)
                while len(batch) < MAX_BATCH and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
            try:
                results = _apply_batch(self._writer, batch=batch)
            except Exception as exc:  # the commit itself failed: nothing in the batch is stored
                log.exception("database commit failed")
                results = [exc] * len(batch)
            for (_, future, _), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    # -- writes ------------------------------------------------------------------------------

    async def ingest(self, env: str, received_at: int, events: list[NewEvent]) -> list[str]:
        """Store a request's events atomically and create their runs; returns new run ids."""
        return await self._write(lambda db: _ingest(db, env, received_at, events))

    async def ingest_once(
        self, env: str, received_at: int, events: list[NewEvent],
    ) -> list[str] | None:
        """`ingest` for a request whose event ids came from an SDK's id seed: None (and
        nothing stored) when its first event is already stored, i.e. the SDK sent it again."""
        def write(db: sqlite3.Connection) -> list[str] | None:
            if events and db.execute("SELECT 1 FROM events WHERE internal_id = ?",
                                     (events[0].internal_id,)).fetchone() is not None:
                return None
            return _ingest(db, env, received_at, events)

        return await self._write(write)

    async def start_run(self, run_id: str, now: int) -> bool:
        """Mark a queued run Running; False when it was not Queued."""
        return await self.submit_start_run(run_id, now)

    def submit_start_run(self, run_id: str, now: int) -> asyncio.Future[bool]:
        """Queue marking a run Running without waiting for it; later writes commit after it."""
        if self._writer_task is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(
            (functools.partial(_start_run, run_id=run_id, now=now), future, False))
        return future

    async def record_attempt(
        self, run_id: str, attempt: StepAttempt, next_attempt: int, next_at: int | None = None,
    ) -> bool:
        """Store a step or function attempt and the run's next attempt number and wake time.

        False (and nothing stored) when the run has ended meanwhile, e.g. was cancelled.
        """
        return await self._write(
            lambda db: _record_attempt(db, run_id, attempt, next_attempt, next_at))

    async def begin_wait(
        self, env: str, run_id: str, step: StepAttempt, wait: WaitSpec | None = None,
    ) -> bool:
        """Store a step that waits (sleep, event, invoke) and the run's wake time."""
        return await self._write(lambda db: _begin_wait(db, env, run_id, step, wait))

    async def end_wait(
        self, run_id: str, step_id: str, status: str, now: int, *, output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Complete a waiting step with its result; False if the run has ended."""
        output_json = None if error is not None else dump_json(output)
        error_json = None if error is None else dump_json(error)
        return await self._write(
            lambda db: _end_wait(db, run_id, step_id, status, now, output_json, error_json))

    async def send_events(
        self, env: str, now: int, events: list[NewEvent], run_id: str, step: StepAttempt,
    ) -> list[str] | None:
        """A `send_event` step: its events and its result in one commit (exactly once).

        Returns the runs the events started, or None when the sending run has ended.
        """
        def write(db: sqlite3.Connection) -> list[str] | None:
            if not _live(db, run_id):
                return None
            _add_attempt(db, run_id, step)
            db.execute("UPDATE runs SET attempt = 0 WHERE run_id = ?", (run_id,))
            return _ingest(db, env, now, events)

        return await self._write(write)

    async def invoke(
        self, env: str, now: int, event: NewEvent, run_id: str, step: StepAttempt,
        wait: WaitSpec,
    ) -> list[str] | None:
        """An `invoke` step: the child's event and run, and the parent's wait, in one commit."""
        def write(db: sqlite3.Connection) -> list[str] | None:
            if not _begin_wait(db, env, run_id, step, wait):
                return None
            return _ingest(db, env, now, [event])

        return await self._write(write)

    async def finish_run(
        self, run_id: str, status: str, now: int, *, output: Any = None,
        error: dict[str, Any] | None = None, attempt: StepAttempt | None = None,
        emitted: list[NewEvent] | None = None, output_json: str | None = None,
        started_at: int | None = None,
    ) -> list[str] | None:
        """Record a run's final status, its last attempt and the events its end emits.

        `output_json` is the output already encoded, if the caller has it; `started_at` the
        run's start when that was never written. Returns the ids of runs those events
        started, or None if the run had already ended.
        """
        if status != COMPLETED:
            output_json = None
        elif output_json is None:
            output_json = dump_json(output)
        error_json = None if error is None else dump_json(error)
        return await self._write(lambda db: _finish_run(
            db, run_id, status, now, output_json, error_json, attempt, emitted or [],
            started_at))

    async def waiting_for_events(self, env: str, names: list[str]) -> list[str]:
        """Runs with a `wait_for_event` step waiting for one of these event names."""
        marks = ", ".join("?" * len(names))  # placeholders only; the names are parameters
        return await self._read(lambda db: [r[0] for r in db.execute(
            f"SELECT DISTINCT run_id FROM waits WHERE env = ? AND event_name IN ({marks})",
            (env, *names))])

    async def waiting_for_run(self, child_run_id: str) -> list[str]:
        """Runs with an `invoke` step waiting for this run to end."""
        return await self._read(lambda db: [r[0] for r in db.execute(
            "SELECT run_id FROM waits WHERE child_run_id = ?", (child_run_id,))])

    async def events_after(
        self, env: str, name: str, after_internal_id: str, limit: int = 100,
    ) -> list[StoredEvent]:
        """Events called `name` received after the event id boundary, oldest first."""
        return await self._read(lambda db: [_event(r) for r in db.execute(
            "SELECT * FROM events WHERE env = ? AND name = ? AND internal_id > ? "
            "AND duplicate = 0 ORDER BY internal_id LIMIT ?",
            (env, name, after_internal_id, limit))])

    async def run(self, run_id: str) -> RunRecord | None:
        """One run's row."""
        return await self._read(lambda db: next(map(_run, db.execute(
            "SELECT * FROM runs WHERE run_id = ?", (run_id,))), None))

    async def unfinished_runs_of(
        self, env: str, function_id: str, before_internal_id: str,
    ) -> list[tuple[RunRecord, StoredEvent]]:
        """Unfinished runs of a function created before an event id, with their trigger."""
        return await self._read(lambda db: [
            (_run(r), _event(e)) for r in db.execute(
                "SELECT * FROM runs WHERE env = ? AND function_id = ? AND status IN (?, ?) "
                "AND run_id < ?", (env, function_id, QUEUED, RUNNING, before_internal_id))
            for e in db.execute("SELECT * FROM events WHERE internal_id = ?", (r["event_id"],))
        ])

    # -- reads -------------------------------------------------------------------------------

    async def run_state(self, run_id: str) -> RunState | None:
        """A run, its events and its memoized steps, for executing it."""
        return await self._read(lambda db: _read_run_state(db, run_id))

    async def run_detail(self, run_id: str) -> RunDetail | None:
        """A run with its events and every attempt of every step."""
        return await self._read(lambda db: _read_run_detail(db, run_id))

    async def unfinished_runs(self) -> list[tuple[str, str, int]]:
        """(run_id, function_id, when due) of every Queued or Running run.

        A run with a pending wait (event, invoke) is due at once, so it re-checks what it
        waits for; others are due at their stored wake time (sleep end, retry backoff).
        """
        return await self._read(lambda db: [
            (r[0], r[1], r[2] or 0) for r in db.execute(
                "SELECT r.run_id, r.function_id, CASE WHEN EXISTS (SELECT 1 FROM waits w "
                "WHERE w.run_id = r.run_id) THEN 0 ELSE r.next_at END AS due FROM runs r "
                "WHERE r.status IN ('Queued', 'Running') ORDER BY due")
        ])

    async def runs(
        self, env: str, *, function_id: str | None = None, status: str | None = None,
        limit: int = 100,
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
        return await self._read(lambda db: [_run(r) for r in db.execute(
            f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY run_id DESC LIMIT ?",
            (*params, limit))])

    async def waited_event_names(self) -> list[tuple[str, str]]:
        """(env, event name) pairs that some run's `wait_for_event` step waits for."""
        return await self._read(lambda db: [(r[0], r[1]) for r in db.execute(
            "SELECT DISTINCT env, event_name FROM waits WHERE event_name IS NOT NULL")])

    async def event(self, internal_id: str) -> StoredEvent | None:
        """One event by its internal id."""
        return await self._read(lambda db: next(
            map(_event, db.execute("SELECT * FROM events WHERE internal_id = ?",
                                   (internal_id,))), None))

    async def event_runs(self, internal_id: str) -> list[RunRecord]:
        """The runs an event started, oldest first."""
        return await self._read(lambda db: [_run(r) for r in db.execute(
            "SELECT * FROM runs WHERE event_id = ? ORDER BY run_id", (internal_id,))])

    async def environments(self) -> list[EnvironmentSummary]:
        """Every environment with data, most recently active first."""
        return await self._read(lambda db: [
            EnvironmentSummary(r["env"], r["events"], r["last_active"]) for r in db.execute(
                "SELECT * FROM environments ORDER BY last_active DESC, env")])

    async def identifiers(self, env: str) -> list[IdentifierSummary]:
        """The session identifiers seen in `env`, most recently active first."""
        return await self._read(lambda db: [
            IdentifierSummary(r["identifier"], r["sessions"], r["last_active"])
            for r in db.execute(
                "SELECT identifier, sessions, (SELECT max(last_active) FROM sessions s "
                "WHERE s.env = i.env AND s.identifier = i.identifier) AS last_active "
                "FROM identifiers i WHERE env = ? ORDER BY last_active DESC, identifier",
                (env,))])

    async def sessions(
        self, env: str, identifier: str, *, q: str | None = None, sort: str = "last_active",
        limit: int = 50, cursor: str | None = None,
    ) -> Page:
        """A page of an identifier's sessions (rows are `SessionStats`)."""
        return await self._read(
            lambda db: _read_sessions(db, env, identifier, q, sort, limit, cursor))

    async def session(
        self, env: str, identifier: str, value: str, *, limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[SessionStats, Page] | None:
        """A session's figures and a page of its runs (newest first); None if unknown."""
        return await self._read(
            lambda db: _read_session(db, env, identifier, value, limit, cursor))

    async def session_events(self, env: str, identifier: str, value: str) -> list[StoredEvent]:
        """Every event that carried a session, in the order they were received."""
        return await self._read(lambda db: [_event(r) for r in db.execute(
            "SELECT e.* FROM event_sessions es JOIN events e ON e.internal_id = es.internal_id "
            "WHERE es.env = ? AND es.identifier = ? AND es.value = ? ORDER BY es.internal_id",
            (env, identifier, value))])


def _in_snapshot(db: sqlite3.Connection, *, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run a read's queries in one transaction: they all see the same commit. (Without it
    each statement sees the latest, and a session's figures could be read before a commit
    and its runs after it.)"""
    db.execute("BEGIN")
    try:
        return fn(db)
    finally:
        db.execute("COMMIT")


def _apply_batch(db: sqlite3.Connection, *, batch: list[_Write]) -> list[Any]:
    """Apply queued writes in one transaction; each gets its result or its exception."""
    results: list[Any] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for fn, _, savepoint in batch:
            if not savepoint:
                try:
                    results.append(fn(db))
                except Exception as exc:  # noqa: BLE001 - handed to the caller who queued it
                    results.append(exc)
                continue
            db.execute("SAVEPOINT w")
            try:
                results.append(fn(db))
            except Exception as exc:  # noqa: BLE001 - handed to the caller who queued it
                db.execute("ROLLBACK TO w")
                results.append(exc)
            db.execute("RELEASE w")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return results


def seed_runs(path: str | os.PathLike[str], *, runs: int, sessions: int,
              identifier: str = "conversation_id") -> None:
    """Bulk-fill a new database with `runs` finished runs (every 7th failed) over `sessions`
    session values, with the rows and counters the normal write path keeps (the schema's
    triggers count them). For benchmarks of large databases; it writes without the server."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        _connect_pragmas(db)
        _migrate(db)
        db.execute("PRAGMA synchronous = OFF")
        db.execute("BEGIN")
        base = 1_700_000_000_000
        db.executemany(
            "INSERT INTO sessions (env, identifier, value, first_seen, last_active) "
            "VALUES ('dev', ?, ?, ?, ?)",
            ((identifier, f"conv_{v}", base + v,
              base + v + sessions * ((runs - 1 - v) // sessions) + 1) for v in range(sessions)))
        chunk = 50_000
        for start in range(0, runs, chunk):
            rows = range(start, min(runs, start + chunk))
            db.executemany(
                "INSERT INTO events (internal_id, env, name, event_id, ts, received_at, data, "
                "sessions) VALUES (?, 'dev', 'bench/e2e', NULL, ?, ?, '{}', ?)",
                ((f"E{i:025d}", base + i, base + i,
                  dump_json({identifier: f"conv_{i % sessions}"})) for i in rows))
            db.executemany(
                "INSERT INTO runs (run_id, env, function_id, event_id, event_name, status, "
                "queued_at, started_at, ended_at, output, sessions) VALUES (?, 'dev', "
                "'bench-trivial', ?, 'bench/e2e', ?, ?, ?, ?, '1', ?)",
                ((f"R{i:025d}", f"E{i:025d}", FAILED if i % 7 == 0 else COMPLETED, base + i,
                  base + i, base + i + 1, dump_json({identifier: f"conv_{i % sessions}"}))
                 for i in rows))
            db.executemany(
                "INSERT INTO run_sessions (env, identifier, value, run_id) "
                "VALUES ('dev', ?, ?, ?)",
                ((identifier, f"conv_{i % sessions}", f"R{i:025d}") for i in rows))
            db.executemany(
                "INSERT INTO event_sessions (env, identifier, value, internal_id) "
                "VALUES ('dev', ?, ?, ?)",
                ((identifier, f"conv_{i % sessions}", f"E{i:025d}") for i in rows))
        db.execute(
            "UPDATE sessions SET failed_runs = (SELECT count(*) FROM run_sessions rs "
            "JOIN runs r ON r.run_id = rs.run_id WHERE rs.env = sessions.env "
            "AND rs.identifier = sessions.identifier AND rs.value = sessions.value "
            "AND r.status = 'Failed')")
        db.execute(
            "INSERT INTO environments (env, events, last_active) "
            "SELECT 'dev', count(*), max(received_at) FROM events")
        db.execute("COMMIT")
    finally:
        db.close()
