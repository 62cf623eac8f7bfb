"""The reference of the batched-ingest rows: what storing the same rows costs with a minimal
SQLite schema, straight into the file, with no HTTP and no other work.

`rate(workload, seconds, db)` decodes each request body of the workload and, in one
transaction per request, inserts each event, upserts each of its sessions (count and last
activity) and indexes the event under them: the rows devserver's store keeps for an event,
without its validation, runs, environments, counters or notifications. Same PRAGMAs as
devserver's store (WAL, synchronous NORMAL), so a commit is as durable. The bodies are built
before the clock starts.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from devserver.bench.workload import Workload
from devserver.ids import new_ulid

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    internal_id TEXT PRIMARY KEY, name TEXT NOT NULL, ts INTEGER NOT NULL,
    data TEXT NOT NULL, sessions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    identifier TEXT NOT NULL, value TEXT NOT NULL, events INTEGER NOT NULL,
    last_active INTEGER NOT NULL, PRIMARY KEY (identifier, value)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_sessions (
    identifier TEXT NOT NULL, value TEXT NOT NULL, internal_id TEXT NOT NULL,
    PRIMARY KEY (identifier, value, internal_id)) WITHOUT ROWID;
"""

BODIES = 200
"""Request bodies built ahead (used round and round; each event still gets a new id)."""


def connect(path: Path) -> sqlite3.Connection:
    """The reference database, created if need be."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.executescript(SCHEMA)
    return db


def store(db: sqlite3.Connection, body: bytes) -> int:
    """One request's events in one transaction; how many."""
    batch = json.loads(body)
    now = int(time.time() * 1000)
    rows, upserts, index = [], [], []
    for ev in batch:
        internal_id = new_ulid()
        sessions = {str(k): str(v) for k, v in (ev.get("sessions") or {}).items()}
        rows.append((internal_id, ev["name"], now, json.dumps(ev.get("data") or {}),
                     json.dumps(sessions)))
        for identifier, value in sessions.items():
            upserts.append((identifier, value, now))
            index.append((identifier, value, internal_id))
    db.execute("BEGIN")
    db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", rows)
    db.executemany(
        "INSERT INTO sessions VALUES (?, ?, 1, ?) ON CONFLICT (identifier, value) DO UPDATE"
        " SET events = events + 1, last_active = excluded.last_active", upserts)
    db.executemany("INSERT INTO event_sessions VALUES (?, ?, ?)", index)
    db.execute("COMMIT")
    return len(batch)


def rate(workload: Workload, seconds: float, db: sqlite3.Connection) -> float:
    """Events per second stored for `seconds`, one commit per request of `workload`."""
    bodies = [workload.body(i * workload.per_request, thread=99) for i in range(BODIES)]
    stored, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        stored += store(db, bodies[stored // workload.per_request % BODIES])
    return stored / (time.perf_counter() - began)
