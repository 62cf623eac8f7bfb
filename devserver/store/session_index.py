"""Which events carried a session: indexed shortly after their commit instead of inside it.

Every event row holds its sessions as JSON (`events.sessions`), which is what makes it part of
a session, durably, at its commit. The index that finds a session's events (`event_sessions`,
one row per event and session, in session order) is written in passes a little later: a pass
(`IndexPass`, queued by the writer `INDEX_EVERY` seconds after commits) indexes every event
stored after the last one it indexed, by rowid, in one statement. Written per commit, those
rows land on as many scattered pages as the commit has events (a conversation's newest rows are
in its own part of the B-tree), and those pages were most of what each commit wrote to the WAL;
written per pass, one page takes all of a session's new rows of the last quarter second.

Readers lose nothing: `session_events` adds the events after the last pass (at most a pass's
worth, usually none) by their JSON, in the same snapshot. `event_sessions_upto` holds the rowid
and id of the last event indexed; if they no longer match (a VACUUM renumbered the rows), the
next pass indexes every event again, ignoring rows that exist.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

INDEX_EVERY = 0.25
"""Seconds from a commit to the pass that indexes its events (and between passes under load)."""
MAX_PER_PASS = 20_000
"""Events one pass indexes at most (about 40 ms of the writer's time); more take more passes."""


def index_events(db: sqlite3.Connection, limit: int = MAX_PER_PASS) -> bool:
    """Index the events stored since the last pass (at most `limit`); True if more remain."""
    upto, upto_id = db.execute("SELECT upto, internal_id FROM event_sessions_upto").fetchone()
    if upto:
        at = db.execute("SELECT internal_id FROM events WHERE rowid = ?", (upto,)).fetchone()
        if at is None or at[0] != upto_id:
            upto = 0  # the rows were renumbered (VACUUM): index them all again
    top = db.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()[0]
    if top <= upto:
        return False
    end = min(top, upto + limit)
    # In session order, so each page of the index is written once per pass.
    db.execute(
        "INSERT OR IGNORE INTO event_sessions (env, identifier, value, internal_id) "
        "SELECT e.env, j.key, j.value, e.internal_id FROM events e, json_each(e.sessions) j "
        "WHERE e.rowid > ? AND e.rowid <= ? ORDER BY 1, 2, 3, 4", (upto, end))
    db.execute("UPDATE event_sessions_upto SET upto = ?, internal_id = "
               "(SELECT internal_id FROM events WHERE rowid = ?)", (end, end))
    return bool(end < top)


@dataclass(frozen=True, slots=True)
class IndexPass:
    """A queued pass of `index_events` (a class, so the writer knows its own passes)."""

    limit: int = MAX_PER_PASS

    def __call__(self, db: sqlite3.Connection) -> bool:
        return index_events(db, self.limit)


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
    # The events after the last pass, by rowid (`+e.env`: not by the env's whole index).
    upto = db.execute("SELECT upto FROM event_sessions_upto").fetchone()[0]
    recent = db.execute(
        "SELECT e.* FROM events e WHERE e.rowid > ? AND +e.env = ? AND e.received_at >= ? "
        "AND EXISTS (SELECT 1 FROM json_each(e.sessions) j WHERE j.key = ? AND j.value = ?)",
        (upto, env, since, identifier, value)).fetchall()
    if not recent:
        return rows
    merged = {row["internal_id"]: row for row in rows}
    merged.update((row["internal_id"], row) for row in recent)
    ordered = [merged[key] for key in sorted(merged)]
    return ordered if limit is None else ordered[:limit]
