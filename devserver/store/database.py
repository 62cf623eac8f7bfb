"""The database's connections and the one writer: the base of `facade.Store`.

One owner for writes: every write is a small function queued to the writer task, which applies
all pending writes in one transaction (`batch.apply_batch`: each inside its own savepoint, the
event API's ingests and consecutive run ends as groups), commits once and only then resolves
the callers' futures. A caller that awaits a write therefore knows it is durable; under load
many writes share one commit.
The writer runs its batches on the event loop's own thread: a batch is a few C-level
`executemany` calls and one commit (WAL, no fsync per commit), cheaper than handing it to a
thread and trading the GIL back and forth for every request (measured in `devserver.bench`).
Reads use their own connection (aiosqlite, in its thread); with WAL they never wait for the
writer. A third connection, in its own thread, checkpoints the WAL into the file while commits
come in, so the writer's own (blocking) checkpoint is a rare backstop.

Because the writer is on the loop, it must never wait inside SQLite: its busy timeout is 0.
When another process holds the write lock, the writer gives the loop back and tries again
(`LOCK_WAIT` at most, then the batch fails). A fault of the file or disk (`faults`) fails the
whole batch and stores nothing of it, and the next batch tries again, so writes succeed once
the cause is gone. A database deleted or replaced under the server is the exception: every
later write is refused (it would go to a file no one will see again) until devserver is
restarted. Opening probes the file (`faults.probe_write`, `faults.quick_check`); each fault
fails with one clear `ConfigError`.
"""

from __future__ import annotations

import asyncio
import collections
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
from typing import Any, Generic, TypeVar, cast

import aiosqlite

from devserver.errors import ConfigError, StoreUnavailable
from devserver.store import session_counts
from devserver.store.batch import Write, apply_batch
from devserver.store.faults import (
    BUSY,
    FaultLog,
    fault_error,
    open_error,
    primary,
    probe_write,
    quick_check,
)
from devserver.store.schema import BUSY_TIMEOUT_MS, connect_pragmas, migrate
from devserver.store.session_index import INDEX_EVERY, IndexPass

log = logging.getLogger("devserver.store.facade")  # the name operators' filters know
T = TypeVar("T")

MAX_BATCH = 512
LOCK_WAIT = 1.0
"""Seconds a batch waits for another process's write lock before its writes fail (503)."""
LOCK_RETRY_FIRST, LOCK_RETRY_MAX = 0.005, 0.05
"""Seconds between tries for the lock: doubling from the first to the max."""
CHECKPOINT_EVERY = 0.25
"""Seconds between background WAL checkpoints while there are commits to copy."""


