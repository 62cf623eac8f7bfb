"""The numbered migrations: the SQL that upgrades a database file from each older schema
version to the next, up to the current `tables.SCHEMA`. `schema.migrate` runs the ones a file
lacks, in order, in one transaction; the number of the last is the current version.
"""

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
    10: """
-- Version 10: events and runs are indexed under their sessions in passes after their
-- commits (`session_index`): the rowid and id of the last event and run indexed.
CREATE TABLE event_sessions_upto (
    upto INTEGER NOT NULL,
    internal_id TEXT
);
CREATE TABLE run_sessions_upto (
    upto INTEGER NOT NULL,
    run_id TEXT
);
-- Every event and run of an older file is indexed already.
INSERT INTO event_sessions_upto (upto, internal_id)
    SELECT rowid, internal_id FROM events ORDER BY rowid DESC LIMIT 1;
INSERT INTO event_sessions_upto (upto) SELECT 0 WHERE NOT EXISTS
    (SELECT 1 FROM event_sessions_upto);
INSERT INTO run_sessions_upto (upto, run_id)
    SELECT rowid, run_id FROM runs ORDER BY rowid DESC LIMIT 1;
INSERT INTO run_sessions_upto (upto) SELECT 0 WHERE NOT EXISTS
    (SELECT 1 FROM run_sessions_upto);
""",
    11: """
-- Version 11: sessions' figures are summed in passes after their commits
-- (`session_counts`): the changes that commits left for the next pass.
CREATE TABLE session_deltas (
    id INTEGER PRIMARY KEY,
    deltas TEXT NOT NULL
);
-- One index of unfinished runs instead of two (the one by wake time served no query): each
-- run's start and end touched both.
DROP INDEX runs_unfinished;
DROP INDEX runs_unfinished_by_function;
CREATE INDEX runs_unfinished ON runs (env, function_id)
    WHERE status IN ('Queued', 'Running');
""",
}
"""SQL that upgrades a database from version N-1 to N. Only older files run them: a new
database gets SCHEMA, which already is the result (tests/test_store.py proves the two equal)."""
