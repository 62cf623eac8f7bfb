"""A run's end: its final status, output or error, last attempt and the lifecycle events it
emits, applied for all the ends of a batch together (`finish_many`: one change a session for
their figures, not one a run, summed by the next pass). The end is always recorded; the runs
its events would start are left out when they would grow the run's tree of runs past its
bound (`within_tree`).
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from devserver.model.limits import MAX_TREE_RUNS, RunTreeTooLarge
from devserver.model.records import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    WAITING,
    NewEvent,
    StepAttempt,
)
from devserver.store import session_counts
from devserver.store.ingest import Ingest, grow_tree, ingest_many
from devserver.store.session_index import run_pairs
from devserver.store.steps import add_attempt

log = logging.getLogger("devserver.store.queries")  # the name operators' filters know


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
    sessions: dict[str, str] | None = None
    """The run's sessions (`runs.sessions`, decoded), when the caller has its record."""

    def __call__(self, db: sqlite3.Connection) -> list[str] | None:
        return finish_many(db, [self])[0]


def finish_many(db: sqlite3.Connection, finishes: list[Finish]) -> list[list[str] | None]:
    """End runs, in order; for each, None if its run had already ended (or ended earlier in
    `finishes`), else the ids of the runs its emitted events started.

    The runs' sessions get their activity and failures summed over the batch, recorded for
    the next pass to apply (`session_counts`).
    """
    live: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    ids = list(dict.fromkeys(f.run_id for f in finishes))
    for start in range(0, len(ids), 500):  # well under SQLite's limit on parameters
        chunk = ids[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        for run_id, env in db.execute(
                f"SELECT run_id, env FROM runs WHERE run_id IN ({marks}) AND status IN (?, ?)",
                (*chunk, QUEUED, RUNNING)):
            live[run_id] = (env, [])
    known = {f.run_id: f.sessions for f in finishes if f.sessions is not None}
    for run_id, pairs in run_pairs(db, list(live), known=known).items():
        live[run_id][1].extend(sorted(pairs))
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
    if db.execute("SELECT 1 FROM waits LIMIT 1").fetchone() is not None:  # else: none to end
        db.executemany("DELETE FROM waits WHERE run_id = ?", ((row[-1],) for row in ended))
    db.executemany(
        "UPDATE runs SET status = ?, ended_at = ?, output = ?, error = ?, next_at = NULL, "
        "started_at = coalesce(started_at, ?) WHERE run_id = ?", ended)
    # The sessions' activity and failures: summed by the next pass (`session_counts`).
    session_counts.add(db, ((*key, None, last, 0, failed)
                            for key, (last, failed) in activity.items()))
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
