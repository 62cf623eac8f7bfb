"""The Inngest SDK HTTP protocol as plain data: what the server sends to an SDK app and how it
reads the answers.

Pure logic, no I/O and no aiohttp, so every rule is testable with dicts: the wire strings, the
call body (both SDKs validate it strictly), the memo of step outcomes keyed by hashed step ids,
the opcodes of a 206 answer, errors and `Retry-After`, event ids from an SDK's id seed (reading
a registration is `registration`'s). The facts come from the SDKs themselves (Python `inngest`
0.5.19, TypeScript `inngest` 4).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import hashlib
import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from devserver.app import NonRetriableError, RetryAfterError
from devserver.clock import parse_duration, to_ms
from devserver.model.failures import ReportedError, memo_error, reported_error
from devserver.model.lifecycle import DEFER_KIND
from devserver.model.records import StepAttempt, StoredEvent, event_dict, inngest_event

# -- wire strings -----------------------------------------------------------------------------

SDK_HEADER = "X-Inngest-SDK"
SERVER_KIND_HEADER = "X-Inngest-Server-Kind"
EXPECTED_SERVER_KIND_HEADER = "X-Inngest-Expected-Server-Kind"
NO_RETRY_HEADER = "X-Inngest-No-Retry"
RETRY_AFTER_HEADER = "Retry-After"
EVENT_ID_SEED_HEADER = "X-Inngest-Event-Id-Seed"
REQUEST_ID_HEADER = "x-request-id"
"""One id per call (the TypeScript SDK's `ctx.requestId`)."""
JOB_ID_HEADER = "x-inngest-job-id"
"""The id of the unit of work a call belongs to, the same for its retries (`ctx.jobId`)."""
RUN_ID_HEADER = "x-run-id"
SERVER_KIND = "dev"
"""What this server is, in `X-Inngest-Server-Kind`: a dev server, not Inngest Cloud."""

FN_ID_PARAM = "fnId"
STEP_ID_PARAM = "stepId"
ROOT_STEP = "step"
"""`stepId` of a call that runs the function from the top rather than one planned step."""

OP_STEP_RUN = "StepRun"
OP_STEP_PLANNED = "StepPlanned"
OP_STEP_ERROR = "StepError"
OP_STEP_FAILED = "StepFailed"
OP_SLEEP = "Sleep"
OP_WAIT_FOR_EVENT = "WaitForEvent"
OP_INVOKE = "InvokeFunction"
OP_RUN_COMPLETE = "RunComplete"
OP_AI_GATEWAY = "AIGateway"
OP_DEFER_ADD = "DeferAdd"
OP_DEFER_ABORT = "DeferAbort"
SUPPORTED_OPS = (OP_STEP_RUN, OP_STEP_PLANNED, OP_STEP_ERROR, OP_STEP_FAILED, OP_SLEEP,
                 OP_WAIT_FOR_EVENT, OP_INVOKE, OP_RUN_COMPLETE, OP_AI_GATEWAY)

MAX_RETRY_AFTER_SECONDS = 10 * 365 * 86400
"""A `Retry-After` further off than this (or not a finite number) is ignored."""
MAX_STEP_REPEATS = 512
"""How many repeats of one step id (`id:1`, `id:2`...) we try when naming a hashed step."""

_HASHED = re.compile(r"[0-9a-f]{40}")
_ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class ProtocolError(Exception):
    """An SDK answer this server can't use; `retriable` says whether to try again."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retriable = retriable


# -- errors an SDK reports --------------------------------------------------------------------


class SdkError(ReportedError):
    """A function or step error an SDK reported; retried while attempts remain."""


class SdkNonRetriableError(SdkError, NonRetriableError):
    """An SDK error that must not be retried (`x-inngest-no-retry: true`, `StepFailed`)."""


class SdkRetryAfterError(SdkError, RetryAfterError):
    """An SDK error with a `Retry-After`: retried, but not before `retry_at_ms`."""

    def __init__(self, error: dict[str, Any], retry_at_ms: int) -> None:
        SdkError.__init__(self, error)
        self.delay = dt.datetime.fromtimestamp(retry_at_ms / 1000, tz=dt.UTC)


def error_doc(value: Any, fallback: str = "the SDK reported an error") -> dict[str, Any]:
    """An SDK's error as stored and memoized: the object it sent, verbatim (see
    `reported_error`)."""
    return reported_error(value, fallback)


def sdk_error(error: dict[str, Any], *, no_retry: bool, retry_at_ms: int | None,
              reason: str | None = None) -> SdkError:
    """The exception that makes the runner treat an SDK error as the SDK asked; `reason` is
    why the attempt failed as the server saw it (`ReportedError.reason`)."""
    exc: SdkError
    if no_retry:
        exc = SdkNonRetriableError(error)
    elif retry_at_ms is not None:
        exc = SdkRetryAfterError(error, retry_at_ms)
    else:
        exc = SdkError(error)
    exc.reason = reason
    return exc


def parse_retry_after(value: str | None, now_ms: int) -> int | None:
    """When a `Retry-After` header allows the next attempt (ms), or None if absent or bad.

    Accepts seconds (`"30"`), an HTTP date, or an ISO 8601 date (what the Python SDK sends).
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not -MAX_RETRY_AFTER_SECONDS <= seconds <= MAX_RETRY_AFTER_SECONDS:  # NaN too
            return None
        return now_ms + max(0, int(seconds * 1000))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        try:
            return max(now_ms, to_ms(text))
        except (ValueError, OverflowError):
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(now_ms, int(when.timestamp() * 1000))


