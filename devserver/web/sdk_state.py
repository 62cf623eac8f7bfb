"""The routes an SDK reads and writes a run's state through while the run executes.

- `GET /v0/runs/{run_id}/actions` and `GET /v0/runs/{run_id}/batch`: the memo (hashed step id
  -> outcome) and the events of a run, for a call that said `use_api: true` because they
  would have made its body too large (see `devserver.sdk.callbody.encode_call`).
- `POST /v1/checkpoint/{run_id}/async`: the TypeScript SDK's checkpointing: during a call it
  runs steps one after another and reports each here as it is done; each is committed at
  once, so it survives a crash of the app or of this server before the call answers. A call
  that is not in flight any more answers 409 (a stale dispatch: the SDK stops there).
- `POST /v1/checkpoint` and `POST /v1/checkpoint/{run_id}/steps`: durable endpoints, runs
  an app starts and runs itself (`devserver.sdk.endpoints`).

Handlers only translate; the state comes from the store and the commits go through the SDK
executor (`devserver.sdk.executor.SdkExecutor.checkpoint`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devserver.errors import NotFound, UserError
from devserver.model.events import loads
from devserver.model.records import event_dict
from devserver.sdk.callbody import memo_steps
from devserver.sdk.endpoints import DurableEndpoints
from devserver.sdk.executor import SdkExecutor
from devserver.sdk.protocol import ProtocolError, parse_ops, sdk_event
from devserver.web.api import STORE
from devserver.web.responses import error_response, json_ok

SDK_EXECUTOR = web.AppKey("sdk_executor", SdkExecutor)
ENDPOINTS = web.AppKey("durable_endpoints", DurableEndpoints)
routes = web.RouteTableDef()


async def _state(request: web.Request) -> Any:
    run_id = request.match_info["run_id"]
    state = await request.app[STORE].run_state(run_id)
    if state is None:
        raise NotFound(f"run {run_id!r} not found")
    return state


@routes.get("/v0/runs/{run_id}/actions")
async def run_actions(request: web.Request) -> web.Response:
    """The memo of a run as the SDKs read it: hashed step id -> `{data}` / `{error}` / ..."""
    return json_ok(memo_steps((await _state(request)).memo))


@routes.get("/v0/runs/{run_id}/batch")
async def run_batch(request: web.Request) -> web.Response:
    """The events of a run (its trigger, or its batch), as a call would carry them."""
    return json_ok([sdk_event(event_dict(ev)) for ev in (await _state(request)).events])


@routes.post("/v1/checkpoint/{run_id}/async")
async def checkpoint_async(request: web.Request) -> web.Response:
    """Commit the steps an SDK checkpointed during a call (`qi_id`) of an executing run."""
    run_id = request.match_info["run_id"]
    body = loads(await request.read())
    if not isinstance(body, dict):
        raise UserError("a checkpoint must be a JSON object with 'qi_id' and 'steps'")
    call_id, steps = body.get("qi_id"), body.get("steps")
    if not isinstance(call_id, str) or not call_id:
        raise UserError("checkpoint: 'qi_id' (the call's id, ctx.qi_id) must be a string")
    try:
        ops = parse_ops(steps if steps is not None else [])
    except ProtocolError as exc:
        raise UserError(f"checkpoint: 'steps': {exc.message}") from None
    if not await request.app[SDK_EXECUTOR].checkpoint(run_id, call_id, ops):
        return error_response(409, f"run {run_id}: call {call_id} is not in flight (a stale "
                                   "dispatch: the run was called again, or has ended)")
    return json_ok({"status": 200, "run_id": run_id})


@routes.post("/v1/checkpoint")
async def checkpoint_new_run(request: web.Request) -> web.Response:
    """A durable endpoint's run begins: create it, with the steps it has run so far."""
    return json_ok(await request.app[ENDPOINTS].start(loads(await request.read())))


@routes.post("/v1/checkpoint/{run_id}/steps")
async def checkpoint_steps(request: web.Request) -> web.Response:
    """A durable endpoint's run goes on: commit its next steps (RunComplete ends it)."""
    body = loads(await request.read())
    if not isinstance(body, dict):
        raise UserError("a checkpoint must be a JSON object with 'steps'")
    await request.app[ENDPOINTS].steps(request.match_info["run_id"], body.get("steps"))
    return json_ok({"status": 200, "run_id": request.match_info["run_id"]})
