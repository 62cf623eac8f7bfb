"""Executes local Python functions (`@app.function`): the runner's executor for them, as
`devserver.sdk.executor` is for SDK functions.

An async function runs in the run's own task with a `Context`; a sync one runs in a worker
thread with a `SyncContext`, whose steps block that thread while the loop commits. Sync step
bodies of async functions run in worker threads too. Each execution of a body is bounded by its
function's `timeout=` (else the server's default).

Runaway sync code can't starve the others (SPEC 8):
- At most `sync_bodies` sync function bodies run at once (8 by default), in threads of their
  own: every pure-Python thread that runs competes for the GIL with the event loop's thread,
  and 32 spinning threads left the HTTP server answering in tens of seconds. The others wait
  their turn, and a sync function's timeout counts from when its body starts, not while it
  waits.
- A body that outlives its timeout is interrupted: `ThreadAbandoned` is raised in its thread
  at the next Python instruction it runs (the sync step body of an async function too). Code
  stuck in a blocking call can't be interrupted until that call returns; its thread
  is abandoned and a new one takes its place, so the pool keeps its capacity. At most
  `max_abandoned` threads may be abandoned and still alive at once; past that, sync code fails
  with an error saying so (a restart frees them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ctypes
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from devserver.app import NonRetriableError
from devserver.context import Context, Event, Step, SyncContext, SyncStep, ThreadAbandoned
from devserver.runtime.invocation import Invocation
from devserver.runtime.runlog import log_sink

log = logging.getLogger(__name__)

DEFAULT_THREADS = 32
"""Worker threads for the sync step bodies of async functions."""
DEFAULT_SYNC_BODIES = 8
"""Sync function bodies that run at once; more wait their turn (their timeout not counting)."""
DEFAULT_MAX_ABANDONED = 32
"""Threads that may be abandoned (stuck past their timeout) and still alive at once."""
DEFAULT_FUNCTION_TIMEOUT = 300.0
"""Seconds one execution of a function body may take, unless the function sets its own."""
THREAD_PREFIX = "devserver-fn"
"""The name prefix of the worker threads (the CLI leaves them behind at exit)."""


class FunctionTimeoutError(NonRetriableError):
    """A function's body ran longer than its timeout; the run fails without retrying."""


class TooManyStuckThreads(RuntimeError):
    """Too many worker threads are stuck in code that outlived its timeout."""


