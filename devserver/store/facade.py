"""SQLite storage: the connections, the single batching writer, and the async API over them.

All SQL in the project lives in the store: the schema and migrations in `schema`, the queries
in `queries`, the connections here. Callers pass and get plain dataclasses, never cursors.

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

Per-session figures are counters kept up to date by the writes that change them (run created,
started, finished), so reading them never scans runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from devserver.errors import ConfigError
from devserver.jsontext import dump_json
from devserver.model.records import (
    COMPLETED,
    QUEUED,
    RUNNING,
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
from devserver.store import queries
from devserver.store.schema import SCHEMA as SCHEMA
from devserver.store.schema import SCHEMA_VERSION as SCHEMA_VERSION
from devserver.store.schema import connect_pragmas, migrate

log = logging.getLogger(__name__)
T = TypeVar("T")



MAX_BATCH = 512


# ---------------------------------------------------------------------------------------------
# The store


_Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
"""A queued write: the function, and the caller's future."""


class Store:
    """The database: open it, write through the batching writer, read through the reader."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._requested = str(path)
        self._tmpdir: str | None = None
        self.path: Path = Path(self._requested)
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None

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
            probe = sqlite3.connect(self.path)
            try:
                probe.execute("PRAGMA schema_version")
            finally:
                probe.close()
            # Used only from the event loop's thread (opened here, on it).
            self._writer = sqlite3.connect(self.path, isolation_level=None)
            connect_pragmas(self._writer)
            migrate(self._writer)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._call(self._reader, connect_pragmas)
            await self._call(self._reader, lambda db: db.execute("PRAGMA query_only = ON"))
        except ConfigError:
            await self.close()
            raise
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise ConfigError(f"cannot open database {self._requested}: {exc}") from exc
        self._writer_task = asyncio.create_task(self._write_loop(), name="devserver-writer")

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close both connections."""
        if self._writer_task is not None:
            await self._queue.put(None)
            await self._writer_task
            self._writer_task = None
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
        return await self._call(self._reader, functools.partial(_in_snapshot, fn=fn))

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
            try:
                results = _apply_batch(self._writer, batch=batch)
            except Exception as exc:  # the commit itself failed: nothing in the batch is stored
                log.exception("database commit failed")
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

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
        def write(db: sqlite3.Connection) -> list[str] | None:
            if events and db.execute("SELECT 1 FROM events WHERE internal_id = ?",
                                     (events[0].internal_id,)).fetchone() is not None:
                return None
            return queries.ingest(db, env, received_at, events)

        return await self._write(write)

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
    ) -> list[str] | None:
        """A `send_event` step: its events and its result in one commit (exactly once).

        Returns the runs the events started, or None when the sending run has ended.
        """
        def write(db: sqlite3.Connection) -> list[str] | None:
            if not queries.live(db, run_id):
                return None
            queries.add_attempt(db, run_id, step)
            db.execute("UPDATE runs SET attempt = 0 WHERE run_id = ?", (run_id,))
            return queries.ingest(db, env, now, events)

        return await self._write(write)

    async def invoke(
        self, env: str, now: int, event: NewEvent, run_id: str, step: StepAttempt,
        wait: WaitSpec,
    ) -> list[str] | None:
        """An `invoke` step: the child's event and run, and the parent's wait, in one commit."""
        def write(db: sqlite3.Connection) -> list[str] | None:
            if not queries.begin_wait(db, env, run_id, step, wait):
                return None
            return queries.ingest(db, env, now, [event])

        return await self._write(write)

    async def finish_run(
        self, run_id: str, status: str, now: int, *, output: Any = None,
        error: dict[str, Any] | None = None, attempt: StepAttempt | None = None,
        emitted: list[NewEvent] | None = None, output_json: str | None = None,
        started_at: int | None = None,
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
            run_id, status, now, output_json, error_json, attempt, emitted or [], started_at))

    async def waiting_for_events(self, env: str, names: list[str]) -> list[str]:
        """Runs with a `wait_for_event` step waiting for one of these event names."""
        marks = ", ".join("?" * len(names))  # placeholders only; the names are parameters
        return await self._read(lambda db: [r[0] for r in db.execute(
            f"SELECT DISTINCT run_id FROM waits WHERE env = ? AND event_name IN ({marks})",
            (env, *names))])

    async def waiting_for_run(self, child_run_id: str) -> list[str]:
        """Runs with an `invoke` step waiting for this run to end."""
        return await self._read(lambda db: [r[0] for r in db.execute(
            "SELECT run_id FROM waits WHERE child_run_id = ?", (child_run_id,))])

    async def events_after(
        self, env: str, name: str, after_internal_id: str, limit: int = 100,
    ) -> list[StoredEvent]:
        """Events called `name` received after the event id boundary, oldest first."""
        return await self._read(lambda db: [queries.event_from_row(r) for r in db.execute(
            "SELECT * FROM events WHERE env = ? AND name = ? AND internal_id > ? "
            "AND duplicate = 0 ORDER BY internal_id LIMIT ?",
            (env, name, after_internal_id, limit))])

    async def run(self, run_id: str) -> RunRecord | None:
        """One run's row."""
        return await self._read(lambda db: next(map(queries.run_from_row, db.execute(
            "SELECT * FROM runs WHERE run_id = ?", (run_id,))), None))

    async def unfinished_runs_of(
        self, env: str, function_id: str, before_internal_id: str,
    ) -> list[tuple[RunRecord, StoredEvent]]:
        """Unfinished runs of a function created before an event id, with their trigger."""
        return await self._read(lambda db: [
            (queries.run_from_row(r), queries.event_from_row(e)) for r in db.execute(
                "SELECT * FROM runs WHERE env = ? AND function_id = ? AND status IN (?, ?) "
                "AND run_id < ?", (env, function_id, QUEUED, RUNNING, before_internal_id))
            for e in db.execute("SELECT * FROM events WHERE internal_id = ?", (r["event_id"],))
        ])

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
        return await self._read(lambda db: [
            (r[0], r[1], r[2] or 0) for r in db.execute(
                "SELECT r.run_id, r.function_id, CASE WHEN EXISTS (SELECT 1 FROM waits w "
                "WHERE w.run_id = r.run_id) THEN 0 ELSE r.next_at END AS due FROM runs r "
                "WHERE r.status IN ('Queued', 'Running') ORDER BY due")
        ])

    async def runs(
        self, env: str, *, function_id: str | None = None, status: str | None = None,
        limit: int = 100,
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
        return await self._read(lambda db: [queries.run_from_row(r) for r in db.execute(
            f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY run_id DESC LIMIT ?",
            (*params, limit))])

    async def waited_event_names(self) -> list[tuple[str, str]]:
        """(env, event name) pairs that some run's `wait_for_event` step waits for."""
        return await self._read(lambda db: [(r[0], r[1]) for r in db.execute(
            "SELECT DISTINCT env, event_name FROM waits WHERE event_name IS NOT NULL")])

    async def event(self, internal_id: str) -> StoredEvent | None:
        """One event by its internal id."""
        return await self._read(lambda db: next(
            map(queries.event_from_row, db.execute("SELECT * FROM events WHERE internal_id = ?",
                                   (internal_id,))), None))

    async def event_runs(self, internal_id: str) -> list[RunRecord]:
        """The runs an event started, oldest first."""
        return await self._read(lambda db: [queries.run_from_row(r) for r in db.execute(
            "SELECT * FROM runs WHERE event_id = ? ORDER BY run_id", (internal_id,))])

    async def environments(self) -> list[EnvironmentSummary]:
        """Every environment with data, most recently active first."""
        return await self._read(lambda db: [
            EnvironmentSummary(r["env"], r["events"], r["last_active"]) for r in db.execute(
                "SELECT * FROM environments ORDER BY last_active DESC, env")])

    async def identifiers(self, env: str) -> list[IdentifierSummary]:
        """The session identifiers seen in `env`, most recently active first."""
        return await self._read(lambda db: [
            IdentifierSummary(r["identifier"], r["sessions"], r["last_active"])
            for r in db.execute(
                "SELECT identifier, sessions, (SELECT max(last_active) FROM sessions s "
                "WHERE s.env = i.env AND s.identifier = i.identifier) AS last_active "
                "FROM identifiers i WHERE env = ? ORDER BY last_active DESC, identifier",
                (env,))])

    async def sessions(
        self, env: str, identifier: str, *, q: str | None = None, sort: str = "last_active",
        limit: int = 50, cursor: str | None = None,
    ) -> Page:
        """A page of an identifier's sessions (rows are `SessionStats`)."""
        return await self._read(
            lambda db: queries.read_sessions(db, env, identifier, q, sort, limit, cursor))

    async def session(
        self, env: str, identifier: str, value: str, *, limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[SessionStats, Page] | None:
        """A session's figures and a page of its runs (newest first); None if unknown."""
        return await self._read(
            lambda db: queries.read_session(db, env, identifier, value, limit, cursor))

    async def session_events(self, env: str, identifier: str, value: str) -> list[StoredEvent]:
        """Every event that carried a session, in the order they were received."""
        return await self._read(lambda db: [queries.event_from_row(r) for r in db.execute(
            "SELECT e.* FROM event_sessions es JOIN events e ON e.internal_id = es.internal_id "
            "WHERE es.env = ? AND es.identifier = ? AND es.value = ? ORDER BY es.internal_id",
            (env, identifier, value))])


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
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return results


def _apply_one(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """One write's result, or the exception it raised (and nothing of it applied)."""
    db.execute("SAVEPOINT w")
    try:
        return fn(db)
    except Exception as exc:  # noqa: BLE001 - handed to the caller who queued it
        db.execute("ROLLBACK TO w")
        return exc
    finally:
        db.execute("RELEASE w")


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
    except Exception:  # noqa: BLE001 - applied one by one instead, where a failure is reported
        db.execute("ROLLBACK TO together")
        for index in positions:
            results[index] = _apply_one(db, batch[index][0])
    db.execute("RELEASE together")
