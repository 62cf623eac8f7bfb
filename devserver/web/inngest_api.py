"""Inngest's own HTTP API, as its SDKs and clients call it: the event API (`POST /e/{key}`:
store the events, all or none, and start their runs), `/health`, and the REST endpoints
`/v1/events/{id}`, `/v1/events/{id}/runs` and `/v1/runs/{id}` (read, and `DELETE` to cancel)
in Inngest's `{"data": ...}` envelope.

Handlers only translate: read the request, call the runner or the store, shape the JSON
(`web.documents`). Errors leave through `web.responses`; the event API's carry `"ids": []`.
"""

from __future__ import annotations

from aiohttp import web

from devserver.clock import iso
from devserver.errors import NotFound, PayloadTooLarge, UserError
from devserver.model.events import MAX_BODY_BYTES, parse_body
from devserver.sdk.protocol import EVENT_ID_SEED_HEADER, seeded_ids
from devserver.web.api import RUNNER, STORE
from devserver.web.documents import event_doc, inngest_run_doc
from devserver.web.params import env_of, header_text
from devserver.web.responses import json_ok

routes = web.RouteTableDef()


# ---------------------------------------------------------------------------------------------
# Event API and health


@routes.post("/e/{event_key:[^/]+}")  # any key: aiohttp's default pattern refuses { and }
async def post_events(request: web.Request) -> web.Response:
    """Inngest's event API: store the events (all or none) and start their runs."""
    body = await request.read()
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    events = parse_body(body)
    # The SDKs seed their events' ids so that sending again (after a lost answer) starts
    # nothing twice: the same seed gives the same ids, and a repeat is a no-op.
    seeded = seeded_ids(header_text(request, EVENT_ID_SEED_HEADER), len(events))
    ids = await request.app[RUNNER].ingest(env_of(request), events, ids=seeded)
    # The busiest answer of all, built directly: ULIDs are ASCII and need no escaping.
    quoted = '","'.join(ids)
    return web.Response(body=f'{{"ids":["{quoted}"],"status":200}}'.encode() if ids
                        else b'{"ids":[],"status":200}', content_type="application/json",
                        charset="utf-8")


@routes.post("/e")
@routes.post("/e/")
async def post_events_without_key(request: web.Request) -> web.Response:
    """The event API needs a key in the path; say so instead of a bare 404."""
    raise UserError("an event key is required: POST /e/{event_key} (any non-empty key)")


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness, in the shape of Inngest's dev server."""
    return json_ok({"status": 200, "message": "OK"})


# ---------------------------------------------------------------------------------------------
# Inngest REST API


@routes.get("/v1/events/{event_id}")
async def v1_event(request: web.Request) -> web.Response:
    """An event by the id `/e/` returned, in Inngest's `{"data": ...}` envelope."""
    event_id = request.match_info["event_id"]
    ev = await request.app[STORE].event(event_id)
    if ev is None:
        raise NotFound(f"no event with id {event_id!r}")
    return json_ok({"data": event_doc(ev)})


@routes.get("/v1/events/{event_id}/runs")
async def v1_event_runs(request: web.Request) -> web.Response:
    """The runs an event started, in Inngest's shape."""
    event_id = request.match_info["event_id"]
    store = request.app[STORE]
    if await store.event(event_id) is None:
        raise NotFound(f"no event with id {event_id!r}")
    runs = await store.event_runs(event_id)
    return json_ok({"data": [inngest_run_doc(run) for run in runs],
                    "metadata": {"fetched_at": iso(request.app[RUNNER].clock.now_ms()),
                                 "cached_until": None}})


@routes.get("/v1/runs/{run_id}")
async def v1_run(request: web.Request) -> web.Response:
    """A run's status and output, in Inngest's shape."""
    run_id = request.match_info["run_id"]
    detail = await request.app[STORE].run_detail(run_id)
    if detail is None:
        raise NotFound(f"no run with id {run_id!r}")
    return json_ok({"data": inngest_run_doc(detail.run)})


@routes.delete("/v1/runs/{run_id}")
async def v1_cancel_run(request: web.Request) -> web.Response:
    """Cancel a run (a no-op once it has ended); answers with the run as it now stands."""
    run = await request.app[RUNNER].cancel(request.match_info["run_id"])
    return json_ok({"data": inngest_run_doc(run)})
