"""Bringing a database file to the current shape: its version, the connections' settings,
`migrate` (a new file gets the whole schema, an older one the migrations it lacks), and a bulk
loader for benchmark databases. The DDL is in `tables` (`SCHEMA`, importable from here too),
the upgrades in `migrations`; `database` owns the connections.
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
from devserver.store.migrations import MIGRATIONS
from devserver.store.session_index import index_events, index_runs
from devserver.store.tables import SCHEMA as SCHEMA

log = logging.getLogger(__name__)


SCHEMA_VERSION = 1 + len(MIGRATIONS)


BUSY_TIMEOUT_MS = 2000
"""How long a connection waits for another process's lock before SQLITE_BUSY: the bounded
wait at start-up and in the reader's thread. The writer, which runs on the event loop, sets
its own to 0 once open and waits between tries without blocking the loop (store.database)."""


def connect_pragmas(db: sqlite3.Connection) -> None:
    db.row_factory = sqlite3.Row
    # First: the PRAGMAs after it may need a lock another process holds.
    db.execute("PRAGMA busy_timeout = 2000")  # BUSY_TIMEOUT_MS (SQL takes only constants)
    db.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: a commit survives the process being killed (the OS has the WAL);
    # only an OS crash or power cut can lose the last commits. Right for a dev server.
    db.execute("PRAGMA synchronous = NORMAL")
    # A checkpoint copies the WAL into the database file and syncs both. The store runs one
    # in the background, off the event loop (store.database); a connection's own checkpoint,
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
        index_events(db, limit=runs)  # as the server's passes would
        index_runs(db, limit=runs)
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
