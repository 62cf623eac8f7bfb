"""The Sessions dashboard: server-rendered HTML pages, their static files and fixture downloads.

Owns the browser-facing routes (`/`, `/sessions`, `/session`, `/session/fixture`,
`/runs/{run_id}`, `/static/{name}`) and what every page shares: the rendering with its headers,
the context, the HTML error page (the Jinja2 environment and its filters are `web.templating`;
the other pages `web.pages`). A page is rendered from the very dict its `/api` twin returns
(`api.sessions_doc`, `api.session_doc`, `api.run_doc`) plus presentation-only context (links,
the environment list, the clock), so a page and its JSON twin cannot disagree; each page names
its twin in a `Link` header.

Pages carry a strict Content-Security-Policy: no inline script or style anywhere. Live refresh is
`static/live.js`, which re-fetches the page it is on and swaps the regions marked `data-live`, so
the HTML is written once, in the templates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from devserver.errors import DevserverError, NotFound, UserError
from devserver.model.fixtures import export_events, to_jsonl
from devserver.model.records import UNFINISHED
from devserver.model.triggers import EventTrigger
from devserver.web import api, params, responses
from devserver.web.filters import LAST_CHOICES
from devserver.web.page_parts import NAV, banners, list_filters, nav_section
from devserver.web.page_parts import make_link as make_link
from devserver.web.templating import STRICT_ENV_VAR, make_environment, templates_dir

# The formatters, re-exported where the tests have always found them:
from devserver.web.templating import format_absolute as format_absolute
from devserver.web.templating import format_ago as format_ago
from devserver.web.templating import format_clock as format_clock
from devserver.web.templating import format_duration as format_duration
from devserver.web.templating import format_percent as format_percent

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = ("default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
LIVE_FAST_MS, LIVE_SLOW_MS = 1000, 2000
"""Page refresh intervals: while runs are in flight or the page waits for a first event (empty
state, unknown session), and otherwise (new events may still arrive)."""
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".svg": "image/svg+xml"}
STATIC_MAX_AGE = 365 * 24 * 3600
EXAMPLE_EVENT = "app/message.created"
SORTS = (("value", "Value"), ("runs", "Runs"), ("failed_runs", "Failed"),
         ("failure_rate", "Failure rate"), ("last_active", "Last active"))
DEFAULT_SORT = "last_active"
API_PREFIXES = ("/api/", "/e/", "/v1/", "/static/")
MAX_SUGGESTIONS = 20
MAX_ENVIRONMENTS = 100
"""Environments the selector lists (the most recently active; the current one always)."""


# ---------------------------------------------------------------------------------------------
# Links, fixtures, the curl example


def run_path(run_id: str) -> str:
    """The path of a run's page."""
    return "/runs/" + quote(run_id, safe="")


def fixture_filename(identifier: str, value: str) -> str:
    """A safe ASCII download name such as `session-conversation_id-conv_1.jsonl`."""
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "x"
    return f"session-{slug(identifier)}-{slug(value)}.jsonl"


def curl_command(base_url: str, env: str, identifier: str, value: str, event: str) -> str:
    """The shell command that sends one event carrying the session `identifier=value`."""
    body = {"name": event, "data": {"text": "hello"}, "sessions": {identifier: value}}
    parts = [f"curl -X POST {shlex.quote(base_url + '/e/dev-key')}",
             "-H 'Content-Type: application/json'"]
    if env != params.DEFAULT_ENV:
        parts.append(f"-H {shlex.quote(f'{params.ENV_HEADER}: {env}')}")
    parts.append(f"-d {shlex.quote(json.dumps(body, ensure_ascii=False))}")
    return " \\\n  ".join(parts)


def _example_event(request: web.Request) -> str:
    """An event name that starts a registered function, so the curl example shows a run."""
    for fn in request.app[api.RUNNER].functions:
        for trigger in fn.triggers:
            if isinstance(trigger, EventTrigger) and trigger.prefix is None:
                return trigger.event
    return EXAMPLE_EVENT


# ---------------------------------------------------------------------------------------------
# Static files


