"""SQLite storage: the connections, the single batching writer, and the async API over them.

All SQL in the project lives in the store: the schema and migrations in `schema`, the queries
in `queries`, the connections here. Callers pass and get plain dataclasses, never cursors.
Every query is in `queries`: the only statements here are the writer's and reader's own
transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT) and the connections' PRAGMAs.

One owner for writes: every write is a small function queued to the writer task, which applies
all pending writes in one transaction (each inside its own savepoint, so one failing write does
not undo the others; the event API's ingests, and run ends queued one after another, each as a
group in a few statements), commits once and only then resolves the callers' futures. A
caller that awaits a write therefore knows it is durable; under load many writes share one
commit.
The writer runs its batches on the event loop's own thread: a batch is a few C-level
`executemany` calls and one commit (WAL, no fsync per commit), cheaper than handing it to a
thread and trading the GIL back and forth for every request (measured in `devserver.bench`).
Reads use their own connection (aiosqlite, in its thread); with WAL they never wait for the
writer.

Because the writer is on the loop, it must never wait inside SQLite: its busy timeout is 0.
When another process holds the write lock, the writer gives the loop back and tries again
(`LOCK_WAIT` at most, then the batch fails). A fault of the file or disk (locked, read-only,
damaged, deleted, full) fails the whole batch with `StoreUnavailable` (503) or `StoreFull`
(507) and stores nothing of it; one log line says so (at most one every `FAULT_LOG_EVERY`
seconds), and the next batch tries again, so writes succeed once the cause is gone. A
database deleted or replaced under the server is the exception: every later write is refused
(it would go to a file no one will see again) until devserver is restarted. Opening probes the
file: a write that is rolled back (read-only, locked) and, for files up to
`QUICK_CHECK_MAX_BYTES`, `PRAGMA quick_check` (damaged); each fails with one clear
`ConfigError`.

Per-session figures are counters kept up to date by the writes that change them (run created,
started, finished), so reading them never scans runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from devserver.errors import ConfigError, StoreFull, StoreUnavailable
from devserver.jsontext import dump_json
from devserver.model.flow import FlowConfig, FlowOutcome
from devserver.model.limits import MAX_TREE_RUNS
from devserver.model.metadata import MetadataUpdate
from devserver.model.records import (
    COMPLETED,
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
from devserver.store import flow_queries, listing, queries
from devserver.store.schema import BUSY_TIMEOUT_MS, connect_pragmas, migrate
from devserver.store.schema import SCHEMA as SCHEMA
from devserver.store.schema import SCHEMA_VERSION as SCHEMA_VERSION

log = logging.getLogger(__name__)
T = TypeVar("T")



MAX_BATCH = 512
LOCK_WAIT = 1.0
"""Seconds a batch waits for another process's write lock before its writes fail (503)."""
LOCK_RETRY_FIRST, LOCK_RETRY_MAX = 0.005, 0.05
"""Seconds between tries for the lock: doubling from the first to the max."""
FAULT_LOG_EVERY = 10.0
"""Seconds between log lines about the same database fault."""
CHECKPOINT_EVERY = 0.25
"""Seconds between background WAL checkpoints while there are commits to copy."""
QUICK_CHECK_MAX_BYTES = 16 * 1024 * 1024
"""Files up to this size get `PRAGMA quick_check` at open (about 2 ms a MB); larger ones
only the cheap checks, and damage found later fails the writes it touches (503)."""

_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_FAULTS = _BUSY | _DAMAGED | {
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOLFS}
"""SQLite's primary result codes that are the file's or the disk's fault, not a write's."""


def _primary(exc: BaseException) -> int | None:
    """SQLite's primary result code of an exception, None if it is not SQLite's."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    return None if code is None else int(code) & 0xFF


def _is_fault(exc: BaseException) -> bool:
    return _primary(exc) in _FAULTS


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


class _FaultLog:
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


# ---------------------------------------------------------------------------------------------
# The store


_Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
"""A queued write: the function, and the caller's future."""


