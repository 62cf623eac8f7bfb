"""HTTP handlers: the event API, health, the JSON API and Inngest's REST endpoints.

Handlers only translate: read the request, call the runner or the store, shape the JSON. The
JSON documents are built by plain functions (`*_doc`) that the dashboard pages reuse, so a page
and its `/api` twin show the same data. Every error leaves as one JSON shape:
`{"status": N, "error": "..."}` (the event API adds `"ids": []`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from devserver import __version__
from devserver.clock import iso as iso
from devserver.errors import DevserverError, NotFound, PayloadTooLarge, UserError
from devserver.model.events import MAX_BODY_BYTES, parse_body
from devserver.model.records import (
    FAILED,
    UNFINISHED,
    RunDetail,
    RunRecord,
    SessionStats,
    StepAttempt,
    StoredEvent,
)
from devserver.runtime.reload import AppReloader
from devserver.runtime.runner import DEFAULT_ENV as DEFAULT_ENV
from devserver.runtime.runner import Runner
from devserver.sdk.protocol import EVENT_ID_SEED_HEADER, seeded_ids
from devserver.store.facade import Store
from devserver.web import filters, timeline

log = logging.getLogger(__name__)

RUNNER = web.AppKey("runner", Runner)
STORE = web.AppKey("store", Store)
RELOADER = web.AppKey("reloader", AppReloader)
NOT_FOUND_PAGE = web.AppKey[
    Callable[[web.Request], Awaitable[web.StreamResponse | None]]]("not_found_page")
"""Set by the dashboard: the HTML page a browser gets for an unknown path (None: JSON)."""

ENV_HEADER = "X-Inngest-Env"
DEFAULT_PAGE = 50
MAX_PAGE = 500
MAX_ENV_CHARS = 128

routes = web.RouteTableDef()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---------------------------------------------------------------------------------------------
# Errors


def error_response(status: int, message: str, *, event_api: bool = False) -> web.Response:
    """The canonical JSON error body."""
    body: dict[str, Any] = {"status": status, "error": message}
    if event_api:
        body = {"ids": [], **body}
    return web.json_response(body, status=status, dumps=_dumps)


STREAMED_BODIES = frozenset({"/v1/realtime/publish/tee"})
"""Paths whose handler reads the body as it arrives (a durable endpoint's stream, relayed
live, for as long as the endpoint runs; `devserver.web.endpoint_routes`), instead of it
being read up front within `BODY_DEADLINE`."""
BODY_DEADLINE: web.AppKey[float] = web.AppKey("body_deadline", float)
"""Seconds a request body may take to arrive (`Config.body_timeout`)."""


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn errors into the JSON error shape; a bug becomes a logged 500, never a traceback.

    A body still arriving is read here first, within `BODY_DEADLINE`: one trickling in slower
    than that is answered 408 and its connection closed, so slow clients can't hold
    connections and descriptors for ever (handlers then read it from memory)."""
    event_api = request.path.startswith("/e/") or request.path == "/e"
    try:
        if request.body_exists and not request.content.is_eof() \
                and request.path not in STREAMED_BODIES:  # else it has all arrived
            deadline = request.app[BODY_DEADLINE]
            try:
                async with asyncio.timeout(deadline):
                    await request.read()
            except TimeoutError:
                response = error_response(
                    408, f"the request body did not arrive within {deadline:g} s",
                    event_api=event_api)
                response.force_close()
                return response
        return await handler(request)
    except DevserverError as exc:
        return error_response(exc.status, exc.message, event_api=event_api)
    except ConnectionResetError:
        # The client went away mid-body (a truncated request): nothing was stored, and no
        # one is left to answer. Not a bug in devserver, so no traceback in the log.
        log.debug("client closed the connection during %s %s", request.method, request.path)
        return error_response(400, "the request body was cut off", event_api=event_api)
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            413, f"request body is larger than {MAX_BODY_BYTES} bytes", event_api=event_api)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        page = request.app.get(NOT_FOUND_PAGE) if exc.status == 404 else None
        if page is not None:
            html = await page(request)
            if html is not None:
                return html
        message = exc.text if exc.text and exc.status != 404 else exc.reason
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        return error_response(exc.status, message or exc.reason, event_api=event_api)
    except Exception:
        log.exception("internal error handling %s %s", request.method, request.path)
        return error_response(500, "internal server error (see the server log)",
                              event_api=event_api)


# ---------------------------------------------------------------------------------------------
# Shaping


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _dumps(body: Any) -> str:
    # Text that can't be UTF-8 (a lone surrogate from a stored value) would fail to encode
    # as the response body; escaped, it is still the same JSON.
    text = _ENCODER.encode(body)
    if not text.isascii() and not encodes(text):
        return _ASCII_ENCODER.encode(body)
    return text


def json_ok(body: Any, status: int = 200) -> web.Response:
    """A JSON response with non-ASCII text kept as is."""
    return web.Response(body=_dumps(body).encode(), status=status,
                        content_type="application/json", charset="utf-8")