@dataclass(frozen=True, slots=True)
class Asset:
    """A static file held in memory; `version` (a content hash) busts caches in its URL."""

    body: bytes
    content_type: str
    version: str


def load_assets(directory: Path) -> dict[str, Asset]:
    """The files of `templates/static` that have a known content type."""
    return {
        path.name: Asset(path.read_bytes(), STATIC_TYPES[path.suffix],
                         hashlib.sha256(path.read_bytes()).hexdigest()[:16])
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix in STATIC_TYPES
    }


@dataclass(frozen=True, slots=True)
class Dashboard:
    """What the dashboard's handlers share: the template environment and the static files."""

    templates: jinja2.Environment
    assets: dict[str, Asset]
    version: str


DASHBOARD = web.AppKey("dashboard", Dashboard)


def setup(app: web.Application, *, strict: bool | None = None) -> None:
    """Add the dashboard's routes, templates and static files to `app`.

    `strict` renders with `StrictUndefined`; None reads the `DEVSERVER_STRICT_TEMPLATES` variable.
    """
    from devserver import (
        __version__,  # here, not at import time: the package may still be importing
    )

    if strict is None:
        strict = os.environ.get(STRICT_ENV_VAR, "") not in ("", "0")
    directory = templates_dir()
    app[DASHBOARD] = Dashboard(make_environment(directory, strict=strict),
                               load_assets(directory / "static"), __version__)
    app[responses.NOT_FOUND_PAGE] = html_not_found
    app.router.add_get("/", index)
    app.router.add_get("/sessions", sessions_page)
    app.router.add_get("/session", session_page)
    app.router.add_get("/session/fixture", session_fixture)
    app.router.add_get("/runs/{run_id}", run_page)
    app.router.add_get("/static/{name}", static_file)


# ---------------------------------------------------------------------------------------------
# Rendering


def _twin_url(request: web.Request) -> str:
    query = urlencode(list(request.query.items()), quote_via=quote)
    return quote("/api" + request.path, safe="/") + (f"?{query}" if query else "")


async def _context(request: web.Request, env: str, *, live_ms: int) -> dict[str, Any]:
    """What every page's template needs besides its document."""
    dash = request.app[DASHBOARD]
    # The selector lists the most recently active environments (one bounded page).
    listed = await request.app[api.STORE].environments_page(limit=MAX_ENVIRONMENTS)
    known = [e.env for e in listed.rows]
    environments = known if env in known else [*known, env]

    def static_url(name: str) -> str:
        return f"/static/{quote(name)}?v={dash.assets[name].version}"

    return {
        "banners": banners(request), "nav": nav_section(request.path), "nav_items": NAV,
        "env": env, "default_env": params.DEFAULT_ENV,
        "environments": environments if len(environments) > 1 else [],  # the selector
        "env_link": lambda name: make_link(name)("/sessions"),
        "link": make_link(env), "run_link": lambda run_id: make_link(env)(run_path(run_id)),
        "static_url": static_url, "json_url": _twin_url(request),
        "now_ms": request.app[api.RUNNER].clock.now_ms(), "live_ms": live_ms, "status": 200,
        "version": dash.version, "base_url": f"{request.scheme}://{_host(request)}",
    }


def _host(request: web.Request) -> str:
    """The Host the browser used (for the curl examples); bytes that are not UTF-8 shown
    escaped, so the page can still be encoded."""
    host = request.host
    return host if responses.encodes(host) else host.encode("utf-8", "backslashreplace").decode()


def _busy(request: web.Request) -> bool:
    return request.app[api.RUNNER].busy > 0


def render(request: web.Request, template: str, context: dict[str, Any]) -> web.Response:
    """Render a page with the dashboard's headers (CSP, the JSON twin's `Link`)."""
    html = request.app[DASHBOARD].templates.get_template(template).render(context)
    # backslashreplace: a lone surrogate in stored data shows as `\\ud800` instead of
    # failing the whole page.
    response = web.Response(body=html.encode("utf-8", "backslashreplace"),
                            status=context["status"], content_type="text/html",
                            charset="utf-8")
    response.headers.update({
        "Content-Security-Policy": CSP, "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"})
    if context.get("json_url"):  # None on a page that has no JSON twin
        response.headers["Link"] = (f'<{context["json_url"]}>; rel="alternate"; '
                                    'type="application/json"')
    return response


