-- The schema of devserver's first database format (user_version 1), as it was written to
-- disk: tests build old files from it to check that migrations upgrade them.

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
