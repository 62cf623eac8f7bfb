"""Every query of the store, as plain functions of a `sqlite3.Connection`: the writes the
writer batches into one transaction, the reads the reader runs, and the row-to-record mapping.
Every value reaches SQLite as a `?` parameter; the few f-strings interpolate only column names
checked against a whitelist, placeholders and fixed fragments (tests/test_safety.py checks).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import math
import sqlite3
from dataclasses import dataclass
from typing import Any, TypeVar

from devserver.errors import UserError
from devserver.jsontext import dump_json
from devserver.model.limits import MAX_TREE_RUNS, RunTreeTooLarge
from devserver.model.metadata import MetadataUpdate
from devserver.model.records import (
    CANCELLED,
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
from devserver.store.flow_queries import apply_flow, read_run_event_ids

log = logging.getLogger(__name__)
T = TypeVar("T")



IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000


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
# Writes (run by the writer, inside the batch transaction)


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
    written once per batch (a run counts toward each of its sessions), the schema's triggers
    keep the other counters. An event whose `id` was seen in the
    last 24 hours (in the database or earlier in `writes`) is stored as a duplicate and starts
    no runs.
    """
    results: list[list[str]] = []
    envs: dict[str, tuple[str, int, int]] = {}
    event_rows: list[tuple[Any, ...]] = []
    # (env, identifier, value) -> [env, identifier, value, first seen, last active, new runs]
    session_rows: dict[tuple[str, str, str], list[Any]] = {}
    event_session_rows: list[tuple[Any, ...]] = []
    run_rows: list[tuple[Any, ...]] = []
    run_session_rows: list[tuple[Any, ...]] = []
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
                event_session_rows.append((env, ident, value, ev.internal_id))
            if duplicate:
                continue
            if ev.flow:
                flowing.append((env, received_at, ev))
            for run in ev.runs:
                run_rows.append((run.run_id, env, run.function_id, ev.internal_id, ev.name,
                                 QUEUED, received_at, received_at, sessions_json))
                for ident, value in ev.sessions.items():
                    run_session_rows.append((env, ident, value, run.run_id))
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
    if session_rows:
        # One upsert a session for its activity and its new runs together; a session with
        # no new run leaves `runs` out of the SET, so its run-count indexes are not touched.
        db.executemany(
            "INSERT INTO sessions (env, identifier, value, first_seen, last_active) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "last_active = max(last_active, excluded.last_active)",
            (row[:5] for row in session_rows.values() if not row[5]))
        db.executemany(
            "INSERT INTO sessions (env, identifier, value, first_seen, last_active, runs) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "last_active = max(last_active, excluded.last_active), "
            "runs = runs + excluded.runs",
            (row for row in session_rows.values() if row[5]))
        identifier_runs: dict[tuple[str, str], int] = {}
        for row_env, row_ident, _, _, _, count in session_rows.values():
            if count:
                key2 = (row_env, row_ident)
                identifier_runs[key2] = identifier_runs.get(key2, 0) + count
        # The identifiers' sums, one UPDATE an identifier (a handful a batch).
        db.executemany(
            "UPDATE identifiers SET runs = runs + ? WHERE env = ? AND identifier = ?",
            ((count, *key) for key, count in identifier_runs.items()))
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
        db.executemany(
            "INSERT OR IGNORE INTO session_functions (env, identifier, value, function_id) "
            "VALUES (?, ?, ?, ?)", session_functions)
    # After the rows above: a decision reads the events (a batch's, earlier in this write).
    for env, received_at, ev in flowing:
        for request in ev.flow:
            request.outcome = apply_flow(db, env, received_at, ev, request)
    return results


def start_run(db: sqlite3.Connection, *, run_id: str, now: int) -> bool:
    """Mark a queued run Running; its start is activity in its sessions."""
    if not db.execute(
        "UPDATE runs SET status = ?, started_at = ? WHERE run_id = ? AND status = ?",
        (RUNNING, now, run_id, QUEUED),
    ).rowcount:
        return False
    db.execute(
        "UPDATE sessions SET last_active = max(last_active, ?) WHERE (env, identifier, value) "
        "IN (SELECT env, identifier, value FROM run_sessions WHERE run_id = ?)", (now, run_id))
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


