"""Durable endpoints: runs that an SDK app starts itself (TypeScript's `inngest.endpoint`).

A plain HTTP request to a durable endpoint runs its steps right there, in the app (the
synchronous path). The SDK records the run here as it goes: `POST /v1/checkpoint` creates
the run with its first steps (its trigger is the `inngest/http.request` event the SDK built
from the request), then `POST /v1/checkpoint/{run_id}/steps` adds the next ones, each
committed at once; the `RunComplete` op ends the run with the endpoint's response as its
output (`{status, headers, body}`). Steps are stored like any run's, so the run shows on the
dashboard and in the API, with its sessions (from the event's `meta.sessions`, if any).

The asynchronous path. When a step must wait (`step.sleep`, `waitForEvent`, `invoke`), fails
and will be retried, or steps run in parallel, the SDK checkpoints that op and switches the
run to asynchronous execution: it answers its caller with a 302 to
`/v1/http/runs/{run_id}/output?token=` (or, to a caller that accepts `text/event-stream`,
ends the stream with a redirect to `/v1/realtime/sse?token=`), using the token every new run
gets here. This server then takes the run over: the op is committed through the same durable
step logic as any run's (a sleep wakes on the clock, a failed step is retried with the
function's backoff, a wait matches later events), and the run is registered with the runner
as a function of its own (`endpoint_calls.endpoint_function`), so the runner continues it by
calling the endpoint again with the run's memo (`endpoint_calls.endpoint_request`), until it
completes or fails, with retries as for any run. Its steps and sessions show on the dashboard
like any run's. A restart resumes it like any run: the endpoint functions of unfinished runs
are registered again from their trigger events before the runner starts (`restore`).

Choices where Inngest is silent or differs:
- Every new run gets its token, not only one whose first checkpoint holds an async op as in
  Inngest (the SDK can only switch to async with the token of the first checkpoint).
- A function-level error in the synchronous request (`StepError` on the placeholder step
  `complete`) hands the run over at once; the call that continues it is its next attempt.
- A synchronous run the SDK goes quiet on (the app died mid-request, or the handler threw
  where the SDK does not checkpoint: a final error) is continued asynchronously once
  `quiet_ms` (15 minutes) passed since its last checkpoint, so it ends with the outcome the
  endpoint gives (Inngest plans to fail such runs after an hour). The deadline is stored,
  so a restart keeps it.
- The output endpoint waits for the run to end up to 5 minutes, as Inngest does
  (`streams.WAIT_S`), then answers `{"status": "running", ...}`; a completed run answers `{"data":
  <the endpoint's response>}`, a failed one the error as stored (`devserver.web.endpoint_routes`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from devserver.app import FunctionDef
from devserver.clock import Clock, TimerHandle
from devserver.errors import NotFound, Reschedule, RunEnded, UserError
from devserver.ids import is_ulid, new_ulid
from devserver.jsontext import dump_json
from devserver.model.records import COMPLETED, UNFINISHED, NewEvent, NewRun, StepAttempt
from devserver.runtime.invocation import Invocation
from devserver.runtime.runner import DEFAULT_ENV
from devserver.sdk.callbody import function_uuid
from devserver.sdk.calls import earliest
from devserver.sdk.endpoint_calls import (
    HTTP_REQUEST_EVENT,
    endpoint_function,
    endpoint_function_id,
    run_token,
)
from devserver.sdk.protocol import (
    OP_INVOKE,
    OP_RUN_COMPLETE,
    OP_SLEEP,
    OP_STEP_ERROR,
    OP_STEP_FAILED,
    OP_STEP_RUN,
    OP_WAIT_FOR_EVENT,
    Op,
    ProtocolError,
    Reply,
    kind_of,
    parse_ops,
    step_uid,
)

if TYPE_CHECKING:
    from devserver.runtime.runner import Runner
    from devserver.sdk.executor import SdkExecutor
    from devserver.store.facade import Store

log = logging.getLogger(__name__)

QUIET_MS = 15 * 60 * 1000
"""How long a synchronous run may go without a checkpoint before the server continues it."""
FUNCTION_ERROR_ID = hashlib.sha1(b"complete").hexdigest()
"""The step id the SDK reports a function-level error of the synchronous path under."""
WAITS = (OP_SLEEP, OP_WAIT_FOR_EVENT, OP_INVOKE)


class DurableEndpoints:
    """Records the runs of durable endpoints as their SDK checkpoints them, and hands them
    to the runner once they go asynchronous."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, executor: SdkExecutor,
                 env: str = DEFAULT_ENV, *, quiet_ms: int = QUIET_MS) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.executor = executor
        self.env = env
        self.quiet_ms = quiet_ms
        self._quiet: dict[str, TimerHandle] = {}  # synchronous runs' deadlines, by run id

    async def restore(self) -> None:
        """Register the endpoint functions of unfinished endpoint runs (before the runner
        starts, so it resumes them like any run)."""
        for run_id, function_id, _due in await self.store.unfinished_runs():
            if self.runner.registry.get(function_id) is not None:
                continue
            state = await self.store.run_state(run_id)
            if state is None or not state.events or state.events[0].name != HTTP_REQUEST_EVENT:
                continue
            data = state.events[0].data if isinstance(state.events[0].data, dict) else {}
            self._function(function_id, data, None)

    def stop(self) -> None:
        """Cancel the deadlines of synchronous runs (kept in the store for the next start)."""
        for timer in self._quiet.values():
            timer.cancel()
        self._quiet.clear()

    def _function(self, function_id: str, data: dict[str, Any], retries: Any) -> FunctionDef:
        known = self.runner.registry.get(function_id)
        if known is not None:
            if not known.endpoint:
                raise UserError(f"checkpoint: {function_id!r} is a function of an SDK app, "
                                "not a durable endpoint")
            return known
        fn = endpoint_function(function_id, data, retries)
        self.runner.register([fn])
        return fn

    async def start(self, body: Any) -> dict[str, Any]:
        """`POST /v1/checkpoint`: create the run (with the steps already done)."""
        if not isinstance(body, dict):
            raise UserError(f"a new run checkpoint must be a JSON object, got {kind_of(body)}")
        run_id, event = body.get("run_id"), body.get("event")
        if not isinstance(run_id, str) or not is_ulid(run_id):
            raise UserError("checkpoint: 'run_id' must be the run's ULID")
        if not isinstance(event, dict) or not isinstance(event.get("name"), str):
            raise UserError("checkpoint: 'event' must be an event object with a 'name'")
        try:
            ops = parse_ops(body.get("steps") or [])
        except ProtocolError as exc:
            raise UserError(f"checkpoint: 'steps': {exc.message}") from None
        raw = event.get("data")
        data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
        function_id = endpoint_function_id(data)
        retries = body.get("retries")
        fn = self._function(function_id, data, retries)
        now = self.clock.now_ms()
        meta = event.get("meta")
        sessions = meta.get("sessions") if isinstance(meta, dict) else None
        new = NewEvent(
            internal_id=new_ulid(), name=event["name"], event_id=None, ts=now,
            data=dump_json(data), v=None, user=None, meta=None,
            sessions={str(k): str(v) for k, v in sessions.items()}
            if isinstance(sessions, dict) else {},
            runs=(NewRun(run_id, function_id),), source=None)
        created = await self.store.ingest(self.env, now, [new])
        if run_id not in created:
            raise UserError(f"checkpoint: run {run_id} exists already")
        await self.store.start_run(run_id, now)
        await self._commit(run_id, ops)
        fn_uuid = function_uuid(function_id)
        token = run_token(run_id)
        return {"data": {"fn_id": fn_uuid, "app_id": function_uuid(fn.app_id),
                         "run_id": run_id, "token": token, "realtime_token": token}}

    async def steps(self, run_id: str, steps: Any) -> None:
        """`POST /v1/checkpoint/{run_id}/steps`: commit steps; `RunComplete` ends the run."""
        try:
            ops = parse_ops(steps if steps is not None else [])
        except ProtocolError as exc:
            raise UserError(f"checkpoint: 'steps': {exc.message}") from None
        await self._commit(run_id, ops)

    async def _commit(self, run_id: str, ops: list[Op]) -> None:
        state = await self.store.run_state(run_id)
        if state is None:
            raise NotFound(f"run {run_id!r} not found")
        if state.run.status not in UNFINISHED:
            return  # ended meanwhile (cancelled, say): nothing more to record
        fn = self.runner.registry.get(state.run.function_id)
        if fn is None or not fn.endpoint:
            raise UserError(f"checkpoint: run {run_id} is not a durable endpoint's run")
        inv = Invocation(run_id=run_id, env=state.run.env, function=fn, events=state.events,
                         sessions=dict(state.run.sessions), memo=dict(state.memo),
                         pending=dict(state.pending), attempt=state.run.attempt,
                         store=self.store, clock=self.clock, backoff=self.runner.backoff,
                         runtime=self.runner, tries=dict(state.tries))
        due: list[int | None] = []
        handover = False
        for op in ops:
            now = self.clock.now_ms()
            uid = step_uid(op)
            if op.op == OP_RUN_COMPLETE:
                self._settled(run_id)
                await self.runner.complete(state, _output(op.data))
                return
            if op.op == OP_STEP_RUN:
                if uid not in inv.memo:
                    record = StepAttempt(0, uid, "run", 0, COMPLETED, now, now, op.data, None,
                                         final=True)
                    await self.store.record_attempt(run_id, record, 0, now + self.quiet_ms)
                    inv.memo[uid] = record
                continue
            handover = True
            if op.id == FUNCTION_ERROR_ID and op.op in (OP_STEP_ERROR, OP_STEP_FAILED):
                due.append(now)  # the function failed outside steps: its next attempt
                continue
            try:
                if op.op in WAITS:
                    await self.executor.wait(inv, op, uid, now)
                elif op.op in (OP_STEP_ERROR, OP_STEP_FAILED):
                    await self.executor.apply(inv, op, Reply(206, ops=[op]), now)
                due.append(now)  # done at once (a failed step memoized): call again now
            except Reschedule as wait:  # sleeping, waiting, or a step retry's backoff
                due.append(wait.at_ms)
            except RunEnded:  # cancelled meanwhile: nothing more to record or continue
                self._settled(run_id)
                return
        if handover:
            self._settled(run_id)
            at = earliest(due)
            log.debug("run %s: the durable endpoint went async; continued at %s", run_id, at)
            self.runner.schedule(run_id, at)
        elif ops:
            self._quiet_until(run_id, self.clock.now_ms() + self.quiet_ms)

    def _quiet_until(self, run_id: str, at_ms: int) -> None:
        """Continue a synchronous run at `at_ms` unless the SDK checkpoints before."""
        self._settled(run_id)
        self._quiet[run_id] = self.clock.call_at(at_ms, lambda: self._went_quiet(run_id))

    def _went_quiet(self, run_id: str) -> None:
        self._quiet.pop(run_id, None)
        log.info("run %s: no checkpoint from its durable endpoint for %d s; continuing it",
                 run_id, self.quiet_ms // 1000)
        self.runner.schedule(run_id, self.clock.now_ms())

    def _settled(self, run_id: str) -> None:
        timer = self._quiet.pop(run_id, None)
        if timer is not None:
            timer.cancel()


def _output(data: Any) -> Any:
    """The endpoint's response as the run's output (the SDK sends `{data: {status, body}}`
    or the bare result)."""
    if isinstance(data, dict) and set(data) == {"data"}:
        return data["data"]
    return data