def stats_doc(stats: SessionStats) -> dict[str, Any]:
    """The SPEC 2.3 figures of a session."""
    return {
        "runs": stats.runs,
        "failed_runs": stats.failed_runs,
        "failure_rate": stats.failure_rate,
        "last_active": iso(stats.last_active),
        "functions": stats.functions,
    }


def event_doc(ev: StoredEvent) -> dict[str, Any]:
    """An event in the JSON API."""
    return {
        "internal_id": ev.internal_id,
        "id": ev.event_id,
        "name": ev.name,
        "data": ev.data,
        "ts": ev.ts,
        "v": ev.v,
        "user": ev.user,
        "sessions": ev.sessions,
        "received_at": iso(ev.received_at),
        "duplicate": ev.duplicate,
        "source": ev.source,
    }


def _duration_ms(run: RunRecord) -> int | None:
    if run.started_at is None or run.ended_at is None:
        return None
    return run.ended_at - run.started_at


def run_summary_doc(run: RunRecord) -> dict[str, Any]:
    """A run as listed on a session's page."""
    return {
        "run_id": run.run_id,
        "function_id": run.function_id,
        "status": run.status,
        "event_id": run.event_id,
        "event_name": run.event_name,
        "queued_at": iso(run.queued_at),
        "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at),
        "duration_ms": _duration_ms(run),
    }


def step_doc(step: StepAttempt) -> dict[str, Any]:
    """One attempt of a step (or of the function, outside steps)."""
    return {
        "step_id": step.step_id,
        "kind": step.kind,
        "attempt": step.attempt + 1,  # 1-based everywhere people read it
        "status": step.status,
        "started_at": iso(step.started_at),
        "ended_at": iso(step.ended_at),
        "duration_ms": step.ended_at - step.started_at,
        "output": step.output,
        "error": step.error,
        "final": step.final,
        # A waiting step: when it wakes (None: never by itself) and what it waits for.
        "wait_until": iso(step.wait_until),
        "detail": step.detail,
    }


def run_detail_doc(detail: RunDetail) -> dict[str, Any]:
    """Everything the run page shows."""
    run = detail.run
    live = run.status in UNFINISHED
    last = detail.steps[-1] if detail.steps else None
    retrying = (live and last is not None and last.status == FAILED and not last.final)
    return {
        **run_summary_doc(run),
        "env": run.env,
        # The most attempts any step (or the function) has had, 1-based, counting the one
        # a live run is on or will retry with.
        "attempt": max([step.attempt + 1 for step in detail.steps]
                       + [run.attempt + 1 if live else 1]),
        "next_at": iso(run.next_at),
        # When a failed attempt is retried (None: no retry pending).
        "retry_at": iso(run.next_at) if retrying else None,
        "sessions": run.sessions,
        "output": run.output,
        "error": run.error,
        "events": [event_doc(ev) for ev in detail.events],
        "steps": [step_doc(step) for step in detail.steps],
        "emitted_events": detail.emitted,
        "metadata": [update.doc() for update in detail.metadata],
    }


def inngest_run_doc(run: RunRecord) -> dict[str, Any]:
    """A run in the shape of Inngest's REST API (`/v1/runs/{id}`)."""
    return {
        "run_id": run.run_id,
        "run_started_at": iso(run.started_at),
        "function_id": run.function_id,
        "function_version": 1,
        "environment_id": run.env,
        "event_id": run.event_id,
        "status": run.status,
        "ended_at": iso(run.ended_at),
        "output": run.output if run.error is None else run.error,
    }


# ---------------------------------------------------------------------------------------------
# Request parsing


def encodes(text: str) -> bool:
    """True when `text` can be stored and sent as UTF-8. Header values that were not valid
    UTF-8 on the wire arrive with surrogate escapes, which can't."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def header_text(request: web.Request, name: str) -> str | None:
    """A request header's value; `UserError` when its bytes are not UTF-8."""
    value = request.headers.get(name)
    if value is not None and not encodes(value):
        raise UserError(f"header {name} is not valid UTF-8")
    return value


def env_of(request: web.Request) -> str:
    """The environment: `?env=`, else the `X-Inngest-Env` header, else `dev`."""
    env = request.query.get("env") or header_text(request, ENV_HEADER) or DEFAULT_ENV
    env = env.strip()
    if not env or len(env) > MAX_ENV_CHARS:
        raise UserError(f"environment name must be 1 to {MAX_ENV_CHARS} characters")
    return env


def required_param(request: web.Request, name: str) -> str:
    """A query parameter that must be present and non-empty."""
    value = request.query.get(name)
    if not value:
        raise UserError(f"query parameter {name!r} is required")
    return value


def limit_param(request: web.Request) -> int:
    """`?limit=`: 1 to MAX_PAGE, default DEFAULT_PAGE."""
    raw = request.query.get("limit")
    if raw is None or raw == "":
        return DEFAULT_PAGE
    # Length first: int() of thousands of digits is slow, then refused (a 500).
    if (len(raw) > len(str(MAX_PAGE)) or not (raw.isascii() and raw.isdigit())
            or not 1 <= int(raw) <= MAX_PAGE):
        raise UserError(f"limit must be an integer from 1 to {MAX_PAGE}, got {raw[:40]!r}")
    return int(raw)


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
# JSON API


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
