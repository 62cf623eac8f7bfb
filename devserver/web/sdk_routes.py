"""The routes the Inngest SDKs and the dashboard use to manage SDK apps.

`POST /fn/register` (an SDK registering its functions), `DELETE /fn/remove?url=`, `GET /dev`
(the dev server info that Inngest tooling reads), `GET /api/apps`, `POST /api/apps/sync`,
`POST /v1/runs/{id}/metadata` (metadata an SDK attaches to a run). Each
translates a request into a call on `devserver.sdk.apps.SdkApps` and its answer into JSON.
"""

from __future__ import annotations

from aiohttp import web

from devserver.errors import NotFound, UserError
from devserver.model.events import loads
from devserver.model.metadata import parse_metadata_request
from devserver.sdk.apps import SdkApps
from devserver.sdk.protocol import EXPECTED_SERVER_KIND_HEADER, SERVER_KIND, SERVER_KIND_HEADER
from devserver.web.api import RUNNER, STORE
from devserver.web.responses import json_ok

SDK_APPS = web.AppKey("sdk_apps", SdkApps)
routes = web.RouteTableDef()


def _dev_headers(response: web.Response) -> web.Response:
    response.headers[SERVER_KIND_HEADER] = SERVER_KIND
    return response


@routes.post("/fn/register")
async def fn_register(request: web.Request) -> web.Response:
    """An SDK app registers its functions (after our PUT, or on its own)."""
    expected = request.headers.get(EXPECTED_SERVER_KIND_HEADER)
    if expected and expected != SERVER_KIND:
        raise UserError(f"this is a dev server ({SERVER_KIND}), but the SDK expected a "
                        f"{expected!r} server")
    body = loads(await request.read())
    modified, app_id = await request.app[SDK_APPS].register(body)
    return _dev_headers(json_ok({"ok": True, "modified": modified, "app_id": app_id}))


@routes.delete("/fn/remove")
async def fn_remove(request: web.Request) -> web.Response:
    """Forget the app registered from `?url=` (as Inngest's dev server allows tests to)."""
    url = request.query.get("url")
    if not url:
        raise UserError("query parameter 'url' is required")
    removed = await request.app[SDK_APPS].remove(url)
    return _dev_headers(json_ok({"ok": True, "removed": removed}))


@routes.get("/dev")
async def dev_info(request: web.Request) -> web.Response:
    """The dev server's info: version, start options, registered functions and apps."""
    return _dev_headers(json_ok(request.app[SDK_APPS].dev_doc()))


@routes.get("/api/apps")
async def api_apps(request: web.Request) -> web.Response:
    """The SDK apps, their functions, and how their last sync went."""
    return json_ok(request.app[SDK_APPS].apps_doc())


@routes.post("/api/apps/sync")
async def api_apps_sync(request: web.Request) -> web.Response:
    """Sync now: the app at `{"url": ...}` (remembered from then on), else every known app."""
    apps = request.app[SDK_APPS]
    raw = await request.read()
    body = loads(raw) if raw.strip() else {}
    url = body.get("url") if isinstance(body, dict) else None
    if url is not None and not isinstance(url, str):
        raise UserError("'url' must be a string")
    results = [await apps.sync(url)] if url else await apps.sync_all()
    return json_ok({"results": [result.doc() for result in results]})


@routes.post("/v1/runs/{run_id}/metadata")
async def v1_run_metadata(request: web.Request) -> web.Response:
    """Metadata an SDK attaches to a run or one of its steps (see `model.metadata`); shown in
    the run's document (`/api/runs/{id}`, `metadata`)."""
    run_id = request.match_info["run_id"]
    updates = parse_metadata_request(loads(await request.read()))
    store = request.app[STORE]
    if not await store.add_metadata(run_id, updates, request.app[RUNNER].clock.now_ms()):
        raise NotFound(f"no run with id {run_id!r}")
    return json_ok({})