def ingest_once(
    db: sqlite3.Connection, env: str, received_at: int, events: list[NewEvent],
) -> list[str] | None:
    """`ingest` for a request whose event ids came from an SDK's id seed: None (and nothing
    stored) when its first event is already stored, i.e. the SDK sent it again."""
    if events and db.execute("SELECT 1 FROM events WHERE internal_id = ?",
                             (events[0].internal_id,)).fetchone() is not None:
        return None
    return ingest(db, env, received_at, events)


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
    db.execute("UPDATE runs SET restarts = 0 WHERE status IN (?, ?) AND restarts > 0",
               (QUEUED, RUNNING))


@dataclass(slots=True)
class Finish:
    """A queued end of a run. The writer applies the finishes that share a batch together
    (`finish_many`), as it does ingests.

    `output` and `error` are JSON text; `started_at` is given when the run's start was never
    written on its own (it finished before that write was due): one UPDATE records both.
    """

    run_id: str
    status: str
    now: int
    output: str | None
    error: str | None
    attempt: StepAttempt | None
    emitted: list[NewEvent]
    started_at: int | None = None
    max_tree_runs: int = MAX_TREE_RUNS
    """The bound on the tree of runs the emitted events' runs join (`within_tree`)."""

    def __call__(self, db: sqlite3.Connection) -> list[str] | None:
        return finish_many(db, [self])[0]


