"""Events in: a request's events stored and their runs created, in as few statements as a
batch allows. The writer applies every `Ingest` of a batch together (`ingest_many`); a
`send_event` step, an invoke and a run's lifecycle events come in through the same path, and
each run they start counts toward its parent's tree of runs (`grow_tree`). An event whose id
was seen within `IDEMPOTENCY_WINDOW_MS` is stored as a duplicate and starts nothing.
Flow control (debounce, batch, throttle, ...) is decided here, in the same transaction
(`flow_queries.apply_flow`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from devserver.jsontext import dump_json
from devserver.model.limits import RunTreeTooLarge
from devserver.model.records import (
    QUEUED,
    NewEvent,
)
from devserver.store import session_counts
from devserver.store.flow_queries import apply_flow

IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000


@dataclass(slots=True)
class Ingest:
    """A queued `ingest` of one request's events. The writer applies the ingests that share a
    batch together (`ingest_many`): one statement per table for the whole batch."""

    env: str
    received_at: int
    events: list[NewEvent]

    def __call__(self, db: sqlite3.Connection) -> list[str]:
        return ingest_many(db, [self])[0]


def ingest(
    db: sqlite3.Connection, env: str, received_at: int, events: list[NewEvent]
) -> list[str]:
    """Store events and create their runs; returns the ids of the runs created."""
    return ingest_many(db, [Ingest(env, received_at, events)])[0]


def ingest_many(db: sqlite3.Connection, writes: list[Ingest]) -> list[list[str]]:
    """Apply ingests in order; returns, for each, the ids of the runs it created.

    One `executemany` per table for all of them; a session's activity and run count are
    recorded once per batch (a run counts toward each of its sessions) for the next pass to
    sum (`session_counts`). An event whose `id` was seen in the
    last 24 hours (in the database or earlier in `writes`) is stored as a duplicate and starts
    no runs.
    """
    results: list[list[str]] = []
    envs: dict[str, tuple[str, int, int]] = {}
    event_rows: list[tuple[Any, ...]] = []
    # (env, identifier, value) -> [env, identifier, value, first seen, last active, new runs]
    session_rows: dict[tuple[str, str, str], list[Any]] = {}
    run_rows: list[tuple[Any, ...]] = []
    session_functions: set[tuple[str, str, str, str]] = set()
    keys_seen: set[tuple[str, str]] = set()
    flowing: list[tuple[str, int, NewEvent]] = []  # events a function's flow control decides
    for write in writes:
        env, received_at = write.env, write.received_at
        created: list[str] = []
        results.append(created)
        count, last = envs[env][1:] if env in envs else (0, received_at)
        envs[env] = (env, count + len(write.events), max(last, received_at))
        for ev in write.events:
            duplicate = ev.event_id is not None and (
                (env, ev.event_id) in keys_seen
                or db.execute(
                    "SELECT 1 FROM events WHERE env = ? AND event_id = ? AND received_at > ? "
                    "AND duplicate = 0 LIMIT 1",
                    (env, ev.event_id, received_at - IDEMPOTENCY_WINDOW_MS),
                ).fetchone() is not None
            )
            if ev.event_id is not None:
                keys_seen.add((env, ev.event_id))
            sessions_json = dump_json(ev.sessions)
            event_rows.append((ev.internal_id, env, ev.name, ev.event_id, ev.ts, received_at,
                               ev.data, ev.v, ev.user, ev.meta, sessions_json, int(duplicate),
                               ev.source))
            for ident, value in ev.sessions.items():
                key = (env, ident, value)
                row = session_rows.get(key)
                if row is None:
                    session_rows[key] = [env, ident, value, received_at, received_at, 0]
                else:
                    row[3] = min(row[3], received_at)
                    row[4] = max(row[4], received_at)
            if duplicate:
                continue
            if ev.flow:
                flowing.append((env, received_at, ev))
            for run in ev.runs:
                run_rows.append((run.run_id, env, run.function_id, ev.internal_id, ev.name,
                                 QUEUED, received_at, received_at, sessions_json))
                for ident, value in ev.sessions.items():
                    session_rows[env, ident, value][5] += 1
                    session_functions.add((env, ident, value, run.function_id))
                created.append(run.run_id)
    db.executemany(
        "INSERT INTO environments (env, events, last_active) VALUES (?, ?, ?) ON CONFLICT "
        "DO UPDATE SET events = events + excluded.events, "
        "last_active = max(last_active, excluded.last_active)",
        envs.values(),
    )
    db.executemany(
        "INSERT INTO events (internal_id, env, name, event_id, ts, received_at, data, v, "
        "user, meta, sessions, duplicate, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        event_rows)
    # The sessions' figures: summed by the next pass (`session_counts`), not here.
    session_counts.add(db, ((row_env, ident, value, first, last, runs, 0)
                            for row_env, ident, value, first, last, runs
                            in session_rows.values()))
    if run_rows:
        db.executemany(
            "INSERT INTO runs (run_id, env, function_id, event_id, event_name, status, "
            "queued_at, next_at, sessions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", run_rows)
        db.executemany(
            "INSERT OR IGNORE INTO session_functions (env, identifier, value, function_id) "
            "VALUES (?, ?, ?, ?)", session_functions)
    # After the rows above: a decision reads the events (a batch's, earlier in this write).
    for env, received_at, ev in flowing:
        for request in ev.flow:
            request.outcome = apply_flow(db, env, received_at, ev, request)
    return results


def ingest_once(
    db: sqlite3.Connection, env: str, received_at: int, events: list[NewEvent],
) -> list[str] | None:
    """`ingest` for a request whose event ids came from an SDK's id seed: None (and nothing
    stored) when its first event is already stored, i.e. the SDK sent it again."""
    if events and db.execute("SELECT 1 FROM events WHERE internal_id = ?",
                             (events[0].internal_id,)).fetchone() is not None:
        return None
    return ingest(db, env, received_at, events)


def grow_tree(db: sqlite3.Connection, run_id: str, created: list[str], bound: int, *,
              strict: bool = True) -> None:
    """Count runs that `run_id` started toward its tree of runs, and mark them as in it.
    Raises `RunTreeTooLarge` (the caller's write is then rolled back) past `bound`, unless
    not `strict` (a run's end, whose emitted runs `within_tree` already checked)."""
    if not created:
        return
    row = db.execute("SELECT coalesce(tree, run_id) FROM runs WHERE run_id = ?",
                     (run_id,)).fetchone()
    root = run_id if row is None else row[0]
    total = db.execute(
        "INSERT INTO run_trees (root, runs) VALUES (?, ?) ON CONFLICT DO UPDATE SET "
        "runs = runs + excluded.runs RETURNING runs", (root, len(created))).fetchone()[0]
    if total > bound and strict:
        raise RunTreeTooLarge(root, total, bound)
    db.executemany("UPDATE runs SET tree = ? WHERE run_id = ?", ((root, r) for r in created))
