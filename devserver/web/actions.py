"""The dashboard's actions as JSON endpoints (SPEC 5: every button is a JSON endpoint first):
rerun a run, rerun a session's failed runs, invoke a function with a payload, trigger a cron
function now. Cancel is Inngest's `DELETE /v1/runs/{id}` and Send is `POST /e/{key}`
(`inngest_api`); Sync is `POST /api/apps/sync` (`sdk_routes`).

Every one changes state, so `web.guard` refuses it when a browser sends it from another origin;
the dashboard's own pages call them same-origin. Bad input is one clear JSON error, nothing
stored.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devserver.app import CRON_EVENT, INVOKED_EVENT
from devserver.errors import NotFound, UserError
from devserver.ids import new_ulid
from devserver.jsontext import dump_json
from devserver.model.events import loads, validate_event
from devserver.model.records import NewEvent, NewRun
from devserver.web.api import RUNNER, STORE
from devserver.web.documents import run_summary_doc
from devserver.web.params import env_of, required_param
from devserver.web.responses import json_ok

routes = web.RouteTableDef()

MAX_RERUNS = 200
"""The most failed runs one "rerun failed runs" starts (press again for more)."""


async def _rerun(request: web.Request, run_id: str) -> dict[str, Any]:
    runner, store = request.app[RUNNER], request.app[STORE]
    old = await store.run(run_id)
    if old is None:
        raise NotFound(f"no run with id {run_id!r}")
    if runner.registry.get(old.function_id) is None:
        raise UserError(f"function {old.function_id!r} of run {run_id} is not registered "
                        "any more: it can't be rerun")
    now = runner.clock.now_ms()
    new = await store.rerun(run_id, new_ulid(), now)
    if new is None:
        raise NotFound(f"no run with id {run_id!r}")
    runner.schedule(new.run_id, now)
    return run_summary_doc(new)


@routes.post("/api/runs/{run_id}/rerun")
async def rerun_run(request: web.Request) -> web.Response:
    """A new run of the same function on the same event(s), linked to the old one."""
    run_id = request.match_info["run_id"]
    return json_ok({"rerun_of": run_id, "run": await _rerun(request, run_id)})


@routes.post("/api/session/rerun-failed")
async def rerun_failed(request: web.Request) -> web.Response:
    """Rerun each failed run of the session `?identifier=&value=` not rerun yet (at most
    MAX_RERUNS a call)."""
    env = env_of(request)
    identifier = required_param(request, "identifier")
    value = required_param(request, "value")
    store = request.app[STORE]
    if await store.session(env, identifier, value, limit=1) is None:
        raise NotFound(f"no session {identifier}={value!r} in environment {env!r}")
    failed = await store.session_failed_run_ids(env, identifier, value, limit=MAX_RERUNS)
    reruns = [{"rerun_of": run_id, "run": await _rerun(request, run_id)} for run_id in failed]
    return json_ok({"env": env, "identifier": identifier, "value": value, "reruns": reruns})


async def _object_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    body = loads(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object such as "
                        '{"data": {...}, "sessions": {...}}')
    unknown = sorted(set(body) - {"data", "sessions", "user"})
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(map(repr, unknown))}: the body takes "
                        "data, sessions and user")
    return body


async def _start(request: web.Request, name: str, body: dict[str, Any],
                 source: str | None) -> web.Response:
    """Store one event that starts exactly one run of the function in the path."""
    runner, store = request.app[RUNNER], request.app[STORE]
    function_id = request.match_info["function_id"]
    fn = next((f for f in runner.functions if f.id == function_id), None)
    if fn is None:
        raise NotFound(f"no function with id {function_id!r}")
    if fn.endpoint:
        raise UserError(f"function {fn.id!r} is a durable endpoint: its runs start when its URL "
                        "is requested, so it cannot be invoked or triggered from here")
    # Validated as an event would be (a stand-in name: the real one is reserved).
    checked = validate_event({"name": "dashboard/invoke", **body}, 0)
    env = env_of(request)
    now = runner.clock.now_ms()
    event = NewEvent(
        internal_id=new_ulid(), name=name, event_id=None, ts=now,
        data=dump_json({"cron": fn.crons[0].cron} if name == CRON_EVENT else checked.data),
        v=None, user=None if checked.user is None else dump_json(checked.user), meta=None,
        sessions=checked.sessions, runs=(NewRun(new_ulid(), fn.id),), source=source)
    created = await store.ingest(env, now, [event])
    await runner.after_ingest(env, [event], created)
    return json_ok({"env": env, "function_id": fn.id, "event_id": event.internal_id,
                    "run_ids": created})


@routes.post("/api/functions/{function_id}/invoke")
async def invoke_function(request: web.Request) -> web.Response:
    """Start a run of the function with `{"data": {...}, "sessions": {...}}` as its event."""
    return await _start(request, INVOKED_EVENT, await _object_body(request), None)


@routes.post("/api/functions/{function_id}/trigger")
async def trigger_cron(request: web.Request) -> web.Response:
    """Run a cron function now, as its schedule would."""
    fn = next((f for f in request.app[RUNNER].functions
               if f.id == request.match_info["function_id"]), None)
    if fn is not None and not fn.crons:
        raise UserError(f"function {fn.id!r} has no cron trigger: use invoke instead")
    return await _start(request, CRON_EVENT, {}, "cron")
