"""The documents of the dashboard's list pages and their JSON twins (SPEC 5): `/runs`,
`/events`, `/events/{id}`, `/functions`, `/apps`; and the filters every list takes as query
parameters (`status`, `function`, `q`, `last`, `start`, `end`, `cursor`, `limit`).

Each `*_doc` function builds the one dict a page renders and its `/api` twin returns, so the two
cannot disagree (the pattern of `api.sessions_doc`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devserver.clock import iso
from devserver.errors import NotFound
from devserver.model.records import RunRecord
from devserver.web.api import RUNNER, STORE
from devserver.web.documents import event_doc, run_summary_doc
from devserver.web.filters import error_line, status_param, window_param
from devserver.web.params import env_of, limit_param
from devserver.web.responses import json_ok
from devserver.web.sdk_routes import SDK_APPS

routes = web.RouteTableDef()

RECENT_RUNS = 5
FAILURE_WINDOW = 100
"""A function's failure rate is over its latest this many finished runs."""


def cursor_param(request: web.Request) -> str | None:
    return request.query.get("cursor") or None


def run_row_doc(run: RunRecord) -> dict[str, Any]:
    """A run as the lists show it: the summary, its sessions and its error's first line."""
    return {**run_summary_doc(run), "sessions": run.sessions,
            "error": error_line(run.error)}


# ---------------------------------------------------------------------------------------------
# Documents


async def runs_doc(request: web.Request) -> dict[str, Any]:
    """`/runs`: every run of the environment, newest first, filtered."""
    env = env_of(request)
    status = status_param(request)
    function = request.query.get("function") or request.query.get("function_id") or None
    q = (request.query.get("q") or "").strip() or None
    window, echo = window_param(request, request.app[RUNNER].clock.now_ms())
    page = await request.app[STORE].runs_page(
        env, status=status, function_id=function, q=q, window=window,
        limit=limit_param(request), cursor=cursor_param(request))
    return {"env": env,
            "filters": {"status": status, "function": function, "q": q, **echo},
            "functions": [fn.id for fn in request.app[RUNNER].functions],
            "runs": [run_row_doc(run) for run in page.rows],
            "next_cursor": page.next_cursor}


async def events_doc(request: web.Request) -> dict[str, Any]:
    """`/events`: every event of the environment, newest first, filtered."""
    env = env_of(request)
    q = (request.query.get("q") or "").strip() or None
    window, echo = window_param(request, request.app[RUNNER].clock.now_ms())
    page, runs = await request.app[STORE].events_page(
        env, q=q, window=window, limit=limit_param(request), cursor=cursor_param(request))
    return {"env": env, "filters": {"q": q, **echo},
            "events": [{
                "internal_id": ev.internal_id, "id": ev.event_id, "name": ev.name,
                "received_at": iso(ev.received_at), "sessions": ev.sessions,
                "source": ev.source, "duplicate": ev.duplicate,
                "runs": [{"run_id": r.run_id, "function_id": r.function_id,
                          "status": r.status} for r in runs[ev.internal_id]],
            } for ev in page.rows],
            "next_cursor": page.next_cursor}


def resend_body(ev: dict[str, Any]) -> dict[str, Any]:
    """What "edit and resend" starts from: the event as `POST /e/` takes it."""
    body: dict[str, Any] = {"name": ev["name"], "data": ev["data"]}
    if ev["sessions"]:
        body["sessions"] = ev["sessions"]
    if ev["user"] is not None:
        body["user"] = ev["user"]
    return body


async def event_page_doc(request: web.Request) -> dict[str, Any]:
    """`/events/{event_id}`: an event's payload, sessions, the runs it started, the run that
    sent it and what flow control did with it."""
    event_id = request.match_info["event_id"]
    store = request.app[STORE]
    ev = await store.event(event_id)
    if ev is None:
        raise NotFound(f"no event with id {event_id!r}")
    runs = await store.event_runs(event_id)
    sender = None
    if ev.source is not None and ev.source != "cron" and await store.run(ev.source):
        sender = ev.source
    doc = event_doc(ev)
    return {"env": ev.env, "event": doc, "sent_by_run": sender,
            "runs": [run_row_doc(run) for run in runs], "resend": resend_body(doc),
            # What each function's flow control did with it: function_id, action, run_id,
            # detail (debounced, batched, rate-limited, skipped, dropped as a duplicate...).
            "flow": await store.flow_outcomes(event_id)}


async def functions_doc(request: web.Request) -> dict[str, Any]:
    """`/functions`: the registered functions with their triggers, options, recent runs and
    failure rate."""
    env = env_of(request)
    functions = request.app[RUNNER].functions
    figures = await request.app[STORE].function_figures(
        env, [fn.id for fn in functions], recent=RECENT_RUNS, window=FAILURE_WINDOW)
    docs = []
    for fn in functions:
        fig = figures[fn.id]
        docs.append({
            "id": fn.id, "name": fn.name, "app_id": fn.app_id, "retries": fn.retries,
            "triggers": [t.doc() for t in fn.triggers], "sdk_url": fn.remote,
            "cron": bool(fn.crons), "endpoint": fn.endpoint,
            "options": {"retries": fn.retries, "timeout": fn.timeout,
                        "cancel_on": [c.event.doc() for c in fn.cancel_on]},
            "flow": None if fn.flow is None else fn.flow.doc(),
            "recent_runs": [run_row_doc(run) for run in fig.recent],
            "finished_runs": fig.finished, "failed_runs": fig.failed,
            "failure_rate": fig.failed / fig.finished if fig.finished else 0.0,
        })
    return {"env": env, "failure_window": FAILURE_WINDOW, "functions": docs}


def apps_page_doc(request: web.Request) -> dict[str, Any]:
    """`/apps`: the SDK apps, the URLs synced and how their last sync went."""
    return request.app[SDK_APPS].apps_doc()


# ---------------------------------------------------------------------------------------------
# JSON twins


@routes.get("/api/runs")
async def api_runs(request: web.Request) -> web.Response:
    """JSON twin of `/runs` (`function_id=` is accepted for `function=`)."""
    return json_ok(await runs_doc(request))


@routes.get("/api/events")
async def api_events(request: web.Request) -> web.Response:
    """JSON twin of `/events`."""
    return json_ok(await events_doc(request))


@routes.get("/api/events/{event_id}")
async def api_event(request: web.Request) -> web.Response:
    """JSON twin of `/events/{event_id}`."""
    return json_ok(await event_page_doc(request))


@routes.get("/api/functions")
async def api_functions(request: web.Request) -> web.Response:
    """JSON twin of `/functions`."""
    return json_ok(await functions_doc(request))

