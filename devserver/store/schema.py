"""The database's shape: the current schema, the numbered migrations that upgrade older files
to it, the connection settings, and a bulk loader for benchmark databases. Part of the store:
SQL lives here and in `queries`; `facade` owns the connections.

The per-session figures (SPEC 2.3) are counters, kept in the same transaction as the write that
changes them (a new session's count by a trigger; runs, failures and activity by the writes
that create, start and end runs, summed over a batch), so reading them never scans runs.
"""

from __future__ import annotations

import logging
import os
import sqlite3

from devserver.errors import ConfigError
from devserver.jsontext import dump_json
from devserver.model.records import (
    COMPLETED,
    FAILED,
)

log = logging.getLogger(__name__)




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
, restarts INTEGER NOT NULL DEFAULT 0, tree TEXT, rerun_of TEXT);
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
    sessions INTEGER NOT NULL DEFAULT 0, runs INTEGER NOT NULL DEFAULT 0,
    failed_runs INTEGER NOT NULL DEFAULT 0,
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

-- The per-session figures (SPEC 2.3) are counters kept in the same transaction as the write
-- that changes them, so reading them never scans runs: a new session's count by this
-- trigger; runs, failures and activity by the writes that create, start and end runs.

-- A new session value counts toward its identifier. (An identifier's last activity is read
-- as the max over its sessions, one index lookup, rather than written on every event.)
CREATE TRIGGER session_created AFTER INSERT ON sessions BEGIN
    INSERT INTO identifiers (env, identifier, sessions) VALUES (NEW.env, NEW.identifier, 1)
    ON CONFLICT DO UPDATE SET sessions = sessions + 1;
END;

-- wait_for_event looks for events by name received after the wait began.
CREATE INDEX events_by_name ON events (env, name, internal_id);

-- Safety (version 5). `runs.restarts`: the starts of the server at which the run was due
-- and executed at once, since it last showed progress (a step committed, a wait begun, a
-- retry recorded); a run at the bound is failed instead of killing every restart.
-- `runs.tree`: the first run of the tree of runs this one belongs to (started by a run's
-- send_event, invoke or lifecycle events), NULL for a run started from outside;
-- `run_trees` counts each tree's runs, so a tree that fans out without end is stopped.
CREATE TABLE run_trees (
    root TEXT PRIMARY KEY,
    runs INTEGER NOT NULL
) WITHOUT ROWID;

