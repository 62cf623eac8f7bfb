"""What a SQLite error means for the store's callers: the file's or the disk's fault (locked,
read-only, damaged, deleted, full) or a write's own, and the one clear line that says so.

A fault fails a whole batch of writes with `StoreUnavailable` (503) or `StoreFull` (507); one
log line says so, at most one every `FAULT_LOG_EVERY` seconds, and one more once writes succeed
again. Opening a database probes the file for the same faults so that they fail at start with
one `ConfigError` line instead of at the first write.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

from devserver.errors import ConfigError, StoreFull, StoreUnavailable
from devserver.store.schema import BUSY_TIMEOUT_MS

log = logging.getLogger("devserver.store.facade")  # the name operators' filters know

FAULT_LOG_EVERY = 10.0
"""Seconds between log lines about the same database fault."""
QUICK_CHECK_MAX_BYTES = 16 * 1024 * 1024
"""Files up to this size get `PRAGMA quick_check` at open (about 2 ms a MB); larger ones
only the cheap checks, and damage found later fails the writes it touches (503)."""

BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
FAULTS = BUSY | DAMAGED | {
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOLFS}
"""SQLite's primary result codes that are the file's or the disk's fault, not a write's."""


def primary(exc: BaseException) -> int | None:
    """SQLite's primary result code of an exception, None if it is not SQLite's."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    return None if code is None else int(code) & 0xFF


def is_fault(exc: BaseException) -> bool:
    return primary(exc) in FAULTS


def _writable(path: Path) -> bool:
    """Whether this process may write the file (if it exists) and create files beside it."""
    if path.exists() and not os.access(path, os.W_OK):
        return False
    return os.access(path.parent, os.W_OK)


def _disk_full(path: Path) -> bool:
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def open_error(requested: str, path: Path, exc: OSError | sqlite3.Error) -> str:
    """The one line saying why the database `requested` (opened at `path`) can't be opened."""
    where = f"cannot open database {requested}"
    code = primary(exc)
    if code in DAMAGED:
        return f"{where}: it is not a database or is damaged ({exc})"
    if code in BUSY:
        return (f"{where}: it is locked by another process (waited "
                f"{BUSY_TIMEOUT_MS / 1000:g} s: {exc}); end that process's transaction "
                "or use another --db")
    if code == sqlite3.SQLITE_READONLY or (
            code == sqlite3.SQLITE_CANTOPEN and not _writable(path)) or (
            isinstance(exc, OSError) and not _writable(path)):
        return (f"{where}: it is read-only ({exc}); make the file and its directory "
                "writable or use another --db")
    if code == sqlite3.SQLITE_FULL:
        return f"{where}: the disk is full ({exc})"
    return f"{where}: {exc}"


def fault_error(path: Path, exc: BaseException) -> StoreUnavailable | None:
    """The error to give callers for a fault of the file or disk; None for other errors
    (a write's own, or a bug)."""
    code = primary(exc)
    if code not in FAULTS:
        return None
    if code in BUSY:
        return StoreUnavailable(f"the database {path} is locked by another process "
                                f"({exc}); retry once it is released")
    if code == sqlite3.SQLITE_READONLY:
        return StoreUnavailable(f"the database {path} is read-only ({exc}); make it "
                                "writable and retry")
    if code in DAMAGED:
        return StoreUnavailable(f"the database {path} is damaged ({exc}); stop devserver "
                                "and restore or delete the file")
    if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and _disk_full(path)):
        return StoreFull(f"disk full writing {path} ({exc}); free some space and retry")
    return StoreUnavailable(f"cannot write the database {path} ({exc}); retry")


def quick_check(db: sqlite3.Connection, requested: str, path: Path) -> None:
    """`PRAGMA quick_check` on a file up to `QUICK_CHECK_MAX_BYTES`: `ConfigError` if damaged."""
    if path.stat().st_size > QUICK_CHECK_MAX_BYTES:
        return
    found = db.execute("PRAGMA quick_check(1)").fetchone()[0]
    if found != "ok":
        raise ConfigError(f"cannot open database {requested}: it is damaged "
                          f"(quick_check: {' '.join(str(found).split())})")


def probe_write(db: sqlite3.Connection) -> None:
    """Write and roll back: a read-only or locked file fails here, at open, not at the first
    write. (BEGIN IMMEDIATE alone succeeds on a read-only file in WAL mode.) The write sets
    the header's application id, which devserver leaves at 0, to 0: never committed anyway."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("PRAGMA application_id = 0")
    finally:
        db.execute("ROLLBACK")


class FaultLog:
    """One log line per database fault, at most one every FAULT_LOG_EVERY seconds; one more
    when writes succeed again."""

    def __init__(self) -> None:
        self._message: str | None = None
        self._at = 0.0
        self._refused = 0

    @property
    def message(self) -> str | None:
        """The fault that refused the latest writes, None once writes succeed again."""
        return self._message

    def refused(self, error: StoreUnavailable, writes: int) -> None:
        self._refused += writes
        now = time.monotonic()
        if error.message != self._message or now - self._at >= FAULT_LOG_EVERY:
            log.error("database write failed: %s (%d write(s) refused)", error.message,
                      self._refused)
            self._message, self._at, self._refused = error.message, now, 0

    def recovered(self) -> None:
        if self._message is not None:
            log.warning("database writes succeed again (after: %s)", self._message)
            self._message, self._refused = None, 0
