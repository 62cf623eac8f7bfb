"""Durable endpoints: runs that an SDK app starts itself (TypeScript's `inngest.endpoint`).

A plain HTTP request to a durable endpoint runs its steps right there, in the app. The SDK
records the run here as it goes: `POST /v1/checkpoint` creates the run with its first steps
(its trigger is the `inngest/http.request` event the SDK built from the request), then
`POST /v1/checkpoint/{run_id}/steps` adds the next ones, each committed at once; the
`RunComplete` op ends the run with the endpoint's response as its output. Steps are stored
like any run's, so the run shows on the dashboard and in the API, with its sessions (from
the event's `meta.sessions`, if any).

Only the synchronous path is served: an endpoint whose step fails or waits asks to switch
the run to asynchronous execution, which needs a token from `POST /v1/checkpoint`; none is
given, so the SDK answers the request with the error instead.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from devserver.clock import Clock
from devserver.errors import NotFound, UserError
from devserver.ids import is_ulid, new_ulid
from devserver.jsontext import dump_json
from devserver.model.records import COMPLETED, FAILED, NewEvent, NewRun, StepAttempt
from devserver.runtime.runner import DEFAULT_ENV
from devserver.sdk.callbody import function_uuid
from devserver.sdk.protocol import (
    OP_RUN_COMPLETE,
    OP_STEP_RUN,
    Op,
    ProtocolError,
    error_doc,
    kind_of,
    parse_ops,
    step_uid,
)

if TYPE_CHECKING:
    from devserver.store.facade import Store

log = logging.getLogger(__name__)

class DurableEndpoints:
    """Records the runs of durable endpoints as their SDK checkpoints them."""

    def __init__(self, store: Store, clock: Clock, env: str = DEFAULT_ENV) -> None:
        self.store = store
        self.clock = clock
        self.env = env

    async def start(self, body: Any) -> dict[str, Any]:
        """`POST /v1/checkpoint`: create the run (with the steps already done)."""
        if not isinstance(body, dict):
            raise UserError(f"a new run checkpoint must be a JSON object, got {kind_of(body)}")
        run_id, event = body.get("run_id"), body.get("event")
        if not isinstance(run_id, str) or not is_ulid(run_id):
            raise UserError("checkpoint: 'run_id' must be the run's ULID")
        if not isinstance(event, dict) or not isinstance(event.get("name"), str):
            raise UserError("checkpoint: 'event' must be an event object with a 'name'")
        raw = event.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        # Named by the SDK's function id if it sends one, else by the endpoint's path.
        function_id = str(data.get("fn") or f"endpoint {data.get('path') or '/'}")
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
        await self.steps(run_id, body.get("steps"))
        fn_uuid = function_uuid(function_id)
        return {"data": {"fn_id": fn_uuid, "app_id": fn_uuid, "run_id": run_id,
                         "realtime_token": f"devserver:{run_id}"}}

    async def steps(self, run_id: str, steps: Any) -> None:
        """`POST /v1/checkpoint/{run_id}/steps`: commit steps; `RunComplete` ends the run."""
        if await self.store.run(run_id) is None:
            raise NotFound(f"run {run_id!r} not found")
        try:
            ops = parse_ops(steps if steps is not None else [])
        except ProtocolError as exc:
            raise UserError(f"checkpoint: 'steps': {exc.message}") from None
        for op in ops:
            await self._apply(run_id, op)

    async def _apply(self, run_id: str, op: Op) -> None:
        now = self.clock.now_ms()
        if op.op == OP_RUN_COMPLETE:
            await self.store.finish_run(run_id, COMPLETED, now, output=_output(op.data))
        elif op.op == OP_STEP_RUN:
            record = StepAttempt(0, step_uid(op), "run", 0, COMPLETED, now, now, op.data, None,
                                 final=True)
            await self.store.record_attempt(run_id, record, 0)
        elif op.error is not None:
            error = error_doc(op.error)
            record = StepAttempt(0, step_uid(op), "run", 0, FAILED, now, now, None, error,
                                 final=False)
            await self.store.record_attempt(run_id, record, 0)
        else:
            log.debug("run %s: durable endpoint op %s not recorded", run_id, op.op)


def _output(data: Any) -> Any:
    """The endpoint's response as the run's output (the SDK sends `{data: {status, body}}`
    or the bare result)."""
    if isinstance(data, dict) and set(data) == {"data"}:
        return data["data"]
    return data
