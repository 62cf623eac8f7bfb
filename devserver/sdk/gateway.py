"""The `AIGateway` opcode (`step.ai.infer`): the server, not the app, makes the model request
the opcode describes, and the answer becomes the step's result, as Inngest does.

`opts` carries `url`, `body` (sent as JSON with a POST), `headers`, `auth_key` and `format`:
the key goes where the provider expects it (`gemini`: the `key` query parameter; `bedrock`:
`Authorization` as given; `anthropic`: `x-api-key`; anything else: `Authorization: Bearer`),
then the opcode's own headers are added. Header names go out in the canonical form Inngest's
Go HTTP client gives them (`X-Api-Key`, `Anthropic-Version`): header names are
case-insensitive, but a mock of the model's API (the Python SDK's suite has one) may compare
them as it receives them. A 2xx answer is the step's data (its JSON, or its
text when it is not JSON); any other answer, or no answer, is a step error named as Inngest
names it (`Error making AI request: ...`, the body as the message), retried with the step's
attempts like any step error.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

from devserver.model.failures import stored_error
from devserver.sdk.protocol import ProtocolError

FORMAT_GEMINI = "gemini"
FORMAT_BEDROCK = "bedrock"
FORMAT_ANTHROPIC = "anthropic"
NO_ANSWER = '{"error":"Error making AI request"}'
"""The message of a failed request that answered nothing (Inngest's words)."""


@dataclass(frozen=True, slots=True)
class GatewayRequest:
    """The HTTP request an `AIGateway` opcode describes."""

    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class GatewayAnswer:
    """What the model answered: the step's data, or the step's error."""

    data: Any = None
    error: dict[str, Any] | None = None


def gateway_request(opts: dict[str, Any]) -> GatewayRequest:
    """The request `opts` describe; `ProtocolError` saying what is missing or malformed."""
    url = opts.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ProtocolError(f"AIGateway needs opts.url, an http(s) URL; got {url!r}")
    headers = {"Content-Type": "application/json"}
    key = opts.get("auth_key")
    key = key if isinstance(key, str) else ""
    fmt = opts.get("format")
    if fmt == FORMAT_GEMINI:
        parts = urllib.parse.urlsplit(url)
        query = [*urllib.parse.parse_qsl(parts.query, keep_blank_values=True), ("key", key)]
        url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    elif fmt == FORMAT_BEDROCK:
        headers["Authorization"] = key
    elif fmt == FORMAT_ANTHROPIC:
        headers["X-Api-Key"] = key
    else:
        headers["Authorization"] = f"Bearer {key}"
    extra = opts.get("headers")
    if extra is not None and not isinstance(extra, dict):
        raise ProtocolError("AIGateway opts.headers must be an object of strings")
    for name, value in (extra or {}).items():
        headers[canonical_header(str(name))] = str(value)
    try:
        body = json.dumps(opts.get("body"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"AIGateway opts.body is not JSON: {exc}") from None
    return GatewayRequest(url, headers, body)


def canonical_header(name: str) -> str:
    """A header name as Go's net/http writes it: each hyphen-separated word capitalised
    (`x-my-header` -> `X-My-Header`); a name with a character outside a token is left as is."""
    if not name or any(not (ch.isascii() and (ch.isalnum() or ch in _TOKEN_PUNCTUATION))
                       for ch in name):
        return name
    return "-".join(word[:1].upper() + word[1:].lower() for word in name.split("-"))


_TOKEN_PUNCTUATION = frozenset("!#$%&'*+-.^_`|~")


def gateway_answer(status: int | None, text: str, reason: str | None = None) -> GatewayAnswer:
    """The step's outcome from the model's answer (`status` None: no answer, `reason` why)."""
    if status is not None and 200 <= status < 300:
        try:
            return GatewayAnswer(data=json.loads(text))
        except ValueError:
            return GatewayAnswer(data=text)
    why = reason if status is None else f"unsuccessful status code: {status}"
    return GatewayAnswer(error=stored_error(f"Error making AI request: {why}",
                                            text or NO_ANSWER))


async def perform(session: aiohttp.ClientSession, request: GatewayRequest,
                  max_bytes: int) -> GatewayAnswer:
    """Make the request and read the answer (at most `max_bytes` of it)."""
    try:
        async with session.post(request.url, data=request.body,
                                headers=request.headers) as resp:
            raw = await resp.content.read(max_bytes + 1)
            if len(raw) > max_bytes:
                return gateway_answer(None, "", f"the answer passed {max_bytes:,} bytes")
            return gateway_answer(resp.status, raw.decode("utf-8", errors="replace"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return gateway_answer(None, "", str(exc) or type(exc).__name__)
