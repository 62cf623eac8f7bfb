"""The HTTP side of `/v0/gql` (`POST` with a JSON body, `GET` with `query=`), kept apart from
the GraphQL machinery in `web.gql`: graphql-core and the schema are loaded at the first query,
not at start-up (they would add a tenth to the time to a healthy server)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from devserver.jsontext import dump_json
from devserver.web.api import RUNNER, STORE

routes = web.RouteTableDef()


def request_error(message: str) -> web.Response:
    """A request that is not a GraphQL request at all: 400, in GraphQL's `errors` shape."""
    return web.Response(text=dump_json({"errors": [{"message": message}]}), status=400,
                        content_type="application/json")


async def _execute(request: web.Request, query: Any, variables: Any,
                   operation: Any) -> web.Response:
    from devserver.web import gql  # graphql-core, loaded at the first query

    return await gql.execute(request.app[STORE], request.app[RUNNER].functions, query,
                             variables, operation)


@routes.post("/v0/gql")
async def gql_post(request: web.Request) -> web.Response:
    """A GraphQL request as a JSON body."""
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return request_error(f"the body is not JSON: {exc}")
    if not isinstance(body, dict):
        return request_error("the body must be a JSON object with a \"query\"")
    return await _execute(request, body.get("query"), body.get("variables"),
                          body.get("operationName"))


@routes.get("/v0/gql")
async def gql_get(request: web.Request) -> web.Response:
    """A GraphQL request in the query string (`query`, `variables` as JSON, `operationName`)."""
    variables: Any = None
    if "variables" in request.query:
        try:
            variables = json.loads(request.query["variables"])
        except ValueError as exc:
            return request_error(f"\"variables\" is not JSON: {exc}")
    return await _execute(request, request.query.get("query"), variables,
                          request.query.get("operationName"))
