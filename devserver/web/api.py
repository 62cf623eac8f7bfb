"""The JSON API the dashboard's session pages are twins of (`/api/sessions`, `/api/session`,
`/api/runs/{id}`), the environment list and the server's status; and the application state
every handler reads (`RUNNER`, `STORE`, `RELOADER`).

Each page's document is built once, here (`sessions_doc`, `session_doc`, `run_doc`), and
rendered by the dashboard or returned as JSON, so a page and its `/api` twin cannot disagree.
Inngest's own endpoints (`/e/{key}`, `/v1/...`) are `web.inngest_api`; the record shapes
`web.documents`; errors and JSON bodies `web.responses`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devserver import __version__
from devserver.clock import iso
from devserver.errors import NotFound, UserError
from devserver.model.records import RunRecord
from devserver.runtime.reload import AppReloader
from devserver.runtime.runner import Runner
from devserver.store.facade import Store
from devserver.web import filters, timeline
from devserver.web.documents import run_detail_doc, run_summary_doc, stats_doc
from devserver.web.params import env_of, limit_param, required_param
from devserver.web.responses import json_ok

RUNNER = web.AppKey("runner", Runner)
STORE = web.AppKey("store", Store)
RELOADER = web.AppKey("reloader", AppReloader)

routes = web.RouteTableDef()


async def sessions_doc(request: web.Request) -> dict[str, Any]:
    """`/sessions`: the identifiers seen (with their failure figures), or one identifier's
    sessions: searchable (`q`), sorted (`sort`), failing only (`status=failing`), in a time
    range of last activity (`last`, `start`, `end`), paged, each failing one with its latest
    error."""
    store = request.app[STORE]
    env = env_of(request)
    identifier = request.query.get("identifier")
    if identifier is None:
        listed = await store.identifiers_page(env, limit=limit_param(request),
                                              cursor=request.query.get("cursor") or None)
        figures = await store.identifier_figures(env, [i.identifier for i in listed.rows])
        return {
            "env": env,
            "identifiers": [
                {"identifier": i.identifier, "sessions": i.sessions,
                 "runs": figures[i.identifier].runs,
                 "failed_runs": figures[i.identifier].failed_runs,
                 "failing_sessions": figures[i.identifier].failing_sessions,
                 "last_active": iso(i.last_active)}
                for i in listed.rows
            ],
            "next_cursor": listed.next_cursor,
        }
    if not identifier:
        raise UserError("query parameter 'identifier' must not be empty")
    sort = request.query.get("sort") or "last_active"
    status = request.query.get("status") or None
    if status not in (None, "failing"):
        raise UserError(f"status must be 'failing' (sessions with a failed run) or absent, "
                        f"got {status[:40]!r}")
    window, echo = filters.window_param(request, request.app[RUNNER].clock.now_ms())
    page, latest = await store.sessions_page(
        env, identifier, q=request.query.get("q") or None, sort=sort,
        failing=status == "failing", window=window, limit=limit_param(request),
        cursor=request.query.get("cursor") or None)
    if not page.rows and not await store.identifier_known(env, identifier):
        raise NotFound(f"no session with identifier {identifier!r} in environment {env!r}")
    return {
        "env": env,
        "identifier": identifier,
        "sort": sort,
        "filters": {"q": request.query.get("q") or None, "status": status, **echo},
        "sessions": [{"value": s.value, **stats_doc(s),
                      "latest_error": _latest_error(latest.get(s.value))}
                     for s in page.rows],
        "next_cursor": page.next_cursor,
    }


def _latest_error(run: RunRecord | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"run_id": run.run_id, "function_id": run.function_id,
            "error": filters.error_line(run.error), "ended_at": iso(run.ended_at)}


async def session_doc(request: web.Request) -> dict[str, Any]:
    """`/session`: one session's figures and its runs, newest first, of one status and time
    range (queued), each with its error's first line."""
    env = env_of(request)
    identifier = required_param(request, "identifier")
    value = required_param(request, "value")
    status = filters.status_param(request)
    window, echo = filters.window_param(request, request.app[RUNNER].clock.now_ms())
    found = await request.app[STORE].session_runs(
        env, identifier, value, status=status, window=window, limit=limit_param(request),
        cursor=request.query.get("cursor") or None)
    if found is None:
        raise NotFound(f"no session {identifier}={value!r} in environment {env!r}")
    stats, page, drawn = found
    return {
        "env": env,
        "identifier": identifier,
        "value": value,
        "stats": stats_doc(stats),
        "timeline": timeline.timeline_doc(drawn, request.app[RUNNER].clock.now_ms()),
        "filters": {"status": status, **echo},
        "runs": [{**run_summary_doc(run), "error": filters.error_line(run.error)}
                 for run in page.rows],
        "next_cursor": page.next_cursor,
    }