# -- step ids and the memo --------------------------------------------------------------------


def hash_step_id(text: str) -> str:
    """The SDKs' id of a step: lowercase hex SHA-1 of the user's id (`"id:n"` for repeats)."""
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def looks_hashed(text: str) -> bool:
    """True for a string shaped like a hashed step id (40 lowercase hex digits)."""
    return _HASHED.fullmatch(text) is not None


def memo_key(uid: str) -> str:
    """The hashed id an SDK knows a recorded step by (see `step_uid`)."""
    return uid if looks_hashed(uid) else hash_step_id(uid)


@dataclass(frozen=True, slots=True)
class Op:
    """One opcode of a 206 answer (unknown keys ignored)."""

    op: str
    id: str
    name: str = ""
    display_name: str = ""
    opts: dict[str, Any] = field(default_factory=dict)
    data: Any = None
    error: Any = None
    userland_id: str = ""
    userland_index: int | None = None
    metadata: Any = None
    """Metadata written inside the step (TypeScript): `[{kind, scope, op, values}]`."""


def parse_ops(body: Any) -> list[Op]:
    """The opcodes of a 206 answer: a JSON array of them (a lone object is taken as one)."""
    items = [body] if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise ProtocolError(f"a 206 answer must be a JSON array of opcodes, got {kind_of(body)}")
    ops: list[Op] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ProtocolError(f"opcode [{index}] must be an object, got {kind_of(item)}")
        op, op_id = item.get("op"), item.get("id")
        if not isinstance(op, str) or not op:
            raise ProtocolError(f"opcode [{index}] has no 'op'")
        if not isinstance(op_id, str) or not op_id:
            raise ProtocolError(f"opcode [{index}] ({op}) has no step 'id'")
        opts = item.get("opts")
        userland = item.get("userland")
        userland = userland if isinstance(userland, dict) else {}
        index_hint = userland.get("index")
        ops.append(Op(
            op=op, id=op_id, name=text_of(item.get("name")),
            display_name=text_of(item.get("displayName")),
            opts=opts if isinstance(opts, dict) else {}, data=item.get("data"),
            error=item.get("error"), userland_id=text_of(userland.get("id")),
            userland_index=index_hint if type(index_hint) is int and index_hint >= 0 else None,
            metadata=item.get("metadata")))
    return ops


def step_uid(op: Op) -> str:
    """The step id to record an SDK step under: the user's id, with `:n` for the n-th repeat
    (so the run page shows what the user wrote), verified against the hash the SDK sent.

    Falls back to the hash itself when it can't be matched (or when the user's id looks like
    a hash), so `memo_key` always gives back the SDK's id.
    """
    base = op.userland_id or op.display_name or op.name
    if base:
        tries = [op.userland_index] if op.userland_index is not None else []
        for n in [*tries, *range(MAX_STEP_REPEATS)]:
            text = base if n == 0 else f"{base}:{n}"
            if hash_step_id(text) == op.id:
                return op.id if looks_hashed(text) else text
    return op.id


