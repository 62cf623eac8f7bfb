"""A session's figures (runs, failed runs, first seen, last active): summed in passes shortly
after the commits that change them, instead of inside every commit.

The figures are counters in `sessions` and `identifiers`, in four sort indexes. Updated in every
commit, each event and each run's end moved its sessions' rows and index entries, on as many
scattered pages as the commit had sessions (measured: the end-to-end row ran 1.4 x faster with
them left out entirely; summing them here instead took it 1.17 x faster). So a commit appends
what it changes, one row for a whole group of writes (`add`): `session_deltas` holds, per
session, the earliest and latest activity and the runs and failures to add. A pass (`apply`,
run with the session-index passes, at open and at close) sums every pending row per session and
writes each session once, in session order, and each identifier's sums once.

The deltas commit with the writes they come from, so nothing is lost in a crash: the pass at
open applies what was left. Readers of the figures never see them short: `pending` says whether
any delta waits, and the store then reads through the writer, after applying them, in the same
transaction (`facade.Store`'s counted reads).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

Delta = tuple[str, str, str, int | None, int, int, int]
"""(env, identifier, value, first seen or None, last active, runs to add, failures to add)."""

def add(db: sqlite3.Connection, deltas: Iterable[Delta]) -> None:
    """Record changes to sessions' figures, applied by the next pass (one row for all)."""
    rows = list(deltas)
    if rows:
        db.execute("INSERT INTO session_deltas (deltas) VALUES (?)", (json.dumps(rows),))


def pending(db: sqlite3.Connection) -> bool:
    """Whether some change to sessions' figures waits for a pass."""
    return bool(db.execute("SELECT EXISTS (SELECT 1 FROM session_deltas)").fetchone()[0])


def apply(db: sqlite3.Connection) -> bool:
    """Apply every pending change to the sessions' figures; False if none was pending."""
    rows = db.execute("SELECT id, deltas FROM session_deltas ORDER BY id").fetchall()
    if not rows:
        return False
    # session -> [first seen, last active, runs, failures]
    merged: dict[tuple[str, str, str], list[Any]] = {}
    for _, text in rows:
        for env, identifier, value, first, last, runs, failed in json.loads(text):
            figures = merged.get((env, identifier, value))
            if figures is None:
                merged[env, identifier, value] = [first, last, runs, failed]
                continue
            if first is not None:
                figures[0] = first if figures[0] is None else min(figures[0], first)
            figures[1] = max(figures[1], last)
            figures[2] += runs
            figures[3] += failed
    activity, counted, failing = [], [], []
    identifiers: dict[tuple[str, str], list[int]] = {}  # (env, identifier) -> [runs, failed]
    for key in sorted(merged):  # in session order: each page of a table written once
        first, last, runs, failed = merged[key]
        row = (*key, last if first is None else first, last)
        if failed:
            failing.append((*row, runs, failed))
        elif runs:
            counted.append((*row, runs))
        else:
            activity.append(row)
        if runs or failed:
            sums = identifiers.setdefault(key[:2], [0, 0])
            sums[0] += runs
            sums[1] += failed
    # Three statements, so that a session's run-count and failure indexes are only touched
    # when those figures change. A new session is created by the first (the schema's trigger
    # counts it toward its identifier); first seen is kept by an existing one.
    db.executemany(
        "INSERT INTO sessions (env, identifier, value, first_seen, last_active) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
        "last_active = max(last_active, excluded.last_active)", activity)
    db.executemany(
        "INSERT INTO sessions (env, identifier, value, first_seen, last_active, runs) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
        "last_active = max(last_active, excluded.last_active), runs = runs + excluded.runs",
        counted)
    db.executemany(
        "INSERT INTO sessions (env, identifier, value, first_seen, last_active, runs, "
        "failed_runs) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
        "last_active = max(last_active, excluded.last_active), runs = runs + excluded.runs, "
        "failed_runs = failed_runs + excluded.failed_runs", failing)
    db.executemany(
        "UPDATE identifiers SET runs = runs + ?, failed_runs = failed_runs + ? "
        "WHERE env = ? AND identifier = ?",
        ((runs, failed, *key) for key, (runs, failed) in identifiers.items()))
    db.execute("DELETE FROM session_deltas WHERE id <= ?", (rows[-1][0],))
    return True
