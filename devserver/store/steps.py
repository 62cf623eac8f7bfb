"""A run's progress while it executes: its start, each step or function attempt, the waits
(sleep, wait-for-event, invoke) begun and ended, a `send_event` step, the metadata an SDK
reports, and the restart counts that stop a run which keeps killing the process. Each write
checks that the run is still live (Queued or Running) and reports False (nothing stored) when
it has ended meanwhile, e.g. was cancelled.
"""

from __future__ import annotations

import sqlite3

from devserver.jsontext import dump_json
from devserver.model.limits import MAX_TREE_RUNS
from devserver.model.metadata import MetadataUpdate
from devserver.model.records import (
    QUEUED,
    RUNNING,
    WAITING,
    NewEvent,
    StepAttempt,
    WaitSpec,
)
from devserver.store import session_counts
from devserver.store.ingest import grow_tree, ingest
from devserver.store.session_index import run_pairs


def start_run(db: sqlite3.Connection, *, run_id: str, now: int) -> bool:
    """Mark a queued run Running; its start is activity in its sessions."""
    if not db.execute(
        "UPDATE runs SET status = ?, started_at = ? WHERE run_id = ? AND status = ?",
        (RUNNING, now, run_id, QUEUED),
    ).rowcount:
        return False
    (env,) = db.execute("SELECT env FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    session_counts.add(db, ((env, identifier, value, None, now, 0, 0)
                            for identifier, value in run_pairs(db, [run_id])[run_id]))
    return True


def add_attempt(db: sqlite3.Connection, run_id: str, attempt: StepAttempt) -> None:
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


def live(db: sqlite3.Connection, run_id: str) -> bool:
    row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return row is not None and row[0] in (QUEUED, RUNNING)


def record_attempt(
    db: sqlite3.Connection, run_id: str, attempt: StepAttempt, next_attempt: int,
    next_at: int | None,
) -> bool:
    if not live(db, run_id):
        return False
    add_attempt(db, run_id, attempt)
    db.execute(
        "UPDATE runs SET attempt = ?, next_at = coalesce(?, next_at), restarts = 0 "
        "WHERE run_id = ?",
        (next_attempt, next_at, run_id),
    )
    return True


def begin_wait(
    db: sqlite3.Connection, env: str, run_id: str, step: StepAttempt, wait: WaitSpec | None,
) -> bool:
    if not live(db, run_id):
        return False
    add_attempt(db, run_id, step)
    if wait is not None:
        db.execute(
            "INSERT OR REPLACE INTO waits (run_id, step_id, env, kind, event_name, child_run_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, step.step_id, env, step.kind, wait.event_name, wait.child_run_id),
        )
    db.execute("UPDATE runs SET next_at = ?, restarts = 0 WHERE run_id = ?",
               (step.wait_until, run_id))
    return True


def end_wait(
    db: sqlite3.Connection, run_id: str, step_id: str, status: str, now: int,
    output: str | None, error: str | None,
) -> bool:
    if not live(db, run_id):
        return False
    changed = db.execute(
        "UPDATE steps SET status = ?, ended_at = ?, output = ?, error = ?, final = 1 "
        "WHERE run_id = ? AND step_id = ? AND status = ?",
        (status, now, output, error, run_id, step_id, WAITING),
    ).rowcount
    db.execute("DELETE FROM waits WHERE run_id = ? AND step_id = ?", (run_id, step_id))
    db.execute("UPDATE runs SET attempt = 0, restarts = 0 WHERE run_id = ?", (run_id,))
    return bool(changed)


def send_events(
    db: sqlite3.Connection, env: str, now: int, events: list[NewEvent], run_id: str,
    step: StepAttempt, max_tree_runs: int = MAX_TREE_RUNS,
) -> list[str] | None:
    """A `send_event` step: its events and its result together. Returns the runs the events
    started, or None (and nothing stored) when the sending run has ended."""
    if not live(db, run_id):
        return None
    add_attempt(db, run_id, step)
    db.execute("UPDATE runs SET attempt = 0, restarts = 0 WHERE run_id = ?", (run_id,))
    created = ingest(db, env, now, events)
    grow_tree(db, run_id, created, max_tree_runs)
    return created


def note_restarts(db: sqlite3.Connection, run_ids: list[str]) -> dict[str, int]:
    """At start-up: count one more restart for each run (due now, executed at once);
    returns each run's count since it last showed progress."""
    counts: dict[str, int] = {}
    for start in range(0, len(run_ids), 500):  # well under SQLite's limit on parameters
        chunk = run_ids[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        counts.update(db.execute(
            f"UPDATE runs SET restarts = restarts + 1 WHERE run_id IN ({marks}) "
            "AND status IN (?, ?) RETURNING run_id, restarts", (*chunk, QUEUED, RUNNING)))
    return counts


def clear_restarts(db: sqlite3.Connection) -> None:
    """At a clean shutdown: the runs it interrupted did not end the process."""
    # The statuses spelled out: the index of unfinished runs, not a scan of every run.
    db.execute("UPDATE runs SET restarts = 0 WHERE status IN ('Queued', 'Running') "
               "AND restarts > 0")


def add_metadata(db: sqlite3.Connection, run_id: str, updates: list[MetadataUpdate],
                 now: int) -> bool:
    """Attach metadata to a run (ended or not: an SDK may report after the end); False when
    there is no such run."""
    if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
        return False
    db.executemany(
        'INSERT INTO run_metadata (run_id, scope, step_id, step_attempt, kind, op, "values", '
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(run_id, u.scope, u.step_id, u.step_attempt, u.kind, u.op, dump_json(u.values), now)
         for u in updates])
    return True