def memo_value(record: StepAttempt) -> Any:
    """A recorded step's outcome as the SDKs expect it in `steps`."""
    if record.kind == "sleep":
        return None
    if record.kind == "wait_for_event":
        return None if record.output is None else sdk_event(record.output)
    if record.error is not None:
        return {"error": memo_error(record.error)}
    return {"data": record.output}


def sdk_event(doc: dict[str, Any]) -> dict[str, Any]:
    """An event (as `event_dict` gives it) in the shape the SDKs validate (`inngest_event`)."""
    return inngest_event(doc)


def call_body(
    *, events: list[StoredEvent], memo: Mapping[str, StepAttempt], run_id: str, attempt: int,
    max_attempts: int, disable_immediate_execution: bool,
) -> dict[str, Any]:
    """The body of a call to an SDK function. `ctx.fn_id` stays out on purpose: with it the
    TypeScript SDK switches to checkpointing instead of answering 206."""
    docs = [sdk_event(event_dict(ev)) for ev in events]
    done = sorted(memo.items(), key=lambda item: item[1].ended_at)  # completion order
    steps = {memo_key(uid): memo_value(record) for uid, record in done
             if record.kind != DEFER_KIND}
    # Deferred runs are not steps: the SDK learns of them from `defers` (and so does not
    # defer them again on replay).
    defers = {memo_key(uid): {"abortable": True} for uid, record in done
              if record.kind == DEFER_KIND and isinstance(record.output, dict)
              and not record.output.get("aborted")}
    stack = list(steps)
    return {
        **({"defers": defers} if defers else {}),
        "event": docs[0] if docs else {}, "events": docs, "steps": steps,
        "ctx": {"run_id": run_id, "attempt": attempt, "max_attempts": max_attempts, "env": "",
                "stack": {"stack": stack, "current": len(stack)},
                "disable_immediate_execution": disable_immediate_execution, "use_api": False},
        "version": -1, "use_api": False,
    }


def call_headers(*, run_id: str, step_id: str, request_id: str) -> dict[str, str]:
    """The headers of a call besides the content type, as Inngest sends them: the request's
    own id, the job's (the run and the step it runs: the same for that step's retries), the
    run's."""
    return {REQUEST_ID_HEADER: request_id, JOB_ID_HEADER: f"{run_id}:{step_id}",
            RUN_ID_HEADER: run_id, SERVER_KIND_HEADER: SERVER_KIND}


def call_url(runtime_url: str, step_id: str) -> str:
    """The function's runtime URL with `stepId` set (`step`, or a planned step's hash)."""
    parts = urllib.parse.urlsplit(runtime_url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
             if k != STEP_ID_PARAM]
    query.append((STEP_ID_PARAM, step_id))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


# -- answers ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """An SDK's answer to a call: the function's output, opcodes, or an error."""

    status: int
    output: Any = None
    ops: list[Op] | None = None
    error: dict[str, Any] | None = None
    no_retry: bool = False
    """`X-Inngest-No-Retry: true`, on any status (a 206's `StepError` too)."""
    retry_at_ms: int | None = None

    @property
    def reason(self) -> str:
        """Why an error answer failed the attempt, as Inngest words it."""
        return f"invalid status code: {self.status}"


def read_reply(status: int, headers: Mapping[str, str], body: bytes, now_ms: int) -> Reply:
    """Interpret an SDK's answer. `headers` must look names up case-insensitively.

    200 is the function's return value, 206 a list of opcodes, anything else an error.
    A 2xx without `X-Inngest-SDK` didn't come from an SDK. A 201 is the Python SDK's
    streamed answer: keep-alive spaces, then `{"status", "headers", "body"}`.
    """
    sdk = headers.get(SDK_HEADER)
    text = body.decode("utf-8", errors="replace")
    if status == 201 and sdk:
        status, headers, text = _unwrap_stream(text, headers)
    if 200 <= status < 300 and not sdk:
        raise ProtocolError(
            f"the app answered HTTP {status} without an {SDK_HEADER} header: is this URL an "
            "Inngest serve endpoint?", retriable=True)
    no_retry = str(headers.get(NO_RETRY_HEADER, "")).strip().lower() == "true"
    retry_at_ms = parse_retry_after(headers.get(RETRY_AFTER_HEADER), now_ms)
    if status == 200:
        return Reply(status, output=_json(text, "the function's return value") if text.strip()
                     else None)
    if status == 206:
        return Reply(status, ops=parse_ops(_json(text, "the opcodes of a 206 answer")),
                     no_retry=no_retry, retry_at_ms=retry_at_ms)
    if 200 <= status < 300:
        raise ProtocolError(f"the SDK answered HTTP {status}; only 200 and 206 mean something")
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = None
    fallback = f"the app answered HTTP {status}" + (f": {text.strip()[:500]}"
                                                    if text.strip() else "")
    return Reply(status, error=error_doc(parsed, fallback), no_retry=no_retry,
                 retry_at_ms=retry_at_ms)


