"""Group commit: the queued writes of one batch applied in one transaction.

Each write runs inside its own savepoint, so one failing write does not undo the others; its
caller gets its exception and the rest commit. Two kinds of write are applied in groups of a
few statements for the whole group: the event API's ingests and run ends queued one after
another (`apply_batch` says why that order is safe). A fault of the file or disk
(`faults.is_fault`) is not one write's: it fails the whole batch and nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from devserver.store import ingest, run_ends
from devserver.store.faults import is_fault

log = logging.getLogger("devserver.store.facade")  # the name operators' filters know

Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
"""A queued write: the function, and the caller's future."""


def apply_batch(db: sqlite3.Connection, *, batch: list[Write]) -> list[Any]:
    """Apply queued writes in one transaction; each gets its result or its exception.

    Two kinds of write are applied in groups, a few statements for a whole group instead of a
    few a write: the event API's ingests, all together before the other writes, and run ends
    that follow one another in the queue. Ingests may move first because they only create
    rows no other write of the batch knows of; the one write that reads what an ingest
    writes, the duplicate-id check, then sees the batch's requests as having come first, as
    true an order as any for writes in flight together. Run ends never move: a run's end may
    be followed by another caller's write for the same run (a cancelled run's next step),
    which must find it ended. A group that fails is applied again one write at a time, each
    in its own savepoint like every other write, so only a bad one fails.
    """
    results: list[Any] = [None] * len(batch)
    ingests = [i for i, (fn, _) in enumerate(batch) if isinstance(fn, ingest.Ingest)]
    ends: list[int] = []  # consecutive run ends not applied yet
    if db.in_transaction:  # left open by a ROLLBACK that failed
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    try:
        if len(ingests) > 1:
            _apply_together(db, batch, ingests, ingest.ingest_many, results)
        else:
            ingests = []
        applied = set(ingests)
        for index, (fn, _) in enumerate(batch):
            if index in applied:
                continue
            if isinstance(fn, run_ends.Finish):
                ends.append(index)
                continue
            _apply_ends(db, batch, ends, results)
            results[index] = _apply_one(db, fn)
        _apply_ends(db, batch, ends, results)
        db.execute("COMMIT")
    except BaseException:
        # A fault may have rolled the transaction back already (SQLITE_FULL does); a
        # ROLLBACK that fails too is tried again before the next batch.
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("rollback after a failed batch failed too", exc_info=True)
        raise
    return results


def _apply_one(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """One write's result, or the exception it raised (and nothing of it applied)."""
    db.execute("SAVEPOINT w")
    try:
        result = fn(db)
    except Exception as exc:  # handed to the caller who queued it
        if is_fault(exc):  # the file's or disk's fault: the whole batch fails
            raise
        db.execute("ROLLBACK TO w")
        result = exc
    db.execute("RELEASE w")
    return result


def _apply_ends(db: sqlite3.Connection, batch: list[Write], ends: list[int],
                results: list[Any]) -> None:
    """Apply the pending run ends (together when there are several) and forget them."""
    if len(ends) > 1:
        _apply_together(db, batch, ends, run_ends.finish_many, results)
    elif ends:
        results[ends[0]] = _apply_one(db, batch[ends[0]][0])
    ends.clear()


def _apply_together(db: sqlite3.Connection, batch: list[Write], positions: list[int],
                    apply_many: Callable[[sqlite3.Connection, list[Any]], list[Any]],
                    results: list[Any]) -> None:
    """Apply the writes at `positions` with one `apply_many` call; one by one if it fails."""
    db.execute("SAVEPOINT together")
    try:
        for index, result in zip(positions, apply_many(db, [batch[i][0] for i in positions]),
                                 strict=True):
            results[index] = result
    except Exception as exc:  # applied one by one, where a failure is reported
        if is_fault(exc):
            raise
        db.execute("ROLLBACK TO together")
        for index in positions:
            results[index] = _apply_one(db, batch[index][0])
    db.execute("RELEASE together")
