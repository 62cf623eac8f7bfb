"""What every dashboard page has besides its document: links that keep the environment, the
top navigation, the banners (a failed hot reload, a failed app sync, a database problem) and,
on list pages, the filter form with its pager and "clear" links. Plain functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from devserver.web import api
from devserver.web.filters import LAST_CHOICES, STATUSES
from devserver.web.params import DEFAULT_ENV, env_of
from devserver.web.sdk_routes import SDK_APPS


def make_link(env: str) -> Callable[..., str]:
    """`link(path, **params)`: a URL with a properly encoded query that keeps `env`."""
    def link(path: str, /, **params: object) -> str:
        query = [(k, str(v)) for k, v in params.items() if v is not None and v != ""]
        if env != DEFAULT_ENV:
            query.append(("env", env))
        return path + ("?" + urlencode(query, quote_via=quote) if query else "")
    return link


NAV = (("sessions", "Sessions", "/sessions"), ("runs", "Runs", "/runs"),
       ("events", "Events", "/events"), ("functions", "Functions", "/functions"),
       ("apps", "Apps", "/apps"))
"""The top navigation: (section, label, path)."""


def nav_section(path: str) -> str:
    """The navigation section a page belongs to (a session page is under Sessions)."""
    first = path.strip("/").partition("/")[0]
    return {"session": "sessions", "": "sessions"}.get(first, first)


def banners(request: web.Request) -> list[dict[str, str]]:
    """What every page warns about: a hot reload that failed (the last good code still
    runs), SDK apps whose last sync failed, and a database that refuses writes."""
    found = []
    reloader = request.app.get(api.RELOADER)
    if reloader is not None and not reloader.status.ok:
        found.append({"kind": "reload", "title": "Hot reload failed",
                      "message": (reloader.status.error or "the app could not be imported")
                      + " (the last good code is still running; save a fix to reload)"})
    apps = request.app.get(SDK_APPS)
    for result in apps.sync_results if apps is not None else []:
        if not result.ok:
            found.append({"kind": "sync", "title": f"Sync of {result.url} failed",
                          "message": result.error or "no answer"})
    fault = request.app[api.STORE].fault
    if fault is not None:
        found.append({"kind": "database", "title": "Database problem", "message": fault})
    return found



def list_filters(request: web.Request, path: str, doc: dict[str, Any], *,
                 keys: tuple[str, ...], **fixed: str) -> dict[str, Any]:
    """The filter form, pager and "clear" links of a list page."""
    link = make_link(env_of(request))
    limit = request.query.get("limit") or None
    filters = doc["filters"]
    kept = {k: filters.get(k) for k in keys}
    if kept.get("last"):
        kept.pop("start", None)
        kept.pop("end", None)
    here = functools.partial(link, path, **fixed, limit=limit, **kept)
    filtered = any(filters.get(k) for k in keys)
    return {
        "filter_action": path, "filters": filters,
        "hidden": [*fixed.items(), *([("limit", limit)] if limit else [])],
        "statuses": STATUSES, "last_choices": LAST_CHOICES, "filtered": filtered,
        "clear_url": link(path, **fixed, limit=limit) if filtered else None,
        "first_url": here() if request.query.get("cursor") else None,
        "next_url": here(cursor=doc["next_cursor"]) if doc["next_cursor"] else None,
    }
