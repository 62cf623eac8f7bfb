"""`/v0/gql`: the GraphQL query API that Inngest's dev server answers and that the official
SDKs' test harnesses (and tools written for Inngest) use to read events, runs, traces and
step outputs.

A real GraphQL implementation (graphql-core: parsing, validation, variables, fragments,
aliases) over a subset of Inngest's schema (`gql_schema.SDL`). Resolvers only read the store,
so a query sees every write acknowledged before it (read-your-writes like the rest of the API).

HTTP (served by `web.gql_routes`, which loads this module at the first query): `POST` with a
JSON body `{"query", "variables"?, "operationName"?}`, or `GET` with `query=` (and
`variables=` as JSON). Every answer that is a GraphQL response is `200` with
`{"data": ..., "errors": [...]}` — a validation error (unknown field, bad variable) too, as
graphql-over-http allows for `application/json`; a request that is not a GraphQL request at
all (no query, body not JSON) is `400` in the same `{"errors": [...]}` shape. An unknown run,
event or output id resolves to `null` with an error entry naming it (a non-null field such as
`runTrigger` makes its parent `null`, as GraphQL prescribes), never a 500.

The trace of a run: a root span for the run (its status, output, attempts) whose
`childrenSpans` are the run's steps in the order they first ran, one span per step id named by
it, each with one child span per attempt. `outputID`s are opaque ids (run id and step-attempt
sequence number) that `runTraceSpanOutputByID` resolves.
"""

from __future__ import annotations

import base64
import binascii
from inspect import isawaitable
from typing import Any

from aiohttp import web
from graphql import (
    ExecutionResult,
    GraphQLError,
    GraphQLResolveInfo,
    GraphQLSchema,
    build_schema,
    parse,
    validate,
)
from graphql import execute as execute_query

from devserver.app import FunctionDef
from devserver.clock import iso
from devserver.jsontext import dump_json
from devserver.model.metadata import MetadataUpdate
from devserver.model.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    WAITING,
    RunDetail,
    RunRecord,
    StepAttempt,
    StoredEvent,
    event_dict,
)
from devserver.model.triggers import CronTrigger
from devserver.sdk.protocol import sdk_event
from devserver.store.facade import Store
from devserver.web.gql_schema import SDL

MAX_QUERY_CHARS = 100_000
"""The longest query text accepted."""
MAX_LIST = 100
"""The most items `events` and `stream` return (`limit` above it is capped)."""
DEFAULT_EVENTS = 50
MAX_RUNS_PER_EVENT = 100
MAX_STEP_SPANS = 1000
"""The most step spans a trace lists (a bound on its size; the store keeps every attempt)."""

SCHEMA: GraphQLSchema = build_schema(SDL)
Info = GraphQLResolveInfo[Any]  # typed by its context

_RUN_STATUS = {QUEUED: "QUEUED", RUNNING: "RUNNING", COMPLETED: "COMPLETED",
               FAILED: "FAILED", CANCELLED: "CANCELLED"}
_SPAN_STATUS = {**_RUN_STATUS, WAITING: "WAITING"}
_STEP_OP = {"run": "RUN", "sleep": "SLEEP", "wait_for_event": "WAIT_FOR_EVENT",
            "invoke": "INVOKE", "ai": "AI_GATEWAY"}
_STEP_TYPE = {"run": "RUN", "sleep": "SLEEP", "wait_for_event": "WAIT_FOR_EVENT",
              "invoke": "INVOKE", "send_event": "SEND_EVENT"}


def _store(info: Info) -> Store:
    store: Store = info.context["store"]
    return store


# ---------------------------------------------------------------------------------------------
# Output ids: opaque, and resolved by runTraceSpanOutputByID