-- The events a run produced (send_event steps, its end's lifecycle events): only those have
-- a source, so events from outside cost the index nothing.
CREATE INDEX events_by_source ON events (source) WHERE source IS NOT NULL;

-- Metadata an SDK attached to a run (`POST /v1/runs/{id}/metadata`), in arrival order: its
-- scope (`run`, or `step` with the user's step id and attempt), kind, op and values.
CREATE TABLE run_metadata (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    step_id TEXT,
    step_attempt INTEGER,
    kind TEXT NOT NULL,
    op TEXT NOT NULL,
    "values" TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX run_metadata_by_run ON run_metadata (run_id, seq);
-- Flow control (version 8, SPEC 3.3): pending debounces and batches (one per function and
-- key; the id is the run's it will start), the marks rate limits, idempotency keys and
-- singletons count, throttle keys' theoretical arrival times, what flow control did with each
-- event, a batched run's events, and why a run is queued or was cancelled.
CREATE TABLE flow_pending (
    pending_id TEXT PRIMARY KEY,
    env TEXT NOT NULL,
    function_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    first_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    events TEXT NOT NULL,
    keys TEXT NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX flow_pending_by_key ON flow_pending (env, function_id, kind, key);
CREATE TABLE flow_marks (
    env TEXT NOT NULL,
    function_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at INTEGER NOT NULL,
    run_id TEXT NOT NULL
);
CREATE INDEX flow_marks_by_key ON flow_marks (env, function_id, kind, key, at);
CREATE TABLE flow_throttle (
    env TEXT NOT NULL,
    function_id TEXT NOT NULL,
    key TEXT NOT NULL,
    tat INTEGER NOT NULL,
    PRIMARY KEY (env, function_id, key)
) WITHOUT ROWID;
CREATE TABLE flow_outcomes (
    internal_id TEXT NOT NULL,
    function_id TEXT NOT NULL,
    action TEXT NOT NULL,
    run_id TEXT,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (internal_id, function_id)
) WITHOUT ROWID;
CREATE INDEX flow_outcomes_by_run ON flow_outcomes (function_id, run_id)
    WHERE run_id IS NOT NULL;
CREATE TABLE run_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    internal_id TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX run_events_by_event ON run_events (internal_id);
CREATE TABLE run_notes (
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (run_id, kind)
) WITHOUT ROWID;

-- The dashboard (version 9). `runs.rerun_of`: the run a rerun repeats (its reruns are found
-- by the index); `identifiers.runs` and `.failed_runs`: sums over its sessions, kept by the
-- writes that change theirs; runs by function for /functions and /runs?function=; sessions
-- by failed runs for that sort; `run_logs`: the lines a run wrote with `ctx.logger`, bounded
-- per run.
CREATE INDEX runs_by_rerun_of ON runs (rerun_of) WHERE rerun_of IS NOT NULL;
CREATE INDEX runs_by_function ON runs (env, function_id, run_id);
CREATE INDEX sessions_by_failed_runs ON sessions (env, identifier, failed_runs, value);
CREATE TABLE run_logs (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
"""
"""The current schema (SCHEMA_VERSION), applied as a whole to a new database."""

MIGRATIONS: dict[int, str] = {
    2: """
-- wait_for_event looks for events by name received after the wait began.
CREATE INDEX events_by_name ON events (env, name, internal_id);
""",
    3: """
-- A run's count toward its sessions, and its function among theirs, are written by the
-- ingest that creates it, summed over the batch (one UPDATE a session instead of one a run).
DROP TRIGGER run_session_added;
""",
    4: """
-- A run's start and end are activity in its sessions, and a failed end counts as a failure:
-- written by the start and the end themselves, summed over the batch (one UPDATE a session
-- instead of one a run).
DROP TRIGGER run_status_changed;
""",
    5: """
-- Safety: restarts a run survived without progress, and the tree of runs it belongs to.
ALTER TABLE runs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN tree TEXT;
CREATE TABLE run_trees (
    root TEXT PRIMARY KEY,
    runs INTEGER NOT NULL
) WITHOUT ROWID;
""",
    6: """
-- The events a run produced (send_event steps, its end's lifecycle events): only those have
-- a source, so events from outside cost the index nothing.
CREATE INDEX events_by_source ON events (source) WHERE source IS NOT NULL;
""",
    7: """
-- Metadata an SDK attached to a run (`POST /v1/runs/{id}/metadata`), in arrival order: its
-- scope (`run`, or `step` with the user's step id and attempt), kind, op and values.
CREATE TABLE run_metadata (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    step_id TEXT,
    step_attempt INTEGER,
    kind TEXT NOT NULL,
    op TEXT NOT NULL,
    "values" TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX run_metadata_by_run ON run_metadata (run_id, seq);
""",
    8: """
-- Flow control (version 8, SPEC 3.3): pending debounces and batches (one per function and
-- key; the id is the run's it will start), the marks rate limits, idempotency keys and
-- singletons count, throttle keys' theoretical arrival times, what flow control did with each
-- event, a batched run's events, and why a run is queued or was cancelled.
CREATE TABLE flow_pending (
    pending_id TEXT PRIMARY KEY,
    env TEXT NOT NULL,
    function_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    first_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    events TEXT NOT NULL,
    keys TEXT NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX flow_pending_by_key ON flow_pending (env, function_id, kind, key);
CREATE TABLE flow_marks (
    env TEXT NOT NULL,
    function_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at INTEGER NOT NULL,
    run_id TEXT NOT NULL
);
CREATE INDEX flow_marks_by_key ON flow_marks (env, function_id, kind, key, at);
CREATE TABLE flow_throttle (
    env TEXT NOT NULL,
    function_id TEXT NOT NULL,
    key TEXT NOT NULL,
    tat INTEGER NOT NULL,
    PRIMARY KEY (env, function_id, key)
) WITHOUT ROWID;
CREATE TABLE flow_outcomes (
    internal_id TEXT NOT NULL,
    function_id TEXT NOT NULL,
    action TEXT NOT NULL,
    run_id TEXT,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (internal_id, function_id)
) WITHOUT ROWID;
CREATE INDEX flow_outcomes_by_run ON flow_outcomes (function_id, run_id)
    WHERE run_id IS NOT NULL;
CREATE TABLE run_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    internal_id TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX run_events_by_event ON run_events (internal_id);
CREATE TABLE run_notes (
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (run_id, kind)
) WITHOUT ROWID;
""",
    9: """
ALTER TABLE runs ADD COLUMN rerun_of TEXT;
-- An identifier's runs and failed runs (summed over its sessions), kept by the writes that
-- change its sessions' counters, so /sessions reads them without scanning sessions.
ALTER TABLE identifiers ADD COLUMN runs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE identifiers ADD COLUMN failed_runs INTEGER NOT NULL DEFAULT 0;
UPDATE identifiers SET (runs, failed_runs) = (SELECT coalesce(sum(runs), 0),
    coalesce(sum(failed_runs), 0) FROM sessions s WHERE s.env = identifiers.env
    AND s.identifier = identifiers.identifier);
CREATE INDEX runs_by_rerun_of ON runs (rerun_of) WHERE rerun_of IS NOT NULL;
CREATE INDEX runs_by_function ON runs (env, function_id, run_id);
CREATE INDEX sessions_by_failed_runs ON sessions (env, identifier, failed_runs, value);
CREATE TABLE run_logs (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
""",
}
"""SQL that upgrades a database from version N-1 to N. Only older files run them: a new
database gets SCHEMA, which already is the result (tests/test_store.py proves the two equal)."""

SCHEMA_VERSION = 1 + len(MIGRATIONS)


BUSY_TIMEOUT_MS = 2000
"""How long a connection waits for another process's lock before SQLITE_BUSY: the bounded
wait at start-up and in the reader's thread. The writer, which runs on the event loop, sets
its own to 0 once open and waits between tries without blocking the loop (store.facade)."""


def connect_pragmas(db: sqlite3.Connection) -> None:
    db.row_factory = sqlite3.Row
    # First: the PRAGMAs after it may need a lock another process holds.
    db.execute("PRAGMA busy_timeout = 2000")  # BUSY_TIMEOUT_MS (SQL takes only constants)
    db.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: a commit survives the process being killed (the OS has the WAL);
    # only an OS crash or power cut can lose the last commits. Right for a dev server.
    db.execute("PRAGMA synchronous = NORMAL")
    # A checkpoint copies the WAL into the database file and syncs both. The store runs one
    # in the background, off the event loop (store.facade); a connection's own checkpoint,
    # which blocks the writer, is the backstop for a WAL the background one could not keep
    # short: every 10,000 pages (40 MB) instead of SQLite's 1,000. The WAL file is cut back
    # to 64 MB after a checkpoint.
    db.execute("PRAGMA wal_autocheckpoint = 10000")
    db.execute("PRAGMA journal_size_limit = 67108864")
    db.execute("PRAGMA temp_store = MEMORY")
    db.execute("PRAGMA cache_size = -8000")  # 8 MB a connection: memory stays flat


def statements(script: str) -> list[str]:
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


def migrate(db: sqlite3.Connection) -> None:
    """Bring a database to SCHEMA_VERSION: a new one gets SCHEMA, an older one the
    migrations it lacks, each in order; either way in one transaction."""
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
            for statement in statements(SCHEMA):
                db.execute(statement)
            version = SCHEMA_VERSION
        for target in range(version + 1, SCHEMA_VERSION + 1):
            if upgrading:
                log.info("migrating the database schema to version %d", target)
            for statement in statements(MIGRATIONS[target]):
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # a constant: PRAGMA takes no ?
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def seed_runs(path: str | os.PathLike[str], *, runs: int, sessions: int,
              identifier: str = "conversation_id") -> None:
    """Bulk-fill a new database with `runs` finished runs (every 7th failed) over `sessions`
    session values, with the rows and counters the normal write path keeps (counted here in
    bulk). For benchmarks of large databases; it writes without the server."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        connect_pragmas(db)
        migrate(db)
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
            "UPDATE sessions SET (runs, failed_runs) = (SELECT count(*), "
            "coalesce(sum(r.status = 'Failed'), 0) FROM run_sessions rs "
            "JOIN runs r ON r.run_id = rs.run_id WHERE rs.env = sessions.env "
            "AND rs.identifier = sessions.identifier AND rs.value = sessions.value)")
        db.execute(
            "UPDATE identifiers SET (runs, failed_runs) = (SELECT coalesce(sum(runs), 0), "
            "coalesce(sum(failed_runs), 0) FROM sessions s WHERE s.env = identifiers.env "
            "AND s.identifier = identifiers.identifier)")
        db.execute(
            "INSERT OR IGNORE INTO session_functions (env, identifier, value, function_id) "
            "SELECT DISTINCT rs.env, rs.identifier, rs.value, r.function_id "
            "FROM run_sessions rs JOIN runs r ON r.run_id = rs.run_id")
        db.execute(
            "INSERT INTO environments (env, events, last_active) "
            "SELECT 'dev', count(*), max(received_at) FROM events")
        db.execute("COMMIT")
    finally:
        db.close()
