"""One invocation of a run's function, and the durable logic of every step kind.

A run's function is invoked from the top every time it resumes. Each step first looks for its
memoized outcome: when found, the stored result is returned (or the stored failure raised) and
nothing runs again. Otherwise the step does its work, commits its result, and only then does the
function continue. A step that must wait (a sleep, an event, an invoked run, a retry's backoff)
records what it waits for and unwinds the invocation with `Reschedule`, a `BaseException` so that
`except Exception` in user code can't swallow it; the runner resumes the run when it is due.

Waiting steps are resolved by the invocation itself when the run resumes: a sleep checks the
clock, a wait looks for matching events received after it began, an invoke reads the child run.
So a wake-up lost to a crash only delays a run; on restart every unfinished run is resumed once.
"""

from __future__ import annotations

from typing import Any, Protocol

from devserver.runtime.child_runs import ChildRunSteps
from devserver.runtime.outputs import MAX_OUTPUT_BYTES as MAX_OUTPUT_BYTES
from devserver.runtime.waits import WaitingSteps


class Invocation(WaitingSteps, ChildRunSteps):
    """One execution of a run's function, with every step kind: the bookkeeping is `Steps`'
    (`runtime.steps`), the waits `WaitingSteps`' (`runtime.waits`), sending and invoking
    `ChildRunSteps`' (`runtime.child_runs`)."""

    async def settle(self, uid: str) -> None:
        """Check a waiting step again: resolve it (its outcome joins the memo) if what it
        waits for happened, else raise `Reschedule`. A failed invoke raises `StepError`."""
        pending = self.pending.get(uid)
        if pending is None:
            return
        if pending.kind == "sleep":
            await self._settle_sleep(pending)
        elif pending.kind == "wait_for_event":
            await self._settle_wait(pending)
        elif pending.kind == "invoke":
            await self._settle_invoke(pending)


class FunctionExecutor(Protocol):
    """Executes one invocation of a function: local Python code (`runtime.local`) or an SDK
    app over HTTP (`sdk.executor`). Returns the function's output, or raises what the runner
    handles: `Reschedule`, `RunEnded`, or the error that ends the attempt."""

    async def __call__(self, inv: Invocation) -> Any:
        """Run `inv` until it returns, waits or fails."""