async def run_doc(request: web.Request) -> dict[str, Any]:
    """`/runs/{run_id}`: a run with its events and every step attempt."""
    run_id = request.match_info["run_id"]
    store = request.app[STORE]
    detail = await store.run_detail(run_id)
    if detail is None:
        raise NotFound(f"no run with id {run_id!r}")
    links = await store.run_links(detail.run)
    logs = await store.log_lines(run_id)
    return {
        **run_detail_doc(detail),
        # Cause and effect: the run that sent (or invoked) this run's event, the run this one
        # reruns, its reruns, and the runs its events started.
        "parent_run_id": links.parent_run_id,
        "trigger_source": links.source,
        "rerun_of": links.rerun_of,
        "reruns": links.reruns,
        "child_runs": [{"run_id": r, "function_id": f, "status": s, "event_name": e}
                       for r, f, s, e in links.children],
        "logs": [{"at": iso(line.at), "level": line.level, "message": line.message}
                 for line in logs],
        # Why flow control queued the run (concurrency, throttle) or cancelled it (singleton,
        # timeouts): `{"queued": "...", "cancelled": "..."}`, empty when it did neither.
        "flow": await store.run_notes(run_id),
    }


@routes.get("/api/sessions")
async def api_sessions(request: web.Request) -> web.Response:
    """JSON twin of `/sessions`."""
    return json_ok(await sessions_doc(request))


@routes.get("/api/session")
async def api_session(request: web.Request) -> web.Response:
    """JSON twin of `/session`."""
    return json_ok(await session_doc(request))


@routes.get("/api/runs/{run_id}")
async def api_run(request: web.Request) -> web.Response:
    """JSON twin of `/runs/{run_id}`."""
    return json_ok(await run_doc(request))


@routes.get("/api/environments")
async def api_environments(request: web.Request) -> web.Response:
    """The environments that have data (for the dashboard's selector), a page at a time."""
    listed = await request.app[STORE].environments_page(
        limit=limit_param(request), cursor=request.query.get("cursor") or None)
    return json_ok({"environments": [
        {"env": e.env, "events": e.events, "last_active": iso(e.last_active)}
        for e in listed.rows
    ], "next_cursor": listed.next_cursor})


@routes.get("/api/status")
async def api_status(request: web.Request) -> web.Response:
    """The server's state: version, functions, runs in flight, hot reload."""
    reloader = request.app.get(RELOADER)
    reload_doc = None
    if reloader is not None:
        status = reloader.status
        reload_doc = {"enabled": status.enabled, "ok": status.ok, "error": status.error,
                      "reloads": status.reloads,
                      "reloaded_at": None if status.reloaded_at is None
                      else iso(int(status.reloaded_at * 1000)),
                      "watching": [str(folder) for folder in reloader.folders]}
    runner = request.app[RUNNER]
    return json_ok({"status": 200, "version": __version__, "functions": len(runner.functions),
                    "busy_runs": runner.busy, "reload": reload_doc})