def finish_many(db: sqlite3.Connection, finishes: list[Finish]) -> list[list[str] | None]:
    """End runs, in order; for each, None if its run had already ended (or ended earlier in
    `finishes`), else the ids of the runs its emitted events started.

    The runs' sessions get their activity and failures summed over the batch: one UPDATE a
    session, not one a run (schema version 4 dropped the trigger that did it per run).
    """
    live: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    ids = list(dict.fromkeys(f.run_id for f in finishes))
    for start in range(0, len(ids), 500):  # well under SQLite's limit on parameters
        chunk = ids[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        for run_id, env, identifier, value in db.execute(
                "SELECT r.run_id, r.env, rs.identifier, rs.value FROM runs r "
                "LEFT JOIN run_sessions rs ON rs.run_id = r.run_id "
                f"WHERE r.run_id IN ({marks}) AND r.status IN (?, ?)",
                (*chunk, QUEUED, RUNNING)):
            sessions = live.setdefault(run_id, (env, []))[1]
            if identifier is not None:
                sessions.append((identifier, value))
    results: list[list[str] | None] = []
    ended: list[tuple[Any, ...]] = []
    activity: dict[tuple[str, str, str], list[int]] = {}  # session -> [last active, failed]
    emitted: list[tuple[int, Ingest]] = []
    growing: dict[str, int] = {}  # tree root -> runs this batch adds to it
    for finish in finishes:
        run = live.pop(finish.run_id, None)
        if run is None:
            results.append(None)
            continue
        env, sessions = run
        results.append([])
        if finish.attempt is not None:
            add_attempt(db, finish.run_id, finish.attempt)
        if finish.status == CANCELLED:
            # A cancelled run's pending step stays visible as cancelled rather than "Waiting".
            db.execute("UPDATE steps SET status = ?, ended_at = ?, final = 1 WHERE run_id = ? "
                       "AND status = ?", (CANCELLED, finish.now, finish.run_id, WAITING))
        ended.append((finish.status, finish.now, finish.output, finish.error,
                      finish.started_at, finish.run_id))
        for identifier, value in sessions:
            figures = activity.setdefault((env, identifier, value), [finish.now, 0])
            figures[0] = max(figures[0], finish.now)
            figures[1] += finish.status == FAILED
        if finish.emitted:
            events = within_tree(db, finish.run_id, finish.emitted, finish.max_tree_runs,
                                 growing)
            emitted.append((len(results) - 1, Ingest(env, finish.now, events)))
    if not ended:
        return results
    db.executemany("DELETE FROM waits WHERE run_id = ?", ((row[-1],) for row in ended))
    db.executemany(
        "UPDATE runs SET status = ?, ended_at = ?, output = ?, error = ?, next_at = NULL, "
        "started_at = coalesce(started_at, ?) WHERE run_id = ?", ended)
    # Two statements, so that sessions without a failure leave the failure-rate index alone.
    db.executemany(
        "UPDATE sessions SET last_active = max(last_active, ?) "
        "WHERE env = ? AND identifier = ? AND value = ?",
        ((last, *key) for key, (last, failed) in activity.items() if not failed))
    db.executemany(
        "UPDATE sessions SET last_active = max(last_active, ?), failed_runs = failed_runs + ? "
        "WHERE env = ? AND identifier = ? AND value = ?",
        ((last, failed, *key) for key, (last, failed) in activity.items() if failed))
    identifier_failed: dict[tuple[str, str], int] = {}
    for (row_env, row_ident, _), (_, failed) in activity.items():
        if failed:
            key2 = (row_env, row_ident)
            identifier_failed[key2] = identifier_failed.get(key2, 0) + failed
    db.executemany(
        "UPDATE identifiers SET failed_runs = failed_runs + ? WHERE env = ? AND identifier = ?",
        ((failed, *key) for key, failed in identifier_failed.items()))
    if emitted:
        created = ingest_many(db, [write for _, write in emitted])
        for (index, _), runs in zip(emitted, created, strict=True):
            results[index] = runs
            grow_tree(db, finishes[index].run_id, runs, finishes[index].max_tree_runs,
                      strict=False)
    return results


def within_tree(db: sqlite3.Connection, run_id: str, events: list[NewEvent], bound: int,
                growing: dict[str, int]) -> list[NewEvent]:
    """The lifecycle events a run's end emits, with the runs they would start left out when
    those would grow the run's tree of runs past `bound` (functions triggered by each other's
    `inngest/function.finished` can fan out without end). The end itself is always recorded:
    the events are stored, start nothing, and a warning says why. `growing` holds what
    earlier ends in the same batch add to each tree (not written yet)."""
    wanted = sum(len(ev.runs) for ev in events)
    if not wanted:
        return events
    row = db.execute("SELECT coalesce(r.tree, r.run_id), coalesce(t.runs, 0) FROM runs r "
                     "LEFT JOIN run_trees t ON t.root = coalesce(r.tree, r.run_id) "
                     "WHERE r.run_id = ?", (run_id,)).fetchone()
    if row is None:
        return events
    root, total = row[0], row[1] + growing.get(row[0], 0) + wanted
    if total <= bound:
        growing[root] = growing.get(root, 0) + wanted
        return events
    log.warning("%s", RunTreeTooLarge(root, total, bound).lifecycle_message(run_id))
    return [dataclasses.replace(ev, runs=()) for ev in events]


# ---------------------------------------------------------------------------------------------
# Reads (each runs in the reader thread)


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
    params: list[Any] = [env, ident, value]
    after = ""  # a fixed fragment, the only thing the f-string below interpolates
    if cursor is not None:
        after = "AND rs.run_id < ?"
        params.extend(decode_cursor(cursor, 1))
    runs = [run_from_row(r) for r in db.execute(
        "SELECT r.* FROM run_sessions rs JOIN runs r ON r.run_id = rs.run_id "
        f"WHERE rs.env = ? AND rs.identifier = ? AND rs.value = ? {after} "
        "ORDER BY rs.run_id DESC LIMIT ?", (*params, limit + 1))]
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
            "SELECT * FROM runs WHERE env = ? AND function_id = ? AND status IN (?, ?) "
            "AND run_id < ?", (env, function_id, QUEUED, RUNNING, before_internal_id))
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
    return [event_from_row(r) for r in db.execute(
        "SELECT e.* FROM event_sessions es JOIN events e ON e.internal_id = es.internal_id "
        "WHERE es.env = ? AND es.identifier = ? AND es.value = ? ORDER BY es.internal_id",
        (env, identifier, value))]


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
