"""Durable endpoints as functions the runner can execute: their `FunctionDef`, the call that
continues a run by requesting the endpoint again, and the token that reads a run's output.

A durable endpoint has no function registration: the SDK describes the request that started
a run in its trigger event (`inngest/http.request`, data `{domain, method, path,
query_params, body, content_type, fn}`). Once the run is asynchronous, the server continues
it as the TypeScript SDK expects: it requests the same URL again (same method, path, query
and body, so the handler sees the request it was written for) with the headers that make
the SDK treat the request as Inngest's (`X-Run-Id` and an `X-Inngest-Signature`, which a dev
mode SDK does not check), and the SDK reads the run's memo and events through the API
(`/v0/runs/{id}/actions` and `/batch`) and answers with opcodes like any SDK function.
`X-Inngest-Step-Id` names a planned step to run (parallel steps) and
`X-Inngest-Force-Step-Plan` is `disable_immediate_execution`.

The SDK decides how a request body is read (it parses one of a POST or PUT as JSON): an
endpoint taking a non-JSON body cannot be continued, in Inngest either.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from devserver.app import FunctionDef
from devserver.sdk.protocol import ROOT_STEP

HTTP_REQUEST_EVENT = "inngest/http.request"
SIGNATURE_HEADER = "X-Inngest-Signature"
STEP_ID_HEADER = "X-Inngest-Step-Id"
FORCE_PLAN_HEADER = "X-Inngest-Force-Step-Plan"
DEV_SIGNATURE = ""
"""The signature a continuation carries, as Inngest's dev server sends it: empty (an SDK in
dev mode checks signatures only against Inngest Cloud, but needs the header)."""
DEFAULT_ENDPOINT_RETRIES = 3
"""The TypeScript SDK's default retries, used when a new run does not say (`retries`)."""
MAX_ENDPOINT_RETRIES = 20
BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
TOKEN_KEY = b"devserver durable endpoint output"
"""Keys the output token. The token only proves the holder was told the run's id by the
endpoint (or read it on the dashboard): on a local tool that is all a reader could have."""


def endpoint_function_id(data: dict[str, Any]) -> str:
    """The function a run belongs to: the SDK's function id when it gives one (`fn`), else
    the method and path, as Inngest names them (`GET /api/demo`)."""
    fn = data.get("fn")
    if isinstance(fn, str) and fn:
        return fn
    return f"{data.get('method') or 'GET'} {data.get('path') or '/'}"


def endpoint_function(function_id: str, data: dict[str, Any], retries: Any) -> FunctionDef:
    """The function its runs execute as; `remote` is the endpoint's origin (each run is
    continued at its own request's URL, see `endpoint_request`)."""
    if type(retries) is not int or not 0 <= retries <= MAX_ENDPOINT_RETRIES:
        retries = DEFAULT_ENDPOINT_RETRIES
    domain = str(data.get("domain") or "")
    return FunctionDef(id=function_id, name=function_id, app_id=domain or "durable-endpoints",
                       triggers=(), retries=retries, handler=_runs_in_the_app(function_id),
                       remote=domain or None, endpoint=True)


def _runs_in_the_app(function_id: str) -> Any:
    async def runs_in_the_app(ctx: Any) -> Any:
        raise RuntimeError(f"{function_id} is a durable endpoint: it runs in its app")
    return runs_in_the_app


@dataclass(frozen=True, slots=True)
class EndpointRequest:
    """The request that continues a run: the one that started it, plus Inngest's headers."""

    method: str
    url: str
    body: bytes | None
    headers: dict[str, str]


def endpoint_request(data: dict[str, Any], target: str, *, force_plan: bool) -> EndpointRequest:
    """The request to the endpoint for one call of a run (`target`: `step` or a planned
    step's hash), from its trigger event's data."""
    domain = str(data.get("domain") or "").rstrip("/")
    if not domain.startswith(("http://", "https://")):
        raise ValueError(f"the run's request has no usable domain ({domain!r})")
    path = str(data.get("path") or "/")
    query = str(data.get("query_params") or "")
    method = str(data.get("method") or "GET").upper()
    headers = {SIGNATURE_HEADER: DEV_SIGNATURE,
               FORCE_PLAN_HEADER: "true" if force_plan else "false"}
    if target != ROOT_STEP:
        headers[STEP_ID_HEADER] = target
    body: bytes | None = None
    raw = data.get("body")
    if method not in BODILESS_METHODS and isinstance(raw, str) and raw:
        body = raw.encode()
        headers["Content-Type"] = str(data.get("content_type") or "application/json")
    url = domain + (path if path.startswith("/") else "/" + path) + (f"?{query}" if query
                                                                     else "")
    return EndpointRequest(method, url, body, headers)


def run_token(run_id: str) -> str:
    """The token that reads a run's output (`/v1/http/runs/{run_id}/output?token=`, where
    the SDK redirects an endpoint's caller) and its stream (`/v1/realtime/sse?token=`):
    the run id and a MAC of it."""
    mac = hmac.new(TOKEN_KEY, run_id.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{run_id}.{mac}"


def token_run(token: str) -> str | None:
    """The run a token was given for, or None when it is not one of ours."""
    run_id, _, _ = token.partition(".")
    return run_id if run_id and hmac.compare_digest(run_token(run_id), token) else None
