"""Which calls one invocation of an SDK function makes, and when: the discovery call, the
planned steps of a parallel group run concurrently, race mode.

As Inngest's executor does it:
- A call with `stepId=step` (discovery) runs the function from the top; its answer says what
  comes next. Several `StepPlanned` ops in one answer are a parallel group: each planned step
  gets a call of its own (`stepId=<hash>`), all at once, each with the memo as it stood when
  the group was planned, so none sees the others' results.
- Once an answer holds more than one op, calls carry `disable_immediate_execution: true`, so
  the SDK plans every new step instead of running it inside a discovery call. SDKs of
  execution version 2 and up (both official SDKs today) coalesce: the discovery after a group
  waits until every step of the group is done, and once a step's result ends the group it is
  sent with `disable_immediate_execution: false` again. A group that ends when a sleep (or a
  wait) in it ends keeps the flag on, across the pause, until the next step's result. Older
  SDKs get a discovery after each step, and the flag stays on for the rest of the run.
- A planned step in race mode (`opts.parallelMode: "race"`) gets a discovery as soon as it is
  done, while its siblings still run, so the function continues at once (`Promise.race`). If
  that discovery finishes the run, calls still running are abandoned.

Each answer is committed as it arrives (a step's result is durable before the function goes
on, whatever its siblings do). Step errors that will be retried, and steps that wait, are
settled once no call is in flight: the run is rescheduled, and resumes with a discovery call.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devserver.errors import Reschedule
from devserver.ids import new_ulid
from devserver.model.failures import stored_error
from devserver.runtime.invocation import Invocation
from devserver.sdk.protocol import (
    OP_AI_GATEWAY,
    OP_DEFER_ABORT,
    OP_DEFER_ADD,
    OP_INVOKE,
    OP_RUN_COMPLETE,
    OP_SLEEP,
    OP_STEP_PLANNED,
    OP_WAIT_FOR_EVENT,
    ROOT_STEP,
    Op,
    Reply,
    SdkError,
    SdkNonRetriableError,
    sdk_error,
    step_uid,
)

if TYPE_CHECKING:
    from devserver.sdk.executor import SdkExecutor

log = logging.getLogger(__name__)

MAX_CALLS = 1000
"""Calls one invocation may make: a guard against an app that plans steps forever."""
COALESCING_VERSION = 2
"""The execution version from which the SDK expects one discovery per parallel group."""


@dataclass(frozen=True, slots=True)
class Call:
    """One call to the app: what it targets and with which attempt and flags."""

    target: str
    """`ROOT_STEP` (discovery) or the hashed id of a planned step."""
    attempt: int
    force_plan: bool
    """`disable_immediate_execution`: the SDK plans new steps instead of running them."""
    races: bool = False
    started: int = 0
    call_id: str = ""
    """`ctx.qi_id`: names the call when the SDK checkpoints steps during it."""


class _Finished(Exception):
    """The function returned (carries its output)."""

    def __init__(self, output: Any) -> None:
        super().__init__("finished")
        self.output = output


class CallPlan:
    """Drives one invocation of an SDK function: makes its calls, commits their answers."""

    def __init__(self, executor: SdkExecutor, inv: Invocation, url: str, *,
                 force: bool = False) -> None:
        self.executor = executor
        self.inv = inv
        self.url = url
        self.inflight: dict[asyncio.Task[Reply], Call] = {}
        self.group: set[str] = set()  # planned steps launched and not yet done
        self.retries: list[tuple[Op, Reply, int, int]] = []
        self.waits: list[int | None] = []
        self.force = force  # Inngest's ForceStepPlan, as the run's previous invocation left it
        self.coalesce = True
        self.calls = 0
        self.rediscover = False  # a discovery is wanted once the one in flight is done
        self.error: BaseException | None = None
        self.finished: _Finished | None = None
        self.lock = asyncio.Lock()  # one commit at a time: answers and checkpoints

    async def run(self) -> Any:
        """Make calls until the function finishes, waits or fails; return its output."""
        self._launch(ROOT_STEP, self.inv.attempt)
        try:
            while self.inflight:
                done, _ = await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
                # Answers that arrived together are committed in the order they were asked.
                for task in sorted(done, key=lambda t: self.inflight[t].started):
                    call = self.inflight.pop(task)
                    await self._answer(call, task)
                    if self.finished is not None:
                        self._abandon()
                        return self.finished.output
                if not self.inflight:
                    self._next()
        finally:
            self._abandon()
        if self.error is not None:
            raise self.error
        if self.retries:
            self.waits.extend(await self.executor.record_retries(self.inv, self.retries))
        raise Reschedule(earliest(self.waits))

    # -- launching calls ---------------------------------------------------------------------

    def _launch(self, target: str, attempt: int, *, races: bool = False) -> None:
        if self.calls >= MAX_CALLS:
            self.error = SdkNonRetriableError(stored_error(
                "StepLimitError", f"the app was called {MAX_CALLS} times in one go without "
                "finishing: does it plan the same steps again and again?"))
            return
        self.calls += 1
        if target == ROOT_STEP:
            self.rediscover = False
        started = self.executor.clock.now_ms()
        call = Call(target, attempt, self.force, races, started, new_ulid())
        task = asyncio.create_task(
            self.executor.call(self.inv, self.url, target, attempt=attempt,
                               force_plan=self.force, call_id=call.call_id),
            name=f"run {self.inv.run_id}: call {target}")
        self.inflight[task] = call

    def _discover(self) -> None:
        """Ask for a discovery now (one at a time: else once the one in flight is done)."""
        if self.error is not None:
            return
        if any(call.target == ROOT_STEP for call in self.inflight.values()):
            self.rediscover = True
        else:
            self._launch(ROOT_STEP, self.inv.attempt)

    def _next(self) -> None:
        """Nothing is in flight: rediscover, unless the run fails, waits or retries a step."""
        if self.error is not None or self.retries or self.waits:
            return
        self.group.clear()
        self._launch(ROOT_STEP, self.inv.attempt)

    def _abandon(self) -> None:
        """Cancel calls still in flight (the run finished or failed without them)."""
        for task in self.inflight:
            task.cancel()
        self.inflight.clear()

    # -- answers -----------------------------------------------------------------------------

    async def _answer(self, call: Call, task: asyncio.Task[Reply]) -> None:
        try:
            reply = task.result()
        except SdkError as exc:
            self.error = self.error or exc
            return
        if reply.version is not None:
            self.coalesce = reply.version >= COALESCING_VERSION
        if reply.ops is None:
            if reply.error is not None:
                self.error = self.error or sdk_error(
                    reply.error, no_retry=reply.no_retry, retry_at_ms=reply.retry_at_ms,
                    reason=reply.reason)
            else:
                self.finished = _Finished(reply.output)
            return
        async with self.lock:
            # After an error, still commit what this call did (a step's result must not be
            # lost), but plan nothing new.
            await self._commit(call, reply, plan=self.error is None)
        if self.error is not None:
            return
        if self.rediscover and not any(c.target == ROOT_STEP for c in self.inflight.values()):
            self._launch(ROOT_STEP, self.inv.attempt)

    async def checkpoint(self, call_id: str, ops: list[Op]) -> bool:
        """Commit what the SDK checkpointed during call `call_id` (while that call is still
        in flight, running the next steps); False if no such call is in flight."""
        call = next((c for c in self.inflight.values() if c.call_id == call_id), None)
        if call is None or self.finished is not None:
            return False
        async with self.lock:
            await self._commit(call, Reply(206, ops=ops), plan=False, checkpoint=True)
        return True

    async def _commit(self, call: Call, reply: Reply, *, plan: bool,
                      checkpoint: bool = False) -> None:
        inv = self.inv
        ops = reply.ops or []
        inv.attempt = call.attempt
        await self.executor.record_metadata(inv, ops)
        if len(ops) > 1:
            self.force = True
        planned: list[Op] = []
        finished_step = False
        for op in ops:
            inv.attempt = call.attempt
            if op.op == OP_RUN_COMPLETE:
                self.finished = _Finished(op.data)
                return
            if op.op == OP_STEP_PLANNED:
                if plan and step_uid(op) not in inv.memo and op.id not in self.group \
                        and all(p.id != op.id for p in planned):
                    planned.append(op)
            elif op.op in (OP_DEFER_ADD, OP_DEFER_ABORT):
                await self.executor.defer(inv, op, call.started)
            elif op.op == OP_AI_GATEWAY:
                try:
                    await self.executor.ai_gateway(inv, op, call.started)
                except Reschedule as wait:  # the request failed; retried with backoff
                    self.waits.append(wait.at_ms)
                else:
                    finished_step = True
            elif op.op in (OP_SLEEP, OP_WAIT_FOR_EVENT, OP_INVOKE):
                try:
                    await self.executor.wait(inv, op, step_uid(op), call.started)
                except Reschedule as wait:  # waiting now; planned steps may still run
                    self.waits.append(wait.at_ms)
            elif self.executor.will_retry(inv, op, reply):
                # Recorded once no call is in flight: a retry reschedules the run, and a
                # sibling's success must not reset this step's attempt count.
                self.retries.append((op, reply, call.started, call.attempt))
            else:
                known = step_uid(op) in inv.memo
                await self.executor.apply(inv, op, reply, call.started)
                finished_step = finished_step or not known
                self.group.discard(op.id)
        if checkpoint:
            return  # the call goes on; its answer says what comes next
        for op in planned:
            self.group.add(op.id)
            self._launch(op.id, call.attempt, races=op.races)
        if call.target != ROOT_STEP:
            self.group.discard(call.target)
            if finished_step and self.coalesce and not (self.group or self.waits
                                                        or self.retries):
                # The group is over with a step's result: the SDK may run steps at once
                # again. While a sleep, a wait or a retry of the group is pending the flag
                # stays on, across the pause, until the next step's result (as Inngest's
                # ForceStepPlan does).
                self.force = False
            if finished_step and (call.races or not self.coalesce):
                self._discover()  # race mode: the function goes on at once
        elif finished_step and not self.group:
            self._discover()  # a step ran inside the discovery call: on to the next


def earliest(waits: list[int | None]) -> int | None:
    """When to look again at a run waiting for several things (None: only when woken)."""
    times = [at for at in waits if at is not None]
    return min(times) if times else None
