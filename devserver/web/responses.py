"""How every answer leaves: JSON bodies (non-ASCII kept as is), the one error shape, and the
middleware that turns every error into it.

Every error leaves as `{"status": N, "error": "..."}` (the event API adds `"ids": []`); a bug
becomes a logged 500, never a traceback, and a request body that trickles in too slowly is
answered 408 before any handler sees it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from devserver.errors import DevserverError
from devserver.model.events import MAX_BODY_BYTES

log = logging.getLogger("devserver.web.api")  # the name operators' filters know

NOT_FOUND_PAGE = web.AppKey[
    Callable[[web.Request], Awaitable[web.StreamResponse | None]]]("not_found_page")
"""Set by the dashboard: the HTML page a browser gets for an unknown path (None: JSON)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---------------------------------------------------------------------------------------------
# JSON bodies


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
