"""The dashboard's pages beyond sessions (SPEC 5): `/runs`, `/events`, `/events/{id}`,
`/functions` and `/apps`. Each renders the dict its `/api` twin returns (`web.lists`) with the
presentation-only context of `web.dashboard` (links, banners, the clock).
"""

from __future__ import annotations

from aiohttp import web

from devserver.errors import NotFound
from devserver.model.records import UNFINISHED
from devserver.web import lists, params
from devserver.web.dashboard import (
    LIVE_FAST_MS,
    LIVE_SLOW_MS,
    _busy,
    _context,
    error_page,
    page,
    render,
)
from devserver.web.page_parts import list_filters

EXAMPLE_SEND = {"name": "app/message.created", "data": {"text": "hello"},
                "sessions": {"conversation_id": "conv_1234"}}


def setup(app: web.Application) -> None:
    """Add the pages' routes."""
    app.router.add_get("/runs", runs_page)
    app.router.add_get("/events", events_page)
    app.router.add_get("/events/{event_id}", event_page)
    app.router.add_get("/functions", functions_page)
    app.router.add_get("/apps", apps_page)


@page
async def runs_page(request: web.Request) -> web.StreamResponse:
    """Every run, with or without sessions, newest first."""
    doc = await lists.runs_doc(request)
    live = _busy(request) or any(r["status"] in UNFINISHED for r in doc["runs"])
    ctx = await _context(request, doc["env"], live_ms=LIVE_FAST_MS if live else LIVE_SLOW_MS)
    return render(request, "runs.html", {
        **ctx, "doc": doc, "offer_q": True, "offer_status": True,
        "functions": doc["functions"], "q_placeholder": "run id, event id or event name",
        **list_filters(request, "/runs", doc,
                          keys=("status", "function", "q", "last", "start", "end"))})


@page
async def events_page(request: web.Request) -> web.StreamResponse:
    """Every event, newest first, and the Send form."""
    doc = await lists.events_doc(request)
    ctx = await _context(request, doc["env"],
                         live_ms=LIVE_FAST_MS if _busy(request) else LIVE_SLOW_MS)
    return render(request, "events.html", {
        **ctx, "doc": doc, "offer_q": True, "offer_status": False, "functions": [],
        "q_placeholder": "event id, idempotency id or name",
        "send_body": EXAMPLE_SEND, "send_open": False, "send_label": "Send an event",
        **list_filters(request, "/events", doc, keys=("q", "last", "start", "end"))})


@page
async def event_page(request: web.Request) -> web.StreamResponse:
    """One event: payload, sessions, the runs it started, who sent it; edit and resend."""
    try:
        doc = await lists.event_page_doc(request)
    except NotFound as exc:
        return await error_page(request, 404, "Unknown event", exc.message)
    live = _busy(request) or any(r["status"] in UNFINISHED for r in doc["runs"])
    ctx = await _context(request, doc["env"], live_ms=LIVE_FAST_MS if live else 0)
    return render(request, "event.html", {
        **ctx, "doc": doc, "send_body": doc["resend"], "send_open": False,
        "send_label": "Edit and resend"})


@page
async def functions_page(request: web.Request) -> web.StreamResponse:
    """The registered functions, with Invoke and Trigger."""
    doc = await lists.functions_doc(request)
    ctx = await _context(request, doc["env"],
                         live_ms=LIVE_FAST_MS if _busy(request) else LIVE_SLOW_MS)
    return render(request, "functions.html", {**ctx, "doc": doc})


@page
async def apps_page(request: web.Request) -> web.StreamResponse:
    """The SDK apps and their sync state, with Sync."""
    doc = lists.apps_page_doc(request)
    ctx = await _context(request, params.env_of(request), live_ms=LIVE_SLOW_MS)
    return render(request, "apps.html", {**ctx, "doc": doc})