def _unwrap_stream(text: str, headers: Mapping[str, str]
                   ) -> tuple[int, Mapping[str, str], str]:
    doc = _json(text.strip(), "a streamed answer")
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), int):
        raise ProtocolError("a streamed (201) answer must end with {status, headers, body}")
    inner = doc.get("headers")
    merged = _Headers({**dict(headers.items()), **(inner if isinstance(inner, dict) else {})})
    body = doc.get("body")
    return doc["status"], merged, body if isinstance(body, str) else json.dumps(body)


class _Headers(dict[str, str]):
    """Case-insensitive lookups over a plain dict of headers."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        super().__init__({k.lower(): str(v) for k, v in items.items()})

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ProtocolError(f"{what} is not valid JSON: {text[:200]!r}") from None


# -- times in opcodes -------------------------------------------------------------------------


def sleep_until_ms(op: Op, now_ms: int) -> int:
    """When a `Sleep` opcode wakes: `opts.duration`, else `name`, is a duration (TypeScript:
    `"3s"`) or a date (Python, TypeScript `sleepUntil`: ISO 8601)."""
    for value in (op.opts.get("duration"), op.name):
        if isinstance(value, str) and value.strip():
            try:
                return now_ms + parse_duration(value)
            except ValueError:
                pass
            try:
                return to_ms(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return now_ms + int(value)  # a bare number in a Sleep is milliseconds
    raise ProtocolError(f"Sleep step {op.display_name or op.id!r}: can't tell when it ends "
                        f"from name {op.name!r}")


def timeout_seconds(value: Any, now_ms: int, what: str) -> float | None:
    """A wait's or invoke's timeout (a duration like `"1h"` or an ISO date) in seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return parse_duration(value) / 1000
        except ValueError:
            pass
        try:
            return max(0, to_ms(value) - now_ms) / 1000
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) / 1000  # a bare number is milliseconds, as the SDKs count
    raise ProtocolError(f"{what}: {value!r} is not a duration or a date")


# -- event ids from an SDK's seed -------------------------------------------------------------


def seeded_ids(header: str | None, count: int) -> list[str] | None:
    """The internal event ids an `x-inngest-event-id-seed: <ms>,<base64 of 10 bytes>` header
    gives `count` events, or None without a usable header.

    As in Inngest: a ULID of those milliseconds and those 10 bytes, the event's index added
    to the last 4 bytes (so an SDK that sends a request again gets the same ids).
    """
    if not header or count < 1:
        return None
    millis_text, sep, entropy_text = header.strip().partition(",")
    # ASCII digits only, and few: int() refuses '²' and thousands of digits (a 500).
    if (not sep or len(millis_text) > 15
            or not (millis_text.isascii() and millis_text.isdigit())):
        return None
    millis = int(millis_text)
    try:
        entropy = base64.b64decode(entropy_text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not 0 < millis < 2**48 or len(entropy) != 10:
        return None
    head, tail = entropy[:6], int.from_bytes(entropy[6:], "big")
    ids = []
    for index in range(count):
        rand = head + ((tail + index) % 2**32).to_bytes(4, "big")
        ids.append(_ulid(millis, int.from_bytes(rand, "big")))
    return ids


def _ulid(millis: int, rand: int) -> str:
    value = (millis << 80) | rand
    return "".join(_ULID_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))


def text_of(value: Any) -> str:
    """`value` if it is a string, else an empty string."""
    return value if isinstance(value, str) else ""


def kind_of(value: Any) -> str:
    """The JSON type of a value, for error messages."""
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__)