class Store:
    """The database: open it, write through the batching writer, read through the reader."""

    def __init__(self, path: str | os.PathLike[str], *, probe_write: bool = True) -> None:
        """`probe_write=False` skips the write probe at open, for a caller that only reads
        (e.g. `export` of a read-only file); its writes still fail with `StoreUnavailable`."""
        self._requested = str(path)
        self._probe_write = probe_write
        self._tmpdir: str | None = None
        self.path: Path = Path(self._requested)
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        # Copies committed pages from the WAL into the file off the loop's thread, so the
        # writer's own (blocking) checkpoint is a rare backstop (schema.connect_pragmas).
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._committed = asyncio.Event()
        self._identity: tuple[int, int] | None = None  # the file's (device, inode) at open
        self._gone: str | None = None  # set once the file is found deleted or replaced
        self._faults = _FaultLog()

    async def open(self) -> None:
        """Create or migrate the database and start the writer. Raises `ConfigError`."""
        if self._requested == ":memory:":
            # Reader and writer need to share one database, which two connections to
            # ":memory:" can't; a private file deleted on close behaves the same.
            self._tmpdir = tempfile.mkdtemp(prefix="devserver-")
            self.path = Path(self._tmpdir) / "devserver.sqlite3"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Open it once synchronously first: a path SQLite can't use fails here, cleanly,
            # instead of inside aiosqlite's worker thread.
            timeout = BUSY_TIMEOUT_MS / 1000
            probe = sqlite3.connect(self.path, timeout=timeout)
            try:
                probe.execute("PRAGMA schema_version")
            finally:
                probe.close()
            # Used only from the event loop's thread (opened here, on it).
            self._writer = sqlite3.connect(self.path, isolation_level=None, timeout=timeout)
            connect_pragmas(self._writer)
            migrate(self._writer)
            if self._probe_write:
                _probe_write(self._writer)
            self._quick_check(self._writer)
            # From now on the writer runs on the loop: it must never wait inside SQLite.
            self._writer.execute("PRAGMA busy_timeout = 0")
            stat = os.stat(self.path)
            self._identity = (stat.st_dev, stat.st_ino)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None,
                                                   timeout=timeout)
            await self._call(self._reader, connect_pragmas)
            await self._call(self._reader, lambda db: db.execute("PRAGMA query_only = ON"))
        except ConfigError:
            await self.close()
            raise
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise ConfigError(self._open_error(exc)) from exc
        self._writer_task = asyncio.create_task(self._write_loop(), name="devserver-writer")
        self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(),
                                                    name="devserver-checkpoint")

    def _quick_check(self, db: sqlite3.Connection) -> None:
        if self.path.stat().st_size > QUICK_CHECK_MAX_BYTES:
            return
        found = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if found != "ok":
            raise ConfigError(f"cannot open database {self._requested}: it is damaged "
                              f"(quick_check: {' '.join(str(found).split())})")

    def _open_error(self, exc: OSError | sqlite3.Error) -> str:
        """The one line saying why the database can't be opened."""
        where = f"cannot open database {self._requested}"
        code = _primary(exc)
        if code in _DAMAGED:
            return f"{where}: it is not a database or is damaged ({exc})"
        if code in _BUSY:
            return (f"{where}: it is locked by another process (waited "
                    f"{BUSY_TIMEOUT_MS / 1000:g} s: {exc}); end that process's transaction "
                    "or use another --db")
        if code == sqlite3.SQLITE_READONLY or (
                code == sqlite3.SQLITE_CANTOPEN and not _writable(self.path)) or (
                isinstance(exc, OSError) and not _writable(self.path)):
            return (f"{where}: it is read-only ({exc}); make the file and its directory "
                    "writable or use another --db")
        if code == sqlite3.SQLITE_FULL:
            return f"{where}: the disk is full ({exc})"
        return f"{where}: {exc}"

    def _fault(self, exc: BaseException) -> StoreUnavailable | None:
        """The error to give callers for a fault of the file or disk; None for other errors
        (a write's own, or a bug)."""
        code = _primary(exc)
        if code not in _FAULTS:
            return None
        path = self.path
        if code in _BUSY:
            return StoreUnavailable(f"the database {path} is locked by another process "
                                    f"({exc}); retry once it is released")
        if code == sqlite3.SQLITE_READONLY:
            return StoreUnavailable(f"the database {path} is read-only ({exc}); make it "
                                    "writable and retry")
        if code in _DAMAGED:
            return StoreUnavailable(f"the database {path} is damaged ({exc}); stop devserver "
                                    "and restore or delete the file")
        if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and _disk_full(path)):
            return StoreFull(f"disk full writing {path} ({exc}); free some space and retry")
        return StoreUnavailable(f"cannot write the database {path} ({exc}); retry")

    def _check_file(self) -> str | None:
        """Why the path no longer names the file that was opened (deleted, replaced)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            pass
        else:
            if (stat.st_dev, stat.st_ino) == self._identity:
                return None
        return (f"the database {self.path} was deleted or replaced while devserver was "
                "running: writes are refused, since a restart would lose them; restart "
                "devserver")

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close both connections."""
        if self._writer_task is not None:
            await self._queue.put(None)
            await self._writer_task
            self._writer_task = None
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
            self._checkpoint_task = None
        if self._checkpointer is not None:
            await self._checkpointer.close()
            self._checkpointer = None
        if self._reader is not None:
            await self._reader.close()
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    @staticmethod
    async def _call(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        # One hop to the connection's thread for a whole unit of work, instead of one per
        # statement. aiosqlite has no public API for this; `_execute` has been stable for years.
        execute = cast(Callable[..., Awaitable[T]], conn._execute)
        return await execute(fn, conn._conn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise RuntimeError("store is not open")
        try:
            return await self._call(self._reader, functools.partial(_in_snapshot, fn=fn))
        except sqlite3.Error as exc:
            fault = self._fault(exc)
            if fault is None:
                raise
            raise fault from exc

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        # A plain function handing back the future (not a coroutine awaiting it): one frame
        # less to create and resume on every write.
        if self._writer_task is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((fn, future))
        return future

    async def _write_loop(self) -> None:
        assert self._writer is not None
        stopping = False
        while not stopping:
            item = await self._queue.get()
            batch: list[_Write] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= MAX_BATCH or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            stopping = item is None
            if not batch:
                continue
            if not stopping and len(batch) < MAX_BATCH:
                # One turn of the loop lets requests already being handled queue their writes
                # too, so they share this commit: the batch grows with the load.
                await asyncio.sleep(0)
                while len(batch) < MAX_BATCH and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
            results, stop = await self._commit(batch)
            self._committed.set()
            stopping = stopping or stop
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _checkpoint_loop(self) -> None:
        """While commits come in, a PASSIVE checkpoint every `CHECKPOINT_EVERY` seconds on
        a connection of its own, in its own thread: it copies the WAL's committed pages into
        the database file and syncs it without holding up the writer, which keeps committing
        meanwhile. A failure (disk full, say) is left to the writer's own checkpoint."""
        while True:
            await self._committed.wait()
            self._committed.clear()
            try:
                if self._checkpointer is None:  # opened at the first commit: a quick start
                    if self._gone is not None or self._check_file() is not None:
                        return  # never create or touch another file at the path
                    self._checkpointer = await aiosqlite.connect(
                        self.path.resolve().as_uri() + "?mode=rw", uri=True, isolation_level=None,
                        timeout=BUSY_TIMEOUT_MS / 1000)
                    await self._call(self._checkpointer, _checkpointer_pragmas)
                await self._call(self._checkpointer,
                                 lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)"))
            except sqlite3.Error:
                log.debug("background checkpoint failed", exc_info=True)
            await asyncio.sleep(CHECKPOINT_EVERY)

    async def _commit(self, batch: list[_Write]) -> tuple[list[Any], bool]:
        """Apply a batch: its writes' results, or the one error every write of it gets
        (nothing of it stored); and whether the end of the queue was taken meanwhile.

        Waits for another process's lock off the loop's back (`LOCK_WAIT` at most), taking
        the writes queued meanwhile into the batch, so they share the wait."""
        assert self._writer is not None
        stopping = False
        locked_since: float | None = None
        pause = LOCK_RETRY_FIRST
        while True:
            if self._gone is not None:
                error: StoreUnavailable = StoreUnavailable(self._gone)
                break
            try:
                results = _apply_batch(self._writer, batch=batch)
            except Exception as exc:  # the commit failed: nothing in the batch is stored
                fault = self._fault(exc)
                if fault is None:
                    log.exception("database commit failed")
                    return [exc] * len(batch), stopping
                error = fault
                if _primary(exc) in _BUSY:
                    now = time.monotonic()
                    if locked_since is None:
                        locked_since = now
                    if now - locked_since < LOCK_WAIT:
                        await asyncio.sleep(pause)
                        pause = min(2 * pause, LOCK_RETRY_MAX)
                        stopping = self._take_queued(batch) or stopping
                        continue
                break
            # Committed; but to the file the path names? A deleted (or replaced) file's
            # writes would be lost at the next start, so they are not acknowledged.
            gone = self._check_file()
            if gone is None:
                self._faults.recovered()
                return results, stopping
            self._gone = gone
            error = StoreUnavailable(gone)
            break
        self._faults.refused(error, len(batch))
        # An exception object each: they are raised in as many tasks.
        return [type(error)(error.message) for _ in batch], stopping

    def _take_queued(self, batch: list[_Write]) -> bool:
        """Move queued writes into the batch; True if the end of the queue was among them."""
        while len(batch) < MAX_BATCH and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                return True
            batch.append(item)
        return False

    # -- writes ------------------------------------------------------------------------------

    def ingest(
        self, env: str, received_at: int, events: list[NewEvent],
    ) -> asyncio.Future[list[str]]:
        """Store a request's events atomically and create their runs; resolves to the new
        run ids once committed."""
        return self._write(queries.Ingest(env, received_at, events))

    async def ingest_once(
        self, env: str, received_at: int, events: list[NewEvent],
    ) -> list[str] | None:
        """`ingest` for a request whose event ids came from an SDK's id seed: None (and
        nothing stored) when its first event is already stored, i.e. the SDK sent it again."""
        return await self._write(lambda db: queries.ingest_once(db, env, received_at, events))

    async def start_run(self, run_id: str, now: int) -> bool:
        """Mark a queued run Running; False when it was not Queued."""
        return await self.submit_start_run(run_id, now)

    def submit_start_run(self, run_id: str, now: int) -> asyncio.Future[bool]:
        """Queue marking a run Running without waiting for it; later writes commit after it."""
        if self._writer_task is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((functools.partial(queries.start_run, run_id=run_id, now=now),
                                future))
        return future

    async def record_attempt(
        self, run_id: str, attempt: StepAttempt, next_attempt: int, next_at: int | None = None,
    ) -> bool:
        """Store a step or function attempt and the run's next attempt number and wake time.

        False (and nothing stored) when the run has ended meanwhile, e.g. was cancelled.
        """
        return await self._write(
            lambda db: queries.record_attempt(db, run_id, attempt, next_attempt, next_at))

    async def begin_wait(
        self, env: str, run_id: str, step: StepAttempt, wait: WaitSpec | None = None,
    ) -> bool:
        """Store a step that waits (sleep, event, invoke) and the run's wake time."""
        return await self._write(lambda db: queries.begin_wait(db, env, run_id, step, wait))

    async def end_wait(
        self, run_id: str, step_id: str, status: str, now: int, *, output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Complete a waiting step with its result; False if the run has ended."""
        output_json = None if error is not None else dump_json(output)
        error_json = None if error is None else dump_json(error)
        return await self._write(
            lambda db: queries.end_wait(db, run_id, step_id, status, now, output_json, error_json))

    async def send_events(
        self, env: str, now: int, events: list[NewEvent], run_id: str, step: StepAttempt,
        max_tree_runs: int = MAX_TREE_RUNS,
    ) -> list[str] | None:
        """A `send_event` step: its events and its result in one commit (exactly once).

        Returns the runs the events started, or None when the sending run has ended. Raises
        `RunTreeTooLarge` (nothing stored) when the runs would grow the sender's tree of
        runs past `max_tree_runs`.
        """
        return await self._write(
            lambda db: queries.send_events(db, env, now, events, run_id, step, max_tree_runs))

    async def invoke(
        self, env: str, now: int, event: NewEvent, run_id: str, step: StepAttempt,
        wait: WaitSpec, max_tree_runs: int = MAX_TREE_RUNS,
    ) -> list[str] | None:
        """An `invoke` step: the child's event and run, and the parent's wait, in one commit
        (`RunTreeTooLarge` as for `send_events`)."""
        def write(db: sqlite3.Connection) -> list[str] | None:
            if not queries.begin_wait(db, env, run_id, step, wait):
                return None
            created = queries.ingest(db, env, now, [event])
            queries.grow_tree(db, run_id, created, max_tree_runs)
            return created

        return await self._write(write)

    async def note_restarts(self, run_ids: list[str]) -> dict[str, int]:
        """At start-up, for runs about to execute at once: one more restart each; returns
        each one's count of restarts without progress."""
        return await self._write(lambda db: queries.note_restarts(db, run_ids))

    async def clear_restarts(self) -> None:
        """At a clean shutdown: the runs it interrupted did not end the process."""
        await self._write(queries.clear_restarts)

    async def finish_run(
        self, run_id: str, status: str, now: int, *, output: Any = None,
        error: dict[str, Any] | None = None, attempt: StepAttempt | None = None,
        emitted: list[NewEvent] | None = None, output_json: str | None = None,
        started_at: int | None = None, max_tree_runs: int = MAX_TREE_RUNS,
    ) -> list[str] | None:
        """Record a run's final status, its last attempt and the events its end emits.

        `output_json` is the output already encoded, if the caller has it; `started_at` the
        run's start when that was never written. Returns the ids of runs those events
        started, or None if the run had already ended.
        """
        if status != COMPLETED:
            output_json = None
        elif output_json is None:
            output_json = dump_json(output)
        error_json = None if error is None else dump_json(error)
        return await self._write(queries.Finish(
            run_id, status, now, output_json, error_json, attempt, emitted or [], started_at,
            max_tree_runs))

    async def add_metadata(self, run_id: str, updates: list[MetadataUpdate], now: int) -> bool:
        """Attach metadata an SDK reported to a run; False when there is no such run."""
        return await self._write(lambda db: queries.add_metadata(db, run_id, updates, now))

    async def waiting_for_events(self, env: str, names: list[str]) -> list[str]:
        """Runs with a `wait_for_event` step waiting for one of these event names."""
        return await self._read(lambda db: queries.waiting_for_events(db, env, names))

    async def waiting_for_run(self, child_run_id: str) -> list[str]:
        """Runs with an `invoke` step waiting for this run to end."""
        return await self._read(lambda db: queries.waiting_for_run(db, child_run_id))

    async def events_after(
        self, env: str, name: str, after_internal_id: str, limit: int = 100,
    ) -> list[StoredEvent]:
        """Events called `name` received after the event id boundary, oldest first."""
        return await self._read(
            lambda db: queries.read_events_after(db, env, name, after_internal_id, limit))

    async def run(self, run_id: str) -> RunRecord | None:
        """One run's row."""
        return await self._read(lambda db: queries.read_run(db, run_id))

    async def unfinished_runs_of(
        self, env: str, function_id: str, before_internal_id: str,
    ) -> list[tuple[RunRecord, StoredEvent]]:
        """Unfinished runs of a function created before an event id, with their trigger."""
        return await self._read(lambda db: queries.read_unfinished_runs_of(
            db, env, function_id, before_internal_id))

    # -- flow control (SPEC 3.3) -------------------------------------------------------------

    async def fire_pending(self, pending_id: str, now: int,
                           config: FlowConfig | None) -> FlowOutcome | None:
        """A pending debounce or batch whose time came: its run created, in one commit
        (None when it is gone; a later `pending_due` when it was pushed back)."""
        return await self._write(
            lambda db: flow_queries.fire_pending(db, pending_id, now, config))

    async def note_run(self, run_id: str, kind: str, text: str, now: int) -> None:
        """Say why a run is queued or was cancelled (`flow_queries.QUEUED_NOTE`, ...)."""
        await self._write(lambda db: flow_queries.note_run(db, run_id, kind, text, now))

    async def pending_flow(self) -> list[tuple[str, str, int]]:
        """(id, function id, when due) of every pending debounce and batch."""
        return await self._read(flow_queries.read_pending)

    async def flow_outcomes(self, internal_id: str) -> list[dict[str, Any]]:
        """What each function's flow control did with an event."""
        return await self._read(lambda db: flow_queries.read_outcomes(db, internal_id))

    async def run_notes(self, run_id: str) -> dict[str, str]:
        """Why a run is (was) queued, and why it was cancelled."""
        return await self._read(lambda db: flow_queries.read_notes(db, run_id))

    # -- reads -------------------------------------------------------------------------------

    async def run_state(self, run_id: str) -> RunState | None:
        """A run, its events and its memoized steps, for executing it."""
        return await self._read(lambda db: queries.read_run_state(db, run_id))

    async def run_detail(self, run_id: str) -> RunDetail | None:
        """A run with its events and every attempt of every step."""
        return await self._read(lambda db: queries.read_run_detail(db, run_id))

    async def unfinished_runs(self) -> list[tuple[str, str, int]]:
        """(run_id, function_id, when due) of every Queued or Running run.

        A run with a pending wait (event, invoke) is due at once, so it re-checks what it
        waits for; others are due at their stored wake time (sleep end, retry backoff).
        """
        return await self._read(queries.read_unfinished_runs)

    async def runs(
        self, env: str, *, function_id: str | None = None, status: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs of an environment, newest first, optionally of one function or status."""
        return await self._read(
            lambda db: queries.read_runs(db, env, function_id, status, limit))

    async def waited_event_names(self) -> list[tuple[str, str]]:
        """(env, event name) pairs that some run's `wait_for_event` step waits for."""
        return await self._read(queries.waited_event_names)

    async def event(self, internal_id: str) -> StoredEvent | None:
        """One event by its internal id."""
        return await self._read(lambda db: queries.read_event(db, internal_id))

    async def recent_events(self, limit: int, *, before: str | None = None,
                            after: str | None = None) -> list[StoredEvent]:
        """Received events (all environments), newest first: the latest `limit`, or those
        received before/after the event with internal id `before`/`after`."""
        return await self._read(
            lambda db: queries.read_recent_events(db, limit, before=before, after=after))

    async def event_runs(self, internal_id: str) -> list[RunRecord]:
        """The runs an event started, oldest first."""
        return await self._read(lambda db: queries.read_event_runs(db, internal_id))

    async def runs_of_events(self, internal_ids: list[str]) -> dict[str, list[RunRecord]]:
        """`event_runs` of many events in one read."""
        return await self._read(lambda db: listing.read_runs_of_events(db, internal_ids))

    async def environments(self) -> list[EnvironmentSummary]:
        """Every environment with data, most recently active first."""
        return await self._read(queries.read_environments)

    async def identifiers(self, env: str) -> list[IdentifierSummary]:
        """The session identifiers seen in `env`, most recently active first."""
        return await self._read(lambda db: queries.read_identifiers(db, env))

    async def environments_page(self, *, limit: int = 50, cursor: str | None = None) -> Page:
        """A page of `environments` (rows are `EnvironmentSummary`)."""
        return await self._read(lambda db: queries.read_environments_page(db, limit, cursor))

    async def identifiers_page(self, env: str, *, limit: int = 50,
                               cursor: str | None = None) -> Page:
        """A page of `identifiers` (rows are `IdentifierSummary`)."""
        return await self._read(
            lambda db: queries.read_identifiers_page(db, env, limit, cursor))

    async def identifier_known(self, env: str, identifier: str) -> bool:
        """Whether sessions with this identifier were seen in `env`."""
        return await self._read(lambda db: queries.read_identifier_known(db, env, identifier))

    async def session(
        self, env: str, identifier: str, value: str, *, limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[SessionStats, Page] | None:
        """A session's figures and a page of its runs (newest first); None if unknown."""
        return await self._read(
            lambda db: queries.read_session(db, env, identifier, value, limit, cursor))

    async def session_events(self, env: str, identifier: str, value: str) -> list[StoredEvent]:
        """Every event that carried a session, in the order they were received."""
        return await self._read(
            lambda db: queries.read_session_events(db, env, identifier, value))

    # -- the dashboard's lists (store.listing) -----------------------------------------------

    @property
    def fault(self) -> str | None:
        """The database fault that refused the latest writes, until writes succeed again."""
        return self._gone or self._faults.message

    async def runs_page(self, env: str, *, status: str | None = None,
                        function_id: str | None = None, q: str | None = None,
                        window: listing.Window = listing.ALL_TIME, limit: int = 50,
                        cursor: str | None = None) -> Page:
        """A page of every run of `env`, newest first (rows are `RunRecord`)."""
        return await self._read(lambda db: listing.read_runs_page(
            db, env, status=status, function_id=function_id, q=q, window=window, limit=limit,
            cursor=cursor))

    async def events_page(self, env: str, *, q: str | None = None,
                          window: listing.Window = listing.ALL_TIME, limit: int = 50,
                          cursor: str | None = None) -> tuple[Page, dict[str, list[RunRecord]]]:
        """A page of every event of `env`, newest first, and the runs each started."""
        def read(db: sqlite3.Connection) -> tuple[Page, dict[str, list[RunRecord]]]:
            page = listing.read_events_page(db, env, q=q, window=window, limit=limit,
                                            cursor=cursor)
            return page, listing.read_runs_of_events(db, [e.internal_id for e in page.rows])
        return await self._read(read)

    async def function_figures(self, env: str, function_ids: list[str], *, recent: int = 5,
                               window: int = 100) -> dict[str, listing.FunctionFigures]:
        """Each function's latest runs and failures among its `window` latest runs."""
        return await self._read(lambda db: listing.read_function_figures(
            db, env, function_ids, recent, window))

    async def run_links(self, run: RunRecord, *, limit: int = 200) -> listing.RunLinks:
        """The run that started `run`, its reruns and the runs it started."""
        return await self._read(lambda db: listing.read_run_links(db, run, limit))

    async def rerun(self, run_id: str, new_run_id: str, now: int) -> RunRecord | None:
        """Create a rerun of `run_id` (Queued); None if there is no such run."""
        return await self._write(lambda db: listing.rerun(db, run_id, new_run_id, now))

    async def identifier_figures(self, env: str, identifiers: list[str],
                                 ) -> dict[str, listing.IdentifierFigures]:
        """Failure figures of each identifier."""
        return await self._read(
            lambda db: listing.read_identifier_figures(db, env, identifiers))

    async def sessions_page(
        self, env: str, identifier: str, *, q: str | None = None, sort: str = "last_active",
        failing: bool = False, window: listing.Window = listing.ALL_TIME, limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[Page, dict[str, RunRecord]]:
        """A page of an identifier's sessions and the latest failed run of each."""
        def read(db: sqlite3.Connection) -> tuple[Page, dict[str, RunRecord]]:
            page = listing.read_sessions_page(db, env, identifier, q=q, sort=sort,
                                              failing=failing, window=window, limit=limit,
                                              cursor=cursor)
            return page, listing.read_latest_errors(
                db, env, identifier, [s.value for s in page.rows if s.failed_runs])
        return await self._read(read)

    async def session_runs(
        self, env: str, identifier: str, value: str, *, status: str | None = None,
        window: listing.Window = listing.ALL_TIME, limit: int = 50, cursor: str | None = None,
    ) -> tuple[SessionStats, Page, listing.Timeline] | None:
        """A session's figures, a page of its runs of one status and time range, and its
        timeline, all from one snapshot."""
        def read(db: sqlite3.Connection) -> tuple[SessionStats, Page, listing.Timeline] | None:
            found = queries.read_session(db, env, identifier, value, 1, None)
            if found is None:
                return None
            return found[0], listing.read_session_runs(
                db, env, identifier, value, status=status, window=window, limit=limit,
                cursor=cursor), listing.read_timeline(db, env, identifier, value)
        return await self._read(read)

    async def session_failed_run_ids(self, env: str, identifier: str, value: str, *,
                                     limit: int) -> list[str]:
        """A session's failed runs not rerun yet, oldest first."""
        return await self._read(lambda db: listing.read_session_failed_run_ids(
            db, env, identifier, value, limit))

    def add_log_lines(self, lines: list[tuple[str, int, str, str]]) -> asyncio.Future[None]:
        """Queue `ctx.logger` lines (run id, at, level, message) for the next commit."""
        return self._write(lambda db: listing.add_log_lines(db, lines))

    async def log_lines(self, run_id: str) -> list[listing.LogLine]:
        """A run's stored `ctx.logger` lines."""
        return await self._read(lambda db: listing.read_log_lines(db, run_id))


def _in_snapshot(db: sqlite3.Connection, *, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run a read's queries in one transaction: they all see the same commit. (Without it
    each statement sees the latest, and a session's figures could be read before a commit
    and its runs after it.)"""
    db.execute("BEGIN")
    try:
        return fn(db)
    finally:
        db.execute("COMMIT")


def _apply_batch(db: sqlite3.Connection, *, batch: list[_Write]) -> list[Any]:
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
    ingests = [i for i, (fn, _) in enumerate(batch) if isinstance(fn, queries.Ingest)]
    ends: list[int] = []  # consecutive run ends not applied yet
    if db.in_transaction:  # left open by a ROLLBACK that failed
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    try:
        if len(ingests) > 1:
            _apply_together(db, batch, ingests, queries.ingest_many, results)
        else:
            ingests = []
        applied = set(ingests)
        for index, (fn, _) in enumerate(batch):
            if index in applied:
                continue
            if isinstance(fn, queries.Finish):
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


def _checkpointer_pragmas(db: sqlite3.Connection) -> None:
    """The background checkpointer's connection: the store's PRAGMAs, but a small page
    cache, since it copies WAL frames and reads no pages."""
    connect_pragmas(db)
    db.execute("PRAGMA cache_size = -256")


def _probe_write(db: sqlite3.Connection) -> None:
    """Write and roll back: a read-only or locked file fails here, at open, not at the first
    write. (BEGIN IMMEDIATE alone succeeds on a read-only file in WAL mode.) The write sets
    the header's application id, which devserver leaves at 0, to 0: never committed anyway."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("PRAGMA application_id = 0")
    finally:
        db.execute("ROLLBACK")


def _apply_one(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """One write's result, or the exception it raised (and nothing of it applied)."""
    db.execute("SAVEPOINT w")
    try:
        result = fn(db)
    except Exception as exc:  # handed to the caller who queued it
        if _is_fault(exc):  # the file's or disk's fault: the whole batch fails
            raise
        db.execute("ROLLBACK TO w")
        result = exc
    db.execute("RELEASE w")
    return result


def _apply_ends(db: sqlite3.Connection, batch: list[_Write], ends: list[int],
                results: list[Any]) -> None:
    """Apply the pending run ends (together when there are several) and forget them."""
    if len(ends) > 1:
        _apply_together(db, batch, ends, queries.finish_many, results)
    elif ends:
        results[ends[0]] = _apply_one(db, batch[ends[0]][0])
    ends.clear()


def _apply_together(db: sqlite3.Connection, batch: list[_Write], positions: list[int],
                    apply_many: Callable[[sqlite3.Connection, list[Any]], list[Any]],
                    results: list[Any]) -> None:
    """Apply the writes at `positions` with one `apply_many` call; one by one if it fails."""
    db.execute("SAVEPOINT together")
    try:
        for index, result in zip(positions, apply_many(db, [batch[i][0] for i in positions]),
                                 strict=True):
            results[index] = result
    except Exception as exc:  # applied one by one, where a failure is reported
        if _is_fault(exc):
            raise
        db.execute("ROLLBACK TO together")
        for index in positions:
            results[index] = _apply_one(db, batch[index][0])
    db.execute("RELEASE together")
