"""Executes local Python functions (`@app.function`): the runner's executor for them, as
`devserver.sdk.executor` is for SDK functions.

An async function runs in the run's own task with a `Context`; a sync one runs in a worker
thread with a `SyncContext`, whose steps block that thread while the loop commits. Sync step
bodies of async functions use the same threads. Each execution of a body is bounded by its
function's `timeout=` (else the server's default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections.abc import Callable
from typing import Any

from devserver.app import NonRetriableError
from devserver.context import Context, Event, Step, SyncContext, SyncStep
from devserver.runtime.invocation import Invocation

DEFAULT_THREADS = 32
"""Worker threads for sync functions and sync step bodies."""
DEFAULT_FUNCTION_TIMEOUT = 300.0
"""Seconds one execution of a function body may take, unless the function sets its own."""


class FunctionTimeoutError(NonRetriableError):
    """A function's body ran longer than its timeout; the run fails without retrying."""


class LocalExecutor:
    """Runs invocations of local functions, in the loop (async) or in worker threads (sync)."""

    def __init__(self, *, threads: int = DEFAULT_THREADS,
                 function_timeout: float = DEFAULT_FUNCTION_TIMEOUT) -> None:
        self.function_timeout = function_timeout
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="devserver-fn")

    def close(self) -> None:
        """Stop the worker threads. Sync code still running can't be interrupted: its thread
        is abandoned and its run resumes from the last committed step on the next start."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, inv: Invocation) -> Any:
        """Run one execution of the function's body within its timeout; return its output."""
        # asyncio.timeout, not wait_for: the body runs in this task, so whatever it raises
        # (SystemExit included) reaches the runner instead of escaping into the event loop. A
        # sync body's thread can't be stopped: past the timeout its result is ignored and its
        # later step calls find the run ended.
        fn = inv.function
        limit = fn.timeout if fn.timeout is not None else self.function_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await self._call(inv)
        except TimeoutError:
            if not deadline.expired():
                raise  # the function's own TimeoutError
            raise FunctionTimeoutError(
                f"{fn.id} ran for more than its {limit:g} s timeout (set timeout= on the "
                "function to change it)") from None

    async def _call(self, inv: Invocation) -> Any:
        fn = inv.function
        events = [Event.from_stored(ev) for ev in inv.events]
        fields: dict[str, Any] = {
            "event": events[0], "events": events, "run_id": inv.run_id, "function_id": fn.id,
            "env": inv.env, "sessions": dict(inv.sessions), "invocation": inv}
        # The decorator can't tell the two handler types apart statically; is_async can.
        handler: Callable[[Any], Any] = fn.handler
        if fn.is_async:
            return await handler(Context(step=Step(inv, self._threads), **fields))
        loop = asyncio.get_running_loop()
        ctx = SyncContext(step=SyncStep(inv, loop), **fields)
        return await loop.run_in_executor(
            self._threads, functools.partial(contextvars.copy_context().run, handler, ctx))