async def error_page(
    request: web.Request, status: int, title: str, message: str, *, env: str | None = None,
    identifier: str | None = None, value: str | None = None, twin: bool = True,
) -> web.Response:
    """The friendly HTML error page (`twin=False`: no "This page as JSON" link, for a path
    that has no JSON twin).

    Given the `identifier` (and `value`) that was not found, it says so plainly, lists the
    identifiers that do exist and shows the curl command that would create the session.
    """
    if env is None:
        try:
            env = params.env_of(request)
        except UserError:
            env = params.DEFAULT_ENV
    ctx = await _context(request, env, live_ms=LIVE_FAST_MS if identifier is not None else 0)
    if not twin:
        ctx["json_url"] = None
    curl, known, more = None, [], False
    if identifier is not None:
        curl = curl_command(ctx["base_url"], env, identifier, value or "example-1",
                            _example_event(request))
        listed = await request.app[api.STORE].identifiers_page(env, limit=MAX_SUGGESTIONS)
        known = [i.identifier for i in listed.rows]
        more = listed.next_cursor is not None
    return render(request, "error.html", {
        **ctx, "status": status, "title": title, "message": message, "curl": curl,
        "identifier": identifier, "value": value, "known": known,
        "more_known": more, "more_url": ctx["link"]("/sessions") if more else None,
    })


def page(handler: Handler) -> Handler:
    """Show a handler's `DevserverError` (bad parameter, unknown id) as the HTML error page."""
    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except DevserverError as exc:
            title = "Not found" if exc.status == 404 else f"Error {exc.status}"
            return await error_page(request, exc.status, title, exc.message)
    return wrapper


async def html_not_found(request: web.Request) -> web.StreamResponse | None:
    """A browser asking for a page that doesn't exist gets HTML; API clients keep JSON (None).

    Called by `responses.error_middleware` (one middleware on every request instead of two)."""
    if (request.method not in ("GET", "HEAD") or request.path.startswith(API_PREFIXES)
            or "text/html" not in request.headers.get("Accept", "")):
        return None
    # No "This page as JSON" link: /api + an unknown path is no endpoint either.
    return await error_page(request, 404, "Page not found",
                            f"There is no dashboard page at {request.path}.", twin=False)


# ---------------------------------------------------------------------------------------------
# Pages


async def index(request: web.Request) -> web.StreamResponse:
    """`/` → `/sessions` (keeping `?env=`)."""
    raise web.HTTPFound(make_link(request.query.get("env") or params.DEFAULT_ENV)("/sessions"))


@page
async def sessions_page(request: web.Request) -> web.StreamResponse:
    """The identifiers seen; with `?identifier=`, that identifier's sessions."""
    env = params.env_of(request)
    link = make_link(env)
    identifier = request.query.get("identifier")
    if identifier == "":  # the search box submitted empty
        raise web.HTTPFound(link("/sessions"))
    try:
        doc = await api.sessions_doc(request)
    except NotFound as exc:
        return await error_page(request, 404, "Unknown identifier", exc.message, env=env,
                                identifier=identifier)
    waiting = _busy(request) or (identifier is None and not doc["identifiers"])
    ctx = await _context(request, env, live_ms=LIVE_FAST_MS if waiting else LIVE_SLOW_MS)
    if identifier is None:
        curl = curl_command(ctx["base_url"], env, "conversation_id", "conv_1234",
                            _example_event(request))
        limit = request.query.get("limit") or None
        here = functools.partial(link, "/sessions", limit=limit)
        return render(request, "identifiers.html", {
            **ctx, "doc": doc, "curl": curl,
            "first_url": here() if request.query.get("cursor") else None,
            "next_url": here(cursor=doc["next_cursor"]) if doc["next_cursor"] else None,
        })
    q, limit = request.query.get("q") or "", request.query.get("limit") or None
    filters = doc["filters"]
    kept = {"status": filters["status"], "last": filters["last"],
            "start": None if filters["last"] else filters["start"],
            "end": None if filters["last"] else filters["end"]}
    filtered = any(kept.values())
    here = functools.partial(link, "/sessions", identifier=identifier, limit=limit)
    sort, next_cursor = doc["sort"], doc["next_cursor"]
    sort_param = None if sort == DEFAULT_SORT else sort
    return render(request, "sessions.html", {
        **ctx, "doc": doc, "q": q, "limit": limit, "sort_param": sort_param,
        "filters": filters, "filtered": filtered, "last_choices": LAST_CHOICES,
        "sorts": [(key, label, key == sort,
                   here(q=q, sort=None if key == DEFAULT_SORT else key, **kept))
                  for key, label in SORTS],
        "clear_url": here(sort=sort_param),
        "first_url": here(q=q, sort=sort_param, **kept) if request.query.get("cursor") else None,
        "next_url": here(q=q, sort=sort_param, cursor=next_cursor, **kept)
        if next_cursor else None,
    })


