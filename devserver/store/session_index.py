"""Which events carried a session: indexed shortly after their commit instead of inside it.

Every event row holds its sessions as JSON (`events.sessions`), which is what makes it part of
a session, durably, at its commit. The index that finds a session's events (`event_sessions`,
one row per event and session, in session order) is written in passes a little later: a pass
(`IndexPass`, queued by the writer `INDEX_EVERY` seconds after commits) indexes every event
stored after the last one it indexed, by rowid, in one statement. Written per commit, those
rows land on as many scattered pages as the commit has events (a conversation's newest rows are
in its own part of the B-tree), and those pages were most of what each commit wrote to the WAL;
written per pass, one page takes all of a session's new rows of the last half second.

Readers lose nothing: `session_events` adds the events after the last pass (at most a pass's
worth, usually none) by their JSON, in the same snapshot. `event_sessions_upto` holds the rowid
and id of the last event indexed; if they no longer match (a VACUUM renumbered the rows), the
next pass indexes every event again, ignoring rows that exist.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from devserver.store import session_counts

NUL = "\\u0000"
"""A NUL as the stored JSON escapes it (and anything else with that text: read in Python)."""
INDEX_EVERY = 0.5
"""Seconds from a commit to the pass that indexes its events (and between passes under load).
At 0.25 s the passes took 7% more of the end-to-end row's time (measured side by side, in
process); 1 s gained nothing more, and readers merge up to a pass's worth of unindexed rows."""
MAX_PER_PASS = 5_000
"""Events one pass indexes at most (about 10 ms of the writer's time); more take more passes,
one after another. Bigger passes cost memory: with 20,000 a pass and passes every 0.5 s, the
server held 96 MB after 1M runs instead of 85-89 MB (the benchmark's memory row)."""


def index_events(db: sqlite3.Connection, limit: int = MAX_PER_PASS) -> bool:
    """Index the events stored since the last pass (at most `limit`); True if more remain."""
    return _index(db, limit, EVENTS)


def index_runs(db: sqlite3.Connection, limit: int = MAX_PER_PASS) -> bool:
    """Index the runs created since the last pass (at most `limit`); True if more remain.
    A run with rows of its own (a batch's, a rerun's: `runs.sessions` holds only the sessions
    its events share) already has these among them."""
    return _index(db, limit, RUNS)


@dataclass(frozen=True, slots=True)
class _Kind:
    """What a pass indexes: the table, its id column, the index and the mark's table."""

    upto: str
    last: str
    top: str
    insert: str
    escaped: str
    insert_one: str
    mark: str


# Every statement spelled out whole, so no SQL is ever assembled from parts.
EVENTS = _Kind(
    upto="SELECT upto, internal_id FROM event_sessions_upto",
    last="SELECT internal_id FROM events WHERE rowid = ?",
    top="SELECT coalesce(max(rowid), 0) FROM events",
    # In session order, so each page of the index is written once per pass.
    insert="INSERT OR IGNORE INTO event_sessions (env, identifier, value, internal_id) "
           "SELECT e.env, j.key, j.value, e.internal_id FROM events e, json_each(e.sessions) j "
           "WHERE e.rowid > ? AND e.rowid <= ? AND instr(e.sessions, ?) = 0 ORDER BY 1, 2, 3, 4",
    escaped="SELECT env, internal_id, sessions FROM events "
            "WHERE rowid > ? AND rowid <= ? AND instr(sessions, ?) > 0",
    insert_one="INSERT OR IGNORE INTO event_sessions (env, identifier, value, internal_id) "
               "VALUES (?, ?, ?, ?)",
    mark="UPDATE event_sessions_upto SET upto = ?, internal_id = "
         "(SELECT internal_id FROM events WHERE rowid = ?)")
RUNS = _Kind(
    upto="SELECT upto, run_id FROM run_sessions_upto",
    last="SELECT run_id FROM runs WHERE rowid = ?",
    top="SELECT coalesce(max(rowid), 0) FROM runs",
    insert="INSERT OR IGNORE INTO run_sessions (env, identifier, value, run_id) "
           "SELECT r.env, j.key, j.value, r.run_id FROM runs r, json_each(r.sessions) j "
           "WHERE r.rowid > ? AND r.rowid <= ? AND instr(r.sessions, ?) = 0 ORDER BY 1, 2, 3, 4",
    escaped="SELECT env, run_id, sessions FROM runs "
            "WHERE rowid > ? AND rowid <= ? AND instr(sessions, ?) > 0",
    insert_one="INSERT OR IGNORE INTO run_sessions (env, identifier, value, run_id) "
               "VALUES (?, ?, ?, ?)",
    mark="UPDATE run_sessions_upto SET upto = ?, run_id = "
         "(SELECT run_id FROM runs WHERE rowid = ?)")


def _index(db: sqlite3.Connection, limit: int, kind: _Kind) -> bool:
    upto, upto_id = db.execute(kind.upto).fetchone()
    if upto:
        at = db.execute(kind.last, (upto,)).fetchone()
        if at is None or at[0] != upto_id:
            upto = 0  # the rows were renumbered (VACUUM): index them all again
    top = db.execute(kind.top).fetchone()[0]
    if top <= upto:
        return False
    end = min(top, upto + limit)
    db.execute(kind.insert, (upto, end, NUL))
    # SQLite's JSON functions cut a string at an escaped NUL: those rows are read here instead.
    db.executemany(kind.insert_one, [
        (env, identifier, value, row_id)
        for env, row_id, text in db.execute(kind.escaped, (upto, end, NUL))
        for identifier, value in sorted(json.loads(text).items())])
    db.execute(kind.mark, (end, end))
    return bool(end < top)