def _interrupt(thread: threading.Thread) -> None:
    """Raise `ThreadAbandoned` in `thread` at the next Python instruction it executes."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                   ctypes.py_object(ThreadAbandoned))


class _Job:
    __slots__ = ("abandoned", "fn", "future", "thread")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.thread: threading.Thread | None = None  # set while it runs
        self.abandoned = False


class Workers(concurrent.futures.Executor):
    """Worker threads that keep their number: the thread of a job that is abandoned (its body
    timed out) is interrupted and replaced, and leaves the pool once it gets free."""

    def __init__(self, threads: int, *, max_abandoned: int = DEFAULT_MAX_ABANDONED,
                 name: str = THREAD_PREFIX) -> None:
        self.capacity = threads
        self.max_abandoned = max_abandoned
        self._name = name
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._live = 0  # threads counted toward capacity
        self._idle = 0  # of those, waiting for a job that nobody has claimed
        self._running: dict[concurrent.futures.Future[Any], _Job] = {}
        self.abandoned: set[threading.Thread] = set()
        """Threads abandoned and still running their job."""
        self._closed = False
        self._count = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Queue `fn(*args, **kwargs)`; `TooManyStuckThreads` when too many are abandoned."""
        job = _Job(functools.partial(fn, *args, **kwargs))
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker threads are shut down")
            if len(self.abandoned) >= self.max_abandoned:
                raise TooManyStuckThreads(
                    f"{len(self.abandoned)} worker threads are stuck in sync code that ran "
                    "past its timeout and could not be interrupted (a blocking call that "
                    "doesn't return); no more sync code runs until they finish or the server "
                    "is restarted")
            self._running[job.future] = job
            self._queue.put(job)
            if self._idle:
                self._idle -= 1
            elif self._live < self.capacity:
                self._start_thread()
        return job.future

    def _start_thread(self) -> None:  # with the lock held
        self._live += 1
        self._count += 1
        threading.Thread(target=self._work, name=f"{self._name}-{self._count}",
                         daemon=True).start()

    def _work(self) -> None:
        me = threading.current_thread()
        job: _Job | None = None
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                with self._lock:
                    run = job.future.set_running_or_notify_cancel()
                    if run:
                        job.thread = me
                if run:
                    try:
                        result = job.fn()
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        job.future.set_exception(exc)
                    else:
                        job.future.set_result(result)
                with self._lock:
                    job.thread = None
                    self._running.pop(job.future, None)
                    if job.abandoned:  # replaced meanwhile: this thread leaves
                        self.abandoned.discard(me)
                        return
                    self._idle += 1
                job = None
        except ThreadAbandoned:  # the interrupt landed outside the job: its thread leaves
            with self._lock:
                self.abandoned.discard(me)
                if job is not None:
                    self._running.pop(job.future, None)
                    if not job.future.done():  # it landed between the job and its result
                        job.future.set_exception(ThreadAbandoned())

    def abandon(self, future: concurrent.futures.Future[Any]) -> None:
        """Give up on a job: interrupt its thread and let a new thread take its place (a
        queued job is just cancelled)."""
        with self._lock:
            job = self._running.get(future)
            if job is None or job.abandoned:
                return
            if job.thread is None:
                future.cancel()
                return
            job.abandoned = True
            self.abandoned.add(job.thread)
            self._live -= 1
            _interrupt(job.thread)
            if not self._queue.empty() and not self._closed:
                self._start_thread()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the idle threads; the running ones end after their job (never waited for:
        the CLI leaves them behind at exit)."""
        with self._lock:
            self._closed = True
            live = self._live
        if cancel_futures:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.future.cancel()
        for _ in range(live):
            self._queue.put(None)


class LocalExecutor:
    """Runs invocations of local functions, in the loop (async) or in worker threads (sync)."""

    def __init__(self, *, threads: int = DEFAULT_THREADS,
                 function_timeout: float = DEFAULT_FUNCTION_TIMEOUT,
                 sync_bodies: int = DEFAULT_SYNC_BODIES,
                 max_abandoned: int = DEFAULT_MAX_ABANDONED) -> None:
        self.function_timeout = function_timeout
        self._threads = Workers(threads, max_abandoned=max_abandoned,
                                name=f"{THREAD_PREFIX}-step")
        self._bodies = Workers(sync_bodies, max_abandoned=max_abandoned,
                               name=f"{THREAD_PREFIX}-body")
        self._turns: asyncio.Semaphore | None = None  # made on the loop, on first use
        self.sync_bodies = sync_bodies

    @property
    def abandoned(self) -> int:
        """Worker threads abandoned (stuck past their timeout) and still running."""
        return len(self._threads.abandoned) + len(self._bodies.abandoned)

    def close(self) -> None:
        """Stop the worker threads. Sync code still running can't be waited for: its thread
        is left behind and its run resumes from the last committed step on the next start."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._bodies.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, inv: Invocation) -> Any:
        """Run one execution of the function's body within its timeout; return its output."""
        # asyncio.timeout, not wait_for: the body runs in this task, so whatever it raises
        # (SystemExit included) reaches the runner instead of escaping into the event loop.
        # It is armed when the body starts: a sync body may first wait for its turn.
        fn = inv.function
        limit = fn.timeout if fn.timeout is not None else self.function_timeout
        deadline = asyncio.timeout(None)
        try:
            async with deadline:
                return await self._call(inv, deadline, limit)
        except TimeoutError:
            if not deadline.expired():
                raise  # the function's own TimeoutError
            raise FunctionTimeoutError(
                f"{fn.id} ran for more than its {limit:g} s timeout (set timeout= on the "
                "function to change it)") from None

    async def _call(self, inv: Invocation, deadline: asyncio.Timeout, limit: float) -> Any:
        fn = inv.function
        events = [Event.from_stored(ev) for ev in inv.events]
        fields: dict[str, Any] = {
            "event": events[0], "events": events, "run_id": inv.run_id, "function_id": fn.id,
            "env": inv.env, "sessions": dict(inv.sessions), "invocation": inv,
            "log_sink": log_sink(inv.store, inv.clock, inv.run_id)}
        # The decorator can't tell the two handler types apart statically; is_async can.
        handler: Callable[[Any], Any] = fn.handler
        loop = asyncio.get_running_loop()
        if fn.is_async:
            deadline.reschedule(loop.time() + limit)
            step = Step(inv, self._threads)
            try:
                result = await handler(Context(step=step, **fields))
            except asyncio.CancelledError:
                step.close()
                if deadline.expired():
                    for job in list(step.running):  # sync step bodies past the timeout
                        self._threads.abandon(job)
                raise
            except BaseException:
                await step.settle()
                raise
            # Steps of parallel branches still running commit before the run goes on,
            # whatever ended the function (its return, a retry, an error).
            await step.settle()
            return result
        sync_step = SyncStep(inv, loop, self._threads)
        ctx = SyncContext(step=sync_step, **fields)
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.sync_bodies)
        async with self._turns:
            deadline.reschedule(loop.time() + limit)
            job = self._bodies.submit(contextvars.copy_context().run, handler, ctx)
            try:
                return await asyncio.wrap_future(job)
            except asyncio.CancelledError:
                if deadline.expired():
                    # Past its timeout: stop the body if it is running Python code; a
                    # blocking call can't be stopped, and its thread is replaced. (When the
                    # run is cancelled or the server stops, the body goes on as before: its
                    # next step call finds the run ended, or it is left behind at exit.)
                    self._bodies.abandon(job)
                    for branch in list(sync_step.running):  # its parallel branches too
                        self._threads.abandon(branch)
                raise