@page
async def session_page(request: web.Request) -> web.StreamResponse:
    """One session: its figures and its runs, newest first."""
    env = params.env_of(request)
    link = make_link(env)
    identifier = params.required_param(request, "identifier")
    value = params.required_param(request, "value")
    try:
        doc = await api.session_doc(request)
    except NotFound as exc:
        return await error_page(request, 404, "Unknown session", exc.message, env=env,
                                identifier=identifier, value=value)
    in_flight = (_busy(request) or doc["timeline"]["live"]
                 or any(r["status"] in UNFINISHED for r in doc["runs"]))
    ctx = await _context(request, env, live_ms=LIVE_FAST_MS if in_flight else LIVE_SLOW_MS)
    return render(request, "session.html", {
        **ctx, "doc": doc,
        "fixture_url": link("/session/fixture", identifier=identifier, value=value),
        "rerun_failed_url": link("/api/session/rerun-failed", identifier=identifier,
                                 value=value),
        "offer_q": False, "offer_status": True, "functions": [],
        **list_filters(request, "/session", doc, keys=("status", "last", "start", "end"),
                       identifier=identifier, value=value),
    })


@page
async def session_fixture(request: web.Request) -> web.StreamResponse:
    """A session's events as a JSONL fixture that `POST /e/{key}` and `replay` accept."""
    env = params.env_of(request)
    identifier = params.required_param(request, "identifier")
    value = params.required_param(request, "value")
    store = request.app[api.STORE]
    if await store.session(env, identifier, value, limit=1) is None:
        return await error_page(
            request, 404, "Unknown session",
            f"no session {identifier}={value!r} in environment {env!r}",
            env=env, identifier=identifier, value=value)
    events = await store.session_events(env, identifier, value)
    return web.Response(body=to_jsonl(export_events(events)).encode(), headers={
        "Content-Type": "application/x-ndjson; charset=utf-8", "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="{fixture_filename(identifier, value)}"',
        "X-Content-Type-Options": "nosniff"})


@page
async def run_page(request: web.Request) -> web.StreamResponse:
    """A run: its trigger events, sessions, every step attempt, its output or error."""
    try:
        doc = await api.run_doc(request)
    except NotFound as exc:
        return await error_page(request, 404, "Unknown run", exc.message)
    live_ms = LIVE_FAST_MS if doc["status"] in UNFINISHED else 0
    ctx = await _context(request, doc["env"], live_ms=live_ms)
    return render(request, "run.html", {**ctx, "doc": doc})


async def static_file(request: web.Request) -> web.StreamResponse:
    """A file of `templates/static`: immutable when asked for by its current version."""
    asset = request.app[DASHBOARD].assets.get(request.match_info["name"])
    if asset is None:
        raise NotFound(f"no static file {request.match_info['name']!r}")
    etag = f'"{asset.version}"'
    fresh = request.query.get("v") == asset.version  # a versioned URL never changes
    headers = {"Content-Type": asset.content_type, "ETag": etag, "X-Content-Type-Options":
               "nosniff", "Cache-Control": f"public, max-age={STATIC_MAX_AGE}, immutable"
               if fresh else "no-cache"}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers=headers)
