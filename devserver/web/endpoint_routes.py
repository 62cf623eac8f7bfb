"""The routes a durable endpoint's caller and its SDK use once a run is asynchronous
(`devserver.sdk.endpoints`).

- `GET /v1/http/runs/{run_id}/output?token=` (also under `/v1/checkpoint/`): where the SDK
  redirects the caller (302). Waits for the run to end, up to `RunStreams.wait_s` (5 minutes,
  as Inngest); answers
  `{"data": <the endpoint's response: status, headers, body>}` for a completed run, the
  error as stored for a failed one, `{"status": "cancelled", ...}` for a cancelled one,
  and `{"status": "running", ...}` when it is still going (all 200, as Inngest answers).
- `POST /v1/realtime/publish/tee?channel={run_id}`: the SDK streams what an asynchronous
  call of the endpoint writes (`stream.push`, `stream.pipe`, its result) as SSE bytes.
- `GET /v1/realtime/sse?token=`: the caller's stream after the redirect (`inngest.redirect_info`):
  every byte published for the run so far, then the rest as it comes, until the endpoint's
  result (`inngest.response`) or the run's end (`devserver.sdk.streams`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from devserver.errors import NotFound, UserError
from devserver.model.records import CANCELLED, COMPLETED, UNFINISHED, RunRecord
from devserver.sdk.endpoint_calls import token_run
from devserver.sdk.streams import RunStreams, result_event
from devserver.web.api import STORE
from devserver.web.responses import error_response, json_ok

STREAMS = web.AppKey("run_streams", RunStreams)
POLL_S = 0.05
"""How often a waiting reader looks at the run again."""
routes = web.RouteTableDef()


def _run_of(request: web.Request, run_id: str | None = None) -> str:
    token = request.query.get("token", "")
    owner = token_run(token) if token else None
    if owner is None or (run_id is not None and owner != run_id):
        raise web.HTTPUnauthorized(
            text='{"status": 401, "error": "no run with this token"}',
            content_type="application/json")
    return owner


async def _ended(request: web.Request, run_id: str, wait_s: float) -> RunRecord | None:
    """The run once it has ended, or its latest state when `wait_s` is up."""
    store = request.app[STORE]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        run = await store.run(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} not found")
        if run.status not in UNFINISHED or loop.time() >= deadline:
            return run
        await asyncio.sleep(POLL_S)


def output_doc(run: RunRecord, wait_s: float) -> dict[str, Any]:
    """What the output endpoint answers for a run."""
    if run.status == COMPLETED:
        return {"data": run.output}
    if run.status == CANCELLED:
        return {"status": "cancelled", "message": f"run {run.run_id} was cancelled"}
    if run.status in UNFINISHED:
        return {"status": "running",
                "message": f"run {run.run_id} did not end within {wait_s:g} seconds"}
    return dict(run.error or {"message": f"run {run.run_id} failed"})


async def _output(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    _run_of(request, run_id)
    wait_s = request.app[STREAMS].wait_s
    run = await _ended(request, run_id, wait_s)
    assert run is not None
    return json_ok(output_doc(run, wait_s))


routes.get("/v1/http/runs/{run_id}/output")(_output)
routes.get("/v1/checkpoint/{run_id}/output")(_output)


@routes.post("/v1/realtime/publish/tee")
async def publish_tee(request: web.Request) -> web.Response:
    """The SDK's stream of an asynchronous call, relayed to the run's readers."""
    run_id = request.query.get("channel", "")
    if not run_id:
        raise UserError("query parameter 'channel' (the run id) is required")
    if await request.app[STORE].run(run_id) is None:
        raise NotFound(f"run {run_id!r} not found")
    streams = request.app[STREAMS]
    with streams.publishing(run_id):
        async for chunk in request.content.iter_any():
            streams.publish(run_id, chunk)
    return json_ok({"status": 200})


@routes.get("/v1/realtime/sse")
async def realtime_sse(request: web.Request) -> web.StreamResponse:
    """The stream of a run for the endpoint's caller, after the SDK's redirect."""
    run_id = _run_of(request)
    store = request.app[STORE]
    if await store.run(run_id) is None:
        return error_response(404, f"run {run_id!r} not found")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        await _relay(request, response, run_id)
        await response.write_eof()
    except ConnectionResetError:  # the caller went away: nothing is lost, the run goes on
        pass
    return response


async def _relay(request: web.Request, response: web.StreamResponse, run_id: str) -> None:
    """Write the run's stream until its result event, the run's end, or the deadline."""
    store = request.app[STORE]
    streams = request.app[STREAMS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + streams.wait_s
    offset = 0
    while True:
        chunk, offset, answered = streams.read(run_id, offset)
        if chunk:
            await response.write(chunk)
        if answered:
            return
        run = await store.run(run_id)
        if run is None or loop.time() >= deadline:
            return
        if run.status not in UNFINISHED and not streams.open(run_id):
            # Ended without the SDK's result event (failed by the server, cancelled...).
            chunk, offset, answered = streams.read(run_id, offset)
            if chunk:
                await response.write(chunk)
            if not answered:
                await response.write(result_event(run))
            return
        await streams.wait(run_id, POLL_S)