@dataclass(frozen=True, slots=True)
class IndexPass:
    """A queued pass of `index_events` and `index_runs`, which also sums the sessions'
    figures (`session_counts.apply`); a class, so the writer knows its own passes."""

    limit: int = MAX_PER_PASS

    def __call__(self, db: sqlite3.Connection) -> bool:
        session_counts.apply(db)
        events = index_events(db, self.limit)
        return index_runs(db, self.limit) or events


def session_events(
    db: sqlite3.Connection, env: str, identifier: str, value: str, *,
    received_since: int | None = None, limit: int | None = None,
) -> list[sqlite3.Row]:
    """A session's event rows in the order received (by internal id), indexed or not yet:
    those received at or after `received_since`, the first `limit`."""
    since = -1 if received_since is None else received_since  # every received_at is >= 0
    rows = db.execute(
        "SELECT e.* FROM event_sessions es JOIN events e ON e.internal_id = es.internal_id "
        "WHERE es.env = ? AND es.identifier = ? AND es.value = ? AND e.received_at >= ? "
        "ORDER BY es.internal_id LIMIT ?",  # LIMIT -1: no limit
        (env, identifier, value, since, -1 if limit is None else limit)).fetchall()
    # The events after the last pass, by rowid (`+e.env`: not by the env's whole index), and
    # their sessions read in Python (SQLite's JSON functions cut a string at a NUL).
    upto = db.execute("SELECT upto FROM event_sessions_upto").fetchone()[0]
    recent = [row for row in db.execute(
        "SELECT e.* FROM events e WHERE e.rowid > ? AND +e.env = ? AND e.received_at >= ?",
        (upto, env, since)) if json.loads(row["sessions"]).get(identifier) == value]
    if not recent:
        return rows
    merged = {row["internal_id"]: row for row in rows}
    merged.update((row["internal_id"], row) for row in recent)
    ordered = [merged[key] for key in sorted(merged)]
    return ordered if limit is None else ordered[:limit]


INDEXED_RUNS = "(SELECT run_id FROM run_sessions WHERE env = ? AND identifier = ? AND value = ?)"
"""A session's indexed runs, as a subquery `rs` (run_id) its parameters fill."""
LISTED_RUNS = "(SELECT value AS run_id FROM json_each(?))"
"""Runs named by a JSON array, as a subquery `rs`: the session's runs after the last pass."""


def run_sources(db: sqlite3.Connection, env: str, identifier: str,
                value: str) -> list[tuple[str, tuple[str, ...]]]:
    """Where a session's runs are, as (subquery, its parameters): its indexed runs, and those
    after the last pass (when there are any) found by their JSON. A reader runs its query over
    each and merges them with `merge_runs`."""
    sources: list[tuple[str, tuple[str, ...]]] = [(INDEXED_RUNS, (env, identifier, value))]
    recent = [run_id for run_id, sessions in unindexed_runs(db, env)
              if sessions.get(identifier) == value]
    if recent:
        sources.append((LISTED_RUNS, (json.dumps(recent),)))
    return sources


def unindexed_runs(db: sqlite3.Connection, env: str, status: str | None = None,
                   ) -> list[tuple[str, dict[str, str]]]:
    """The runs of `env` after the last pass (of `status`, if given), with their sessions."""
    upto = db.execute("SELECT upto FROM run_sessions_upto").fetchone()[0]
    return [(run_id, json.loads(sessions)) for run_id, sessions in db.execute(
        "SELECT run_id, sessions FROM runs WHERE rowid > ? AND +env = ? "
        "AND (? IS NULL OR status = ?)", (upto, env, status, status))]


def merge_runs(parts: list[list[sqlite3.Row]], *, newest_first: bool,
               limit: int | None = None) -> list[sqlite3.Row]:
    """Rows of runs from several sources: each run once, in run-id order, the first `limit`."""
    if len(parts) == 1:
        return parts[0]
    by_id = {row[0]: row for rows in parts for row in rows}
    ordered = [by_id[key] for key in sorted(by_id, reverse=newest_first)]
    return ordered if limit is None else ordered[:limit]


def run_pairs(db: sqlite3.Connection, run_ids: list[str], *,
              known: dict[str, dict[str, str]] | None = None,
              ) -> dict[str, set[tuple[str, str]]]:
    """The (identifier, value) sessions of each run: its rows, and its JSON (a run after the
    last pass has no rows yet). `known`: the JSON of some runs, decoded already (the caller's
    records: a run's sessions never change), which is then not read again."""
    pairs: dict[str, set[tuple[str, str]]] = {run_id: set() for run_id in run_ids}
    unknown: list[str] = []  # the runs whose JSON is read here
    for run_id in run_ids:
        sessions = known.get(run_id) if known else None
        if sessions is None:
            unknown.append(run_id)
        else:
            pairs[run_id].update(sessions.items())
    for start in range(0, len(run_ids), 500):  # well under SQLite's limit on parameters
        chunk = run_ids[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        for run_id, identifier, value in db.execute(
                f"SELECT run_id, identifier, value FROM run_sessions WHERE run_id IN ({marks})",
                chunk):
            pairs[run_id].add((identifier, value))
    for start in range(0, len(unknown), 500):
        chunk = unknown[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        for run_id, sessions in db.execute(
                f"SELECT run_id, sessions FROM runs WHERE run_id IN ({marks})", chunk):
            pairs[run_id].update(json.loads(sessions).items())
    return pairs