def encode_output_id(run_id: str, seq: int | None) -> str:
    """The id of a step attempt's output (`seq`), or of the run's (`None`)."""
    raw = f"{run_id}\n{'run' if seq is None else seq}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_output_id(output_id: str) -> tuple[str, int | None]:
    """(run id, attempt seq or None for the run's output); ValueError if not an output id."""
    try:
        raw = base64.urlsafe_b64decode(output_id + "=" * (-len(output_id) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(output_id) from exc
    run_id, sep, seq = raw.partition("\n")
    if not sep or not run_id:
        raise ValueError(output_id)
    if seq == "run":
        return run_id, None
    if not seq.isdigit():
        raise ValueError(output_id)
    return run_id, int(seq)


# ---------------------------------------------------------------------------------------------
# Documents


def _json(value: Any) -> str:
    return dump_json(value)


def _function_doc(fn: FunctionDef) -> dict[str, Any]:
    return {
        "id": fn.id, "name": fn.name, "slug": fn.id, "url": fn.remote or "", "appID": fn.app_id,
        "triggers": [{"type": "CRON", "value": t.cron} if isinstance(t, CronTrigger)
                     else {"type": "EVENT", "value": t.event} for t in fn.triggers],
    }


def _function(function_id: str) -> Any:
    """A run's function, looked up when asked for: its registered name, URL and triggers; a
    function no longer registered is named by its id (its runs are kept)."""
    def resolve(info: Info, **_: Any) -> dict[str, Any]:
        fn = _functions(info).get(function_id)
        if fn is not None:
            return _function_doc(fn)
        return {"id": function_id, "name": function_id, "slug": function_id, "url": "",
                "appID": "", "triggers": []}
    return resolve


def _functions(info: Info) -> dict[str, FunctionDef]:
    fns: dict[str, FunctionDef] = info.context["functions"]
    return fns


def _run_v1(run: RunRecord) -> dict[str, Any]:
    """A run as Inngest's `FunctionRun` (in event lists and the stream)."""
    return {
        "id": run.run_id, "functionID": run.function_id, "function": _function(run.function_id),
        "status": _RUN_STATUS.get(run.status, "RUNNING"), "startedAt": iso(run.started_at),
        "finishedAt": iso(run.ended_at), "output": _run_output_json(run),
        "eventID": run.event_id,
    }


def _run_output_json(run: RunRecord) -> str | None:
    if run.error is not None:
        return _json(run.error)
    if run.status == COMPLETED:
        return _json(run.output)
    return None


def _raw_event(ev: StoredEvent) -> str:
    """The event as the SDKs see it (Inngest's `raw`)."""
    doc = sdk_event(event_dict(ev))
    doc["id"] = ev.event_id or ev.internal_id
    return _json(doc)


def _event(ev: StoredEvent, runs: list[RunRecord]) -> dict[str, Any]:
    return {
        "id": ev.internal_id, "externalID": ev.event_id, "name": ev.name,
        "createdAt": iso(ev.received_at), "payload": _json(ev.data), "raw": _raw_event(ev),
        "totalRuns": len(runs), "functionRuns": [_run_v1(r) for r in runs],
    }


def _attempt_status(step: StepAttempt) -> str:
    return _SPAN_STATUS.get(step.status, "RUNNING")


def _span(run: RunRecord, *, span_id: str, name: str, status: str, started: int | None,
          ended: int | None, children: list[dict[str, Any]], output_id: str | None,
          attempts: int | None, step: StepAttempt | None, root: bool,
          parent: str | None, step_type: str | None = None,
          metadata: list[MetadataUpdate] | None = None) -> dict[str, Any]:
    return {
        "functionID": run.function_id, "runID": run.run_id, "spanID": span_id,
        "traceID": run.run_id, "name": name, "status": status, "attempts": attempts,
        "duration": None if started is None or ended is None else ended - started,
        "outputID": output_id, "queuedAt": iso(run.queued_at if started is None else started),
        "startedAt": iso(started), "endedAt": iso(ended), "childrenSpans": children,
        "stepOp": None if step is None else _STEP_OP.get(step.kind),
        "stepID": None if step is None else step.step_id,
        "stepType": step_type if step is None else _STEP_TYPE.get(step.kind, step.kind.upper()),
        "isRoot": root, "parentSpanID": parent, "isUserland": False,
        "metadata": [_metadata_doc(m) for m in metadata or []],
    }


def _metadata_doc(update: MetadataUpdate) -> dict[str, Any]:
    """One update an SDK attached (`POST /v1/runs/{id}/metadata`), as a span's metadata."""
    return {"scope": update.scope, "kind": update.kind, "values": update.values,
            "updatedAt": iso(update.created_at)}


def _step_name(step_id: str, seen: dict[str, list[StepAttempt]]) -> str:
    """The user's name of a step: a repeated id is stored as `id:N` (as the SDKs hash it),
    and Inngest names every repeat by the id itself (the harnesses count repeats by name)."""
    base, sep, n = step_id.rpartition(":")
    return base if sep and n.isdigit() and base in seen else step_id


def _trace(detail: RunDetail) -> dict[str, Any]:
    """The root span of a run: its steps in first-run order, their attempts under them."""
    run = detail.run
    root_id = f"{run.run_id}:run"
    by_step: dict[str, list[StepAttempt]] = {}
    for step in detail.steps:
        if step.kind == "function" or step.step_id is None:
            continue
        if step.step_id not in by_step and len(by_step) >= MAX_STEP_SPANS:
            continue
        by_step.setdefault(step.step_id, []).append(step)
    run_meta = [m for m in detail.metadata if m.step_id is None]
    step_meta: dict[str, list[MetadataUpdate]] = {}
    for update in detail.metadata:
        if update.step_id is not None:
            step_meta.setdefault(update.step_id, []).append(update)
    children = []
    for step_id, tries in by_step.items():
        meta = step_meta.get(step_id, [])
        last = tries[-1]
        span_id = f"{run.run_id}:step:{step_id}"
        attempt_spans = [
            _span(run, span_id=f"{run.run_id}:attempt:{t.seq}", name=f"Attempt {t.attempt}",
                  status=_attempt_status(t), started=t.started_at,
                  ended=None if t.status == WAITING else t.ended_at, children=[],
                  output_id=encode_output_id(run.run_id, t.seq), attempts=t.attempt, step=t,
                  root=False, parent=span_id,
                  metadata=[m for m in meta if m.step_attempt == t.attempt])
            for t in tries]
        children.append(_span(
            run, span_id=span_id, name=_step_name(step_id, by_step), status=_attempt_status(last),
            started=tries[0].started_at, ended=None if last.status == WAITING else last.ended_at,
            children=attempt_spans, output_id=encode_output_id(run.run_id, last.seq),
            attempts=len(tries), step=last, root=False, parent=root_id,
            metadata=[m for m in meta if m.step_attempt is None]))
    if run.ended_at is not None:
        # The run's end (its output or error), as Inngest's trace ends with a finalization
        # span; the TypeScript SDK's harness reads a run's result from it.
        children.append(_span(
            run, span_id=f"{run.run_id}:finalization", name="Finalization",
            status=_RUN_STATUS.get(run.status, "RUNNING"), started=run.ended_at,
            ended=run.ended_at, children=[], output_id=encode_output_id(run.run_id, None),
            attempts=None, step=None, root=False, parent=root_id, step_type="FINALIZATION"))
    return _span(
        run, span_id=root_id, name=run.function_id,
        status=_RUN_STATUS.get(run.status, "RUNNING"), started=run.started_at,
        ended=run.ended_at, children=children,
        output_id=encode_output_id(run.run_id, None) if run.ended_at is not None else None,
        attempts=run.attempt, step=None, root=True, parent=None, metadata=run_meta)


def _run_v2(detail: RunDetail) -> dict[str, Any]:
    run = detail.run
    output = _run_output_json(run)
    return {
        "id": run.run_id, "functionID": run.function_id, "function": _function(run.function_id),
        "traceID": run.run_id, "queuedAt": iso(run.queued_at), "startedAt": iso(run.started_at),
        "endedAt": iso(run.ended_at), "status": _RUN_STATUS.get(run.status, "RUNNING"),
        "triggerIDs": [ev.internal_id for ev in detail.events], "eventName": run.event_name,
        "isBatch": len(detail.events) > 1, "output": output,
        "trace": lambda info, **_: _trace(detail),
    }


def _error_doc(error: dict[str, Any]) -> dict[str, Any]:
    stack = error.get("stack")
    return {"message": str(error.get("message") or ""), "name": error.get("name"),
            "stack": stack if isinstance(stack, str) else None, "cause": error.get("cause")}


# ---------------------------------------------------------------------------------------------
# Root resolvers


async def _run_detail(info: Info, run_id: str) -> RunDetail:
    detail = await _store(info).run_detail(run_id)
    if detail is None:
        raise GraphQLError(f"run not found: {run_id!r}")
    return detail


async def resolve_run(_: Any, info: Info, runID: str) -> dict[str, Any]:
    return _run_v2(await _run_detail(info, runID))


async def resolve_run_trace(_: Any, info: Info, runID: str) -> dict[str, Any]:
    return _trace(await _run_detail(info, runID))


def resolve_functions(_: Any, info: Info) -> list[dict[str, Any]]:
    return [_function_doc(fn) for fn in _functions(info).values()]


def resolve_function_by_slug(_: Any, info: Info,
                             query: dict[str, Any]) -> dict[str, Any] | None:
    fn = _functions(info).get(str(query["functionSlug"]))
    return None if fn is None else _function_doc(fn)


async def resolve_run_trigger(_: Any, info: Info, runID: str) -> dict[str, Any]:
    detail = await _run_detail(info, runID)
    events = detail.events
    return {
        "eventName": detail.run.event_name, "IDs": [ev.internal_id for ev in events],
        "payloads": [_raw_event(ev) for ev in events],
        "timestamp": iso(events[0].received_at if events else detail.run.queued_at),
        "isBatch": len(events) > 1, "batchID": None,
        "cron": detail.run.event_name if detail.run.event_name.startswith("cron") else None,
    }


async def resolve_output(_: Any, info: Info, outputID: str) -> dict[str, Any]:
    try:
        run_id, seq = decode_output_id(outputID)
    except ValueError:
        raise GraphQLError(f"not an output id: {outputID!r}") from None
    detail = await _store(info).run_detail(run_id)
    if detail is None:
        raise GraphQLError(f"output not found: {outputID!r} (no run {run_id!r})")
    if seq is None:
        run = detail.run
        if run.error is not None:
            return {"input": None, "data": None, "error": _error_doc(run.error)}
        return {"input": None, "data": _json(run.output), "error": None}
    step = next((s for s in detail.steps if s.seq == seq), None)
    if step is None:
        raise GraphQLError(f"output not found: {outputID!r}")
    if step.error is not None:
        return {"input": None, "data": None, "error": _error_doc(step.error)}
    return {"input": None, "data": None if step.status == WAITING else _json(step.output),
            "error": None}


async def resolve_event(_: Any, info: Info,
                        query: dict[str, Any]) -> dict[str, Any] | None:
    event_id = str(query["eventId"])
    store = _store(info)
    ev = await store.event(event_id)
    if ev is None:
        raise GraphQLError(f"event not found: {event_id!r}")
    return _event(ev, (await store.event_runs(event_id))[:MAX_RUNS_PER_EVENT])


async def resolve_event_v2(_: Any, info: Info, id: str) -> dict[str, Any]:
    store = _store(info)
    ev = await store.event(id)
    if ev is None:
        raise GraphQLError(f"event not found: {id!r}")
    runs = []
    for run in (await store.event_runs(id))[:MAX_RUNS_PER_EVENT]:
        detail = await store.run_detail(run.run_id)
        if detail is not None:
            runs.append(_run_v2(detail))
    return {
        "id": ev.internal_id, "idempotencyKey": ev.event_id, "name": ev.name,
        "occurredAt": iso(ev.ts or ev.received_at), "receivedAt": iso(ev.received_at),
        "raw": _raw_event(ev), "version": ev.v if isinstance(ev.v, str) else None,
        "source": None, "runs": runs,
    }


async def _recent(info: Info, limit: int, internal: bool, *, before: str | None = None,
                  after: str | None = None) -> list[tuple[StoredEvent, list[RunRecord]]]:
    """Up to `limit` events, newest first: the latest, or those received before (older than)
    or after (newer than) the event `before`/`after`; internal (`inngest/...`) ones only when
    asked for."""
    store = _store(info)
    # Internal events are filtered here: read extra to fill the page.
    read = limit if internal else min(limit * 4, MAX_LIST * 4)
    events = await store.recent_events(read, before=before, after=after)
    if after is not None:
        events.reverse()  # the page is the events just after `after`: take them oldest first
    page = [ev for ev in events if internal or not ev.name.startswith("inngest/")][:limit]
    if after is not None:
        page.reverse()
    runs = await store.runs_of_events([ev.internal_id for ev in page])
    return [(ev, runs[ev.internal_id][:MAX_RUNS_PER_EVENT]) for ev in page]


def _cursor(query: dict[str, Any], name: str) -> str | None:
    value = query.get(name)
    return None if value is None else str(value)


async def resolve_events(_: Any, info: Info,
                         query: dict[str, Any]) -> list[dict[str, Any]]:
    return [_event(ev, runs) for ev, runs in await _recent(
        info, DEFAULT_EVENTS, True, before=_cursor(query, "lastEventId"))]


async def resolve_stream(_: Any, info: Info,
                         query: dict[str, Any]) -> list[dict[str, Any]]:
    limit = max(0, min(int(query.get("limit") or 20), MAX_LIST))
    internal = bool(query.get("includeInternalEvents"))
    return [{
        "id": ev.internal_id, "trigger": ev.name, "type": "EVENT",
        "createdAt": iso(ev.received_at), "runs": [_run_v1(r) for r in runs],
        "inBatch": False,
    } for ev, runs in await _recent(info, limit, internal, before=_cursor(query, "before"),
                                    after=_cursor(query, "after"))]


_ROOT = {
    "run": resolve_run, "runTrigger": resolve_run_trigger,
    "runTraceSpanOutputByID": resolve_output, "event": resolve_event,
    "eventV2": resolve_event_v2, "events": resolve_events, "stream": resolve_stream,
    "runTrace": resolve_run_trace, "functions": resolve_functions,
    "functionBySlug": resolve_function_by_slug,
}
for _name, _resolver in _ROOT.items():
    SCHEMA.query_type.fields[_name].resolve = _resolver  # type: ignore[union-attr]


def _field_resolver(source: Any, info: Info, **args: Any) -> Any:
    """Dict fields; a callable value is a lazy field (e.g. a run's trace)."""
    value = source.get(info.field_name) if isinstance(source, dict) else None
    return value(info, **args) if callable(value) else value


# ---------------------------------------------------------------------------------------------
# HTTP


def _before_execution(result: ExecutionResult) -> bool:
    """Whether the errors are request errors (bad variables, unknown operation): no path."""
    return result.data is None and all(e.path is None for e in result.errors or [])


def _response(result: ExecutionResult | None, status: int = 200,
              errors: list[str] | None = None, *, request_error: bool = False) -> web.Response:
    body: dict[str, Any]
    if result is None:
        body = {"errors": [{"message": m} for m in errors or []]}
    else:
        body = dict(result.formatted)
        if request_error:
            body.pop("data", None)
    return web.Response(text=_json(body), status=status, content_type="application/json")


async def execute(store: Store, functions: list[FunctionDef], query: Any, variables: Any,
                  operation: Any) -> web.Response:
    """Run one GraphQL request against the store and the functions registered now."""
    if not isinstance(query, str) or not query.strip():
        return _response(None, 400, ["the request has no GraphQL query (\"query\")"])
    if len(query) > MAX_QUERY_CHARS:
        return _response(None, 400, [f"the query is over {MAX_QUERY_CHARS} characters"])
    if variables is not None and not isinstance(variables, dict):
        return _response(None, 400, ["\"variables\" must be a JSON object"])
    if operation is not None and not isinstance(operation, str):
        return _response(None, 400, ["\"operationName\" must be a string"])
    # Parsed and validated here, so that a request error (syntax, unknown field) answers
    # `errors` without `data`, as the GraphQL spec says for errors raised before execution.
    try:
        document = parse(query)
    except GraphQLError as exc:
        return _response(ExecutionResult(None, [exc]), request_error=True)
    errors = validate(SCHEMA, document)
    if errors:
        return _response(ExecutionResult(None, errors), request_error=True)
    result = execute_query(SCHEMA, document, variable_values=variables,
                           operation_name=operation,
                           context_value={"store": store,
                                          "functions": {fn.id: fn for fn in functions}},
                           field_resolver=_field_resolver)
    done = await result if isawaitable(result) else result
    return _response(done, request_error=_before_execution(done))