class WriteQueue(Generic[T]):
    """The writer's queue, for its one consumer: a deque and the consumer's waiter.
    (`asyncio.Queue` keeps task counts, a list of getters and an Event as well: a microsecond
    a write, and an event makes two writes.)"""

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        """Add `item` and wake the consumer if it waits."""
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        """Whether nothing is queued."""
        return not self._items

    def get_nowait(self) -> T:
        """The oldest item (IndexError when empty: check `empty` first)."""
        return self._items.popleft()

    async def get(self) -> T:
        """The oldest item, once there is one."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


class Database:
    """The connections: open them, write through the batching writer, read through the
    reader. `facade.Store` adds the API callers use."""

    def __init__(self, path: str | os.PathLike[str], *, probe_write: bool = True) -> None:
        """`probe_write=False` skips the write probe at open, for a caller that only reads
        (e.g. `export` of a read-only file); its writes still fail with `StoreUnavailable`."""
        self._requested = str(path)
        self._probe_write = probe_write
        self._tmpdir: str | None = None
        self.path: Path = Path(self._requested)
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: WriteQueue[Write | None] = WriteQueue()
        self._writer_task: asyncio.Task[None] | None = None
        # Copies committed pages from the WAL into the file off the loop's thread, so the
        # writer's own (blocking) checkpoint is a rare backstop (schema.connect_pragmas).
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._checkpoint_work: asyncio.Future[bool] | None = None
        self._committed = asyncio.Event()
        self._identity: tuple[int, int] | None = None  # the file's (device, inode) at open
        self._gone: str | None = None  # set once the file is found deleted or replaced
        self._faults = FaultLog()
        self._index_handle: asyncio.TimerHandle | None = None  # the next session-index pass
        self._indexed_at = 0.0  # loop time of the last pass queued

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
                probe_write(self._writer)
            quick_check(self._writer, self._requested, self.path)
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
            raise ConfigError(open_error(self._requested, self.path, exc)) from exc
        self._writer_task = asyncio.create_task(self._write_loop(), name="devserver-writer")
        self._queue_index()  # what a crash left unindexed
        self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(),
                                                    name="devserver-checkpoint")

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
        if self._index_handle is not None:
            self._index_handle.cancel()
            self._index_handle = None
        if self._writer_task is not None:
            if self._gone is None:
                self._queue_index()  # a file at rest is indexed whole
            self._queue.put_nowait(None)
            await self._writer_task
            self._writer_task = None
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
            self._checkpoint_task = None
        if self._checkpoint_work is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint_work  # a checkpoint in flight in its thread
            self._checkpoint_work = None
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
            fault = fault_error(self.path, exc)
            if fault is None:
                raise
            raise fault from exc

    async def _read_counted(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read of sessions' figures (`session_counts`): from the reader, unless changes
        to them wait for a pass in its snapshot; then through the writer, which applies them
        first, in the same transaction, so the figures agree with every row read with them."""
        counted, found = await self._read(functools.partial(_if_counted, fn=fn))
        if counted:
            return cast(T, found)
        return await self._write(functools.partial(_counted, fn=fn))

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
            batch: list[Write] = []
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
            if not stopping:
                passes = [result for (fn, _), result in zip(batch, results, strict=True)
                          if isinstance(fn, IndexPass)]
                if True in passes and self._index_handle is None:
                    self._queue_index()  # a pass left more: the next one at once
                elif len(passes) < len(batch):
                    self._index_soon()  # events may have been stored: index them shortly
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _index_soon(self) -> None:
        """Queue a session-index pass `INDEX_EVERY` seconds after the last (none while one
        is due): committed events reach `event_sessions` in passes, not in every commit."""
        if self._index_handle is not None or self._writer_task is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._indexed_at + INDEX_EVERY - loop.time())
        self._index_handle = loop.call_later(delay, self._queue_index)

    def _queue_index(self) -> None:
        self._index_handle = None
        loop = asyncio.get_running_loop()
        self._indexed_at = loop.time()
        future: asyncio.Future[bool] = loop.create_future()
        future.add_done_callback(_log_index_failure)
        self._queue.put_nowait((IndexPass(), future))

    async def _checkpoint_loop(self) -> None:
        """While commits come in, a PASSIVE checkpoint every `CHECKPOINT_EVERY` seconds on
        a connection of its own, in its own thread: it copies the WAL's committed pages into
        the database file and syncs it without holding up the writer, which keeps committing
        meanwhile. A failure (disk full, say) is left to the writer's own checkpoint."""
        while True:
            await self._committed.wait()
            self._committed.clear()
            # Shielded: the work runs in the connection's thread, which a cancellation would
            # not stop; `close` waits for it instead, so no thread outlives the store.
            self._checkpoint_work = asyncio.ensure_future(self._checkpoint_once())
            if not await asyncio.shield(self._checkpoint_work):
                return
            await asyncio.sleep(CHECKPOINT_EVERY)

    async def _checkpoint_once(self) -> bool:
        """One background checkpoint (opening its connection the first time); False when
        the file is gone or replaced, and the checkpointer stops."""
        try:
            if self._checkpointer is None:  # opened at the first commit: a quick start
                if self._gone is not None or self._check_file() is not None:
                    return False  # never create or touch another file at the path
                self._checkpointer = await aiosqlite.connect(
                    self.path.resolve().as_uri() + "?mode=rw", uri=True, isolation_level=None,
                    timeout=BUSY_TIMEOUT_MS / 1000)
                await self._call(self._checkpointer, _checkpointer_pragmas)
            await self._call(self._checkpointer,
                             lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)"))
        except sqlite3.Error:
            log.debug("background checkpoint failed", exc_info=True)
        return True

    async def _commit(self, batch: list[Write]) -> tuple[list[Any], bool]:
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
                results = apply_batch(self._writer, batch=batch)
            except Exception as exc:  # the commit failed: nothing in the batch is stored
                fault = fault_error(self.path, exc)
                if fault is None:
                    log.exception("database commit failed")
                    return [exc] * len(batch), stopping
                error = fault
                if primary(exc) in BUSY:
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

    def _take_queued(self, batch: list[Write]) -> bool:
        """Move queued writes into the batch; True if the end of the queue was among them."""
        while len(batch) < MAX_BATCH and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                return True
            batch.append(item)
        return False

    @property
    def fault(self) -> str | None:
        """The database fault that refused the latest writes, until writes succeed again."""
        return self._gone or self._faults.message


def _log_index_failure(future: asyncio.Future[bool]) -> None:
    """A failed pass is tried again with the next (readers see unindexed events anyway)."""
    if not future.cancelled() and future.exception() is not None:
        log.debug("indexing events under their sessions failed", exc_info=future.exception())


def _in_snapshot(db: sqlite3.Connection, *, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run a read's queries in one transaction: they all see the same commit. (Without it
    each statement sees the latest, and a session's figures could be read before a commit
    and its runs after it.)"""
    db.execute("BEGIN")
    try:
        return fn(db)
    finally:
        db.execute("COMMIT")


def _if_counted(db: sqlite3.Connection, *,
                fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, T | None]:
    """`fn`'s result, if no change to sessions' figures waits for a pass; else (False, None)."""
    if session_counts.pending(db):
        return False, None
    return True, fn(db)


def _counted(db: sqlite3.Connection, *, fn: Callable[[sqlite3.Connection], T]) -> T:
    """`fn` on the writer's connection, after the pending changes to sessions' figures."""
    session_counts.apply(db)
    return fn(db)


def _checkpointer_pragmas(db: sqlite3.Connection) -> None:
    """The background checkpointer's connection: the store's PRAGMAs, but a small page
    cache, since it copies WAL frames and reads no pages."""
    connect_pragmas(db)
    db.execute("PRAGMA cache_size = -256")
