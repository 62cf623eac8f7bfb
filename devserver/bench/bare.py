"""The reference side of the ingest benchmark: a bare aiohttp handler that parses the same body
as `POST /e/{key}` and answers the same shape, but validates and stores nothing.

    python -m devserver.bench.bare PORT
"""

from __future__ import annotations

import json
import sys

from aiohttp import web


async def events(request: web.Request) -> web.Response:
    """Parse the body and answer like the event API, storing nothing."""
    body = json.loads(await request.read())
    count = len(body) if isinstance(body, list) else 1
    return web.json_response({"ids": ["01" + "0" * 24] * count, "status": 200})


async def health(request: web.Request) -> web.Response:
    """Liveness."""
    return web.json_response({"status": 200, "message": "OK"})


def main() -> None:
    """Serve on 127.0.0.1:PORT."""
    app = web.Application()
    app.router.add_post("/e/{key}", events)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
