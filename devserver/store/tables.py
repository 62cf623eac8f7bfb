"""The current schema, as DDL: every table, index and trigger of a new database at
`schema.SCHEMA_VERSION`, applied as a whole by `schema.migrate`.

A change here is half of a schema change: the other half is the migration in `migrations` that
brings older files to the same shape (tests/test_store.py proves an upgraded file equals a new
one). The per-session figures (SPEC 2.3) are counters kept in the same transaction as the write
that changes them: a new session's count by a trigger here, runs, failures and activity by the
writes that create, start and end runs (`ingest`, `steps`, `run_ends`), so reading them never
scans runs.
"""

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
-- Unfinished runs: all of them at a start, a function's for cancel_on (version 11: one
-- index; the one by wake time served no query).
CREATE INDEX runs_unfinished ON runs (env, function_id)
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
INSERT INTO event_sessions_upto (upto) VALUES (0);
INSERT INTO run_sessions_upto (upto) VALUES (0);
-- Version 11: sessions' figures are summed in passes after their commits
-- (`session_counts`): the changes that commits left for the next pass.
CREATE TABLE session_deltas (
    id INTEGER PRIMARY KEY,
    deltas TEXT NOT NULL
);
"""
"""The current schema (SCHEMA_VERSION), applied as a whole to a new database."""
