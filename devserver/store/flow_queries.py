"""The queries of flow control (SPEC 3.3): the state its decisions read and write, in the
same transaction as the events they are about, so that a decision and its event are stored
together or not at all (a restart or `kill -9` finds both or neither).

The decisions themselves are `devserver.model.flow`'s; here they get their state: pending
debounces and batches (`flow_pending`, one per function and key, whose id is the id of the run
it will start), the marks that rate limits, idempotency keys and singletons count
(`flow_marks`), each throttle key's theoretical arrival time (`flow_throttle`), what flow
control did with each event (`flow_outcomes`), a batched run's events (`run_events`) and the
notes that say why a run is queued or was cancelled (`run_notes`).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from devserver.clock import iso
from devserver.jsontext import dump_json
from devserver.model import flow
from devserver.model.flow import FlowConfig, FlowOutcome, FlowRequest
from devserver.model.records import QUEUED, RUNNING, NewEvent
from devserver.store import session_counts

QUEUED_NOTE, CANCELLED_NOTE, STARTED_NOTE = "queued", "cancelled", "started"


def _mark(db: sqlite3.Connection, env: str, function_id: str, kind: str, key: str, at: int,
          run_id: str) -> None:
    db.execute("INSERT INTO flow_marks (env, function_id, kind, key, at, run_id) "
               "VALUES (?, ?, ?, ?, ?, ?)", (env, function_id, kind, key, at, run_id))


def _forget_marks(db: sqlite3.Connection, env: str, function_id: str, kind: str, key: str,
                  before: int) -> None:
    db.execute("DELETE FROM flow_marks WHERE env = ? AND function_id = ? AND kind = ? "
               "AND key = ? AND at <= ?", (env, function_id, kind, key, before))


def _record(db: sqlite3.Connection, internal_id: str, function_id: str, now: int,
            outcome: FlowOutcome) -> FlowOutcome:
    db.execute(
        "INSERT OR REPLACE INTO flow_outcomes (internal_id, function_id, action, run_id, "
        "detail, at) VALUES (?, ?, ?, ?, ?, ?)",
        (internal_id, function_id, outcome.action, outcome.run_id, outcome.detail, now))
    return outcome


def note_run(db: sqlite3.Connection, run_id: str, kind: str, text: str, at: int) -> None:
    """Say why a run is queued (`queued`) or was cancelled (`cancelled`). A run found
    waiting for its turn was not executing: the restarts it was counted at don't count
    (it would otherwise be failed as one that ends the process, after a few restarts)."""
    db.execute("INSERT OR REPLACE INTO run_notes (run_id, kind, text, at) VALUES (?, ?, ?, ?)",
               (run_id, kind, text, at))
    if kind == QUEUED_NOTE:
        db.execute("UPDATE runs SET restarts = 0 WHERE run_id = ?", (run_id,))


def apply_flow(db: sqlite3.Connection, env: str, now: int, ev: NewEvent,
               req: FlowRequest) -> FlowOutcome:
    """Decide what an event (stored by this same write) does for a function under flow
    control, store the decision and its state, and return it."""
    cfg, keys, fn = req.config, req.keys, req.function_id
    marks: list[tuple[str, str, int]] = []  # (kind, key, at) the event counts toward
    if "idempotency" in keys:
        key = keys["idempotency"]
        _forget_marks(db, env, fn, "idempotency", key, now - flow.IDEMPOTENCY_MS)
        row = db.execute("SELECT run_id FROM flow_marks WHERE env = ? AND function_id = ? "
                         "AND kind = 'idempotency' AND key = ? LIMIT 1",
                         (env, fn, key)).fetchone()
        if row is not None:
            return _record(db, ev.internal_id, fn, now, FlowOutcome(
                flow.IDEMPOTENT_DROPPED, run_id=row[0],
                detail=f"idempotency key {key!r} already started run {row[0]} within 24 h"))
        marks.append(("idempotency", key, now))
    if cfg.rate_limit is not None:
        rule, key = cfg.rate_limit, keys["rate"]
        _forget_marks(db, env, fn, "rate", key, now - rule.period_ms)
        recent = db.execute("SELECT count(*) FROM flow_marks WHERE env = ? AND function_id = ? "
                            "AND kind = 'rate' AND key = ?", (env, fn, key)).fetchone()[0]
        if not flow.rate_allows(rule, recent):
            return _record(db, ev.internal_id, fn, now, FlowOutcome(
                flow.RATE_LIMITED, detail=f"rate limit of {rule.limit} per "
                f"{rule.period_ms / 1000:g} s reached" + (f" for key {key!r}" if key else "")))
        marks.append(("rate", key, now))
    if cfg.debounce is not None:
        outcome = _debounce(db, env, now, ev, req)
    elif cfg.batch is not None and req.batched:
        outcome = _batch(db, env, now, ev, req)
    else:
        outcome = start_run(db, env, now, fn, cfg, req.run_id, [ev.internal_id], keys)
    if outcome.run_id is not None and outcome.action != flow.SINGLETON_SKIPPED:
        for kind, key, at in marks:
            _mark(db, env, fn, kind, key, at, outcome.run_id)
    return _record(db, ev.internal_id, fn, now, outcome)


def _pending(db: sqlite3.Connection, env: str, function_id: str, kind: str,
             key: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT * FROM flow_pending WHERE env = ? AND function_id = ? AND kind = ? AND key = ?",
        (env, function_id, kind, key)).fetchone()
    return row


def _debounce(db: sqlite3.Connection, env: str, now: int, ev: NewEvent,
              req: FlowRequest) -> FlowOutcome:
    rule = req.config.debounce
    assert rule is not None
    key = req.keys["debounce"]
    row = _pending(db, env, req.function_id, flow.DEBOUNCE, key)
    if row is None:
        pending_id, due = req.run_id, flow.debounce_due(rule, now, None)
        db.execute(
            "INSERT INTO flow_pending (pending_id, env, function_id, kind, key, first_at, "
            "due_at, events, keys) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (pending_id, env, req.function_id, flow.DEBOUNCE, key, now, due,
             dump_json([ev.internal_id]), dump_json(req.keys)))
    else:
        pending_id, due = row["pending_id"], flow.debounce_due(rule, now, row["first_at"])
        db.execute("UPDATE flow_pending SET due_at = ?, events = ?, keys = ? "
                   "WHERE pending_id = ?",
                   (due, dump_json([ev.internal_id]), dump_json(req.keys), pending_id))
    return FlowOutcome(flow.DEBOUNCED, run_id=pending_id, pending_id=pending_id,
                       pending_due=due, detail="debounced: the run starts with the last "
                       "event once none arrived for the period")


def _batch(db: sqlite3.Connection, env: str, now: int, ev: NewEvent,
           req: FlowRequest) -> FlowOutcome:
    rule = req.config.batch
    assert rule is not None
    key = req.keys["batch"]
    row = _pending(db, env, req.function_id, flow.BATCH, key)
    events = [ev.internal_id] if row is None else [*json.loads(row["events"]), ev.internal_id]
    pending_id = req.run_id if row is None else row["pending_id"]
    first_at = now if row is None else row["first_at"]
    if flow.batch_full(rule, len(events)):
        if row is not None:
            db.execute("DELETE FROM flow_pending WHERE pending_id = ?", (pending_id,))
        keys = req.keys if row is None else json.loads(row["keys"])
        started = start_run(db, env, now, req.function_id, req.config, pending_id, events, keys)
        if started.action == flow.SINGLETON_SKIPPED:
            _skip_batch(db, req.function_id, pending_id, started.detail)
            return started
        started.action = flow.BATCHED
        started.detail = f"batched: run of {len(events)} event(s) (batch full)"
        note_run(db, pending_id, STARTED_NOTE, f"batched: {len(events)} event(s), the batch "
                 f"was full ({rule.max_size})", now)
        return started
    due = flow.batch_due(rule, first_at)
    if row is None:
        db.execute(
            "INSERT INTO flow_pending (pending_id, env, function_id, kind, key, first_at, "
            "due_at, events, keys) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (pending_id, env, req.function_id, flow.BATCH, key, now, due, dump_json(events),
             dump_json(req.keys)))
    else:
        db.execute("UPDATE flow_pending SET events = ? WHERE pending_id = ?",
                   (dump_json(events), pending_id))
    return FlowOutcome(flow.BATCHED, run_id=pending_id, pending_id=pending_id, pending_due=due,
                       detail=f"batched: event {len(events)} of at most {rule.max_size}")


def _skip_batch(db: sqlite3.Connection, function_id: str, run_id: str, detail: str) -> None:
    """A batch (or debounce) whose run singleton skipped: its events say so."""
    db.execute("UPDATE flow_outcomes SET action = ?, detail = ?, run_id = NULL "
               "WHERE function_id = ? AND run_id = ?",
               (flow.SINGLETON_SKIPPED, detail, function_id, run_id))


def start_run(db: sqlite3.Connection, env: str, now: int, function_id: str, cfg: FlowConfig,
              run_id: str, event_ids: list[str], keys: dict[str, str]) -> FlowOutcome:
    """Create a run of these events unless singleton skips it; throttle sets when it may
    start. Returns the outcome (`run_created`, `start_at`, `cancel_run`)."""
    cancel: str | None = None
    if cfg.singleton is not None:
        key = keys.get("singleton", "")
        row = db.execute(
            "SELECT m.run_id FROM flow_marks m JOIN runs r ON r.run_id = m.run_id "
            "WHERE m.env = ? AND m.function_id = ? AND m.kind = 'singleton' AND m.key = ? "
            "AND r.status IN (?, ?) LIMIT 1", (env, function_id, key, QUEUED, RUNNING)).fetchone()
        if row is not None and cfg.singleton.mode == "skip":
            return FlowOutcome(flow.SINGLETON_SKIPPED, run_id=row[0],
                               detail=f"skipped by singleton: run {row[0]} is still running")
        if row is not None:
            cancel = row[0]
        db.execute("DELETE FROM flow_marks WHERE env = ? AND function_id = ? "
                   "AND kind = 'singleton' AND key = ?", (env, function_id, key))
        _mark(db, env, function_id, "singleton", key, now, run_id)
    start = now
    if cfg.throttle is not None:
        key = keys.get("throttle", "")
        row = db.execute("SELECT tat FROM flow_throttle WHERE env = ? AND function_id = ? "
                         "AND key = ?", (env, function_id, key)).fetchone()
        start, tat = flow.throttle_start(cfg.throttle, now, None if row is None else row[0])
        db.execute("INSERT INTO flow_throttle (env, function_id, key, tat) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT DO UPDATE SET tat = excluded.tat", (env, function_id, key, tat))
    create_run(db, env, now, run_id, function_id, event_ids, start)
    outcome = FlowOutcome(flow.STARTED, run_id=run_id, run_created=True, start_at=start,
                          cancel_run=cancel, detail="started")
    if start > now:
        outcome.action = flow.THROTTLED
        outcome.detail = (f"throttled: at most {cfg.throttle.limit if cfg.throttle else 0} "
                          "start(s) per period; the run waits its turn")
        note_run(db, run_id, QUEUED_NOTE, f"throttled: waits for its turn (limit "
                 f"{cfg.throttle.limit if cfg.throttle else 0} per period) until {iso(start)}", now)
    if cancel is not None:
        outcome.action = flow.SINGLETON_CANCELLED
        outcome.detail = f"singleton: cancelled run {cancel} and started this one"
    return outcome


def create_run(db: sqlite3.Connection, env: str, now: int, run_id: str, function_id: str,
               event_ids: list[str], next_at: int) -> None:
    """A Queued run of stored events (one, or a batch's): it counts once in every session any
    of them carries; its own sessions (`ctx.sessions`) are those they all share."""
    rows: dict[str, tuple[str, dict[str, str]]] = {}
    for start in range(0, len(event_ids), 500):
        chunk = event_ids[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        for internal_id, name, sessions in db.execute(
                f"SELECT internal_id, name, sessions FROM events WHERE internal_id IN ({marks})",
                chunk):
            rows[internal_id] = (name, json.loads(sessions))
    ordered = [eid for eid in event_ids if eid in rows]
    if not ordered:
        return
    every = [rows[eid][1] for eid in ordered]
    db.execute(
        "INSERT INTO runs (run_id, env, function_id, event_id, event_name, status, queued_at, "
        "next_at, sessions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, env, function_id, ordered[0], rows[ordered[0]][0], QUEUED, now, next_at,
         dump_json(flow.shared_sessions(every))))
    if len(ordered) > 1:
        db.executemany("INSERT INTO run_events (run_id, seq, internal_id) VALUES (?, ?, ?)",
                       ((run_id, seq, eid) for seq, eid in enumerate(ordered)))
    pairs = flow.all_sessions(every)
    db.executemany("INSERT INTO run_sessions (env, identifier, value, run_id) "
                   "VALUES (?, ?, ?, ?)", ((env, i, v, run_id) for i, v in pairs))
    # Queued is no activity yet (SPEC 2.3): the run counts, its last activity is unchanged.
    session_counts.add(db, ((env, i, v, None, 0, 1, 0) for i, v in pairs))
    db.executemany("INSERT OR IGNORE INTO session_functions (env, identifier, value, "
                   "function_id) VALUES (?, ?, ?, ?)",
                   ((env, i, v, function_id) for i, v in pairs))


def fire_pending(db: sqlite3.Connection, pending_id: str, now: int,
                 cfg: FlowConfig | None) -> FlowOutcome | None:
    """A debounce or batch whose time came: its run, created (None when it is gone, e.g.
    fired already; an outcome with a later `pending_due` when a new event pushed it back)."""
    row = db.execute("SELECT * FROM flow_pending WHERE pending_id = ?",
                     (pending_id,)).fetchone()
    if row is None:
        return None
    if row["due_at"] > now:
        return FlowOutcome(row["kind"], run_id=pending_id, pending_id=pending_id,
                           pending_due=row["due_at"])
    db.execute("DELETE FROM flow_pending WHERE pending_id = ?", (pending_id,))
    events = json.loads(row["events"])
    outcome = start_run(db, row["env"], now, row["function_id"], cfg or FlowConfig(),
                        pending_id, events, json.loads(row["keys"]))
    if outcome.action == flow.SINGLETON_SKIPPED:
        _skip_batch(db, row["function_id"], pending_id, outcome.detail)
    elif row["kind"] == flow.DEBOUNCE:
        note_run(db, pending_id, STARTED_NOTE, "debounced: started with the last event once "
                 "the period passed without a new one", now)
    else:
        note_run(db, pending_id, STARTED_NOTE, f"batched: {len(events)} event(s), at the "
                 "batch's timeout", now)
    return outcome


def read_pending(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(pending id, function id, when due) of every pending debounce and batch."""
    return [(r[0], r[1], r[2]) for r in db.execute(
        "SELECT pending_id, function_id, due_at FROM flow_pending")]


def read_pending_count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM flow_pending").fetchone()[0])


def read_outcomes(db: sqlite3.Connection, internal_id: str) -> list[dict[str, Any]]:
    """What flow control did with an event, per function."""
    return [{"function_id": r[0], "action": r[1], "run_id": r[2], "detail": r[3]}
            for r in db.execute("SELECT function_id, action, run_id, detail FROM flow_outcomes "
                                "WHERE internal_id = ? ORDER BY function_id", (internal_id,))]


def read_notes(db: sqlite3.Connection, run_id: str) -> dict[str, str]:
    """Why a run is (or was) queued, and why it was cancelled."""
    return {r[0]: r[1] for r in db.execute("SELECT kind, text FROM run_notes WHERE run_id = ?",
                                           (run_id,))}


def read_run_event_ids(db: sqlite3.Connection, run_id: str) -> list[str]:
    """A batched run's events, in order (empty for a run of one event)."""
    return [r[0] for r in db.execute(
        "SELECT internal_id FROM run_events WHERE run_id = ? ORDER BY seq", (run_id,))]
