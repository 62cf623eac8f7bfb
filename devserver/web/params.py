"""What handlers read from a request besides its body: the environment (`?env=` or the
`X-Inngest-Env` header), the page size (`?limit=`), required query parameters, and header
values that must be UTF-8. A bad value is a `UserError` saying which parameter and why.

(The lists' filters, `status` and the time range, are `web.filters`.)
"""

from __future__ import annotations

from aiohttp import web

from devserver.errors import UserError
from devserver.runtime.runner import DEFAULT_ENV as DEFAULT_ENV
from devserver.web.responses import encodes

ENV_HEADER = "X-Inngest-Env"
DEFAULT_PAGE = 50
MAX_PAGE = 500
MAX_ENV_CHARS = 128


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
