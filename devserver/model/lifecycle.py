"""The events a run's end emits, in Inngest's shapes: `inngest/function.finished` for every end,
plus `inngest/function.failed` or `inngest/function.cancelled`. They carry the trigger's sessions,
so an `on_failure` handler (a function triggered by `.failed`) runs in the same sessions.
`data.event` is the trigger in Inngest's wire shape (its real id), and a failure's
`data.error` is Inngest's `{error, name, message, stack}` (`failure_event_error`); the run
itself keeps the error verbatim.

Also the `_inngest` object Inngest adds to an invoked run's event data (`invoke_metadata`),
and the `inngest/deferred.schedule` events that start the runs an SDK deferred (`defer()`,
recorded as steps of kind `defer`) when the run that deferred them ends (`deferred_events`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from devserver.app import CANCELLED_EVENT, FAILED_EVENT, FINISHED_EVENT
from devserver.model.events import IncomingEvent
from devserver.model.failures import failure_event_error, stored_error
from devserver.model.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    RunRecord,
    StepAttempt,
    StoredEvent,
    event_dict,
    inngest_event,
)


def lifecycle_names(status: str) -> list[str]:
    """The names of the events a run that ended with `status` emits."""
    return [FINISHED_EVENT, *{FAILED: [FAILED_EVENT], CANCELLED: [CANCELLED_EVENT]}.get(status, [])]


def lifecycle_events(
    run: RunRecord, events: list[StoredEvent], status: str, output_json: str | None,
    error: dict[str, Any] | None, names: list[str], reason: str | None = None,
) -> list[IncomingEvent]:
    """The events called `names` for `run`, which ended with `status` after being triggered by
    `events`; `output_json` is its output when it completed, `error` why it failed (and
    `reason`, why its last attempt failed as the server saw it: see `failure_event_error`)."""
    docs = [inngest_event(event_dict(ev)) for ev in events]
    base: dict[str, Any] = {"function_id": run.function_id, "run_id": run.run_id,
                            "event": docs[0] if docs else {}, "events": docs}
    output = None if output_json is None else json.loads(output_json)
    outcome = {"result": output} if status == COMPLETED else {
        "error": failure_event_error(
            error or stored_error("FunctionCancelledError", "the run was cancelled"), reason)}
    return [IncomingEvent(name=name, data={**base, **outcome}, id=None, ts=None, v=None,
                          user=None, meta=None, sessions=dict(run.sessions))
            for name in names]


INNGEST_DATA_KEY = "_inngest"
"""The key of the data Inngest adds to the events it makes itself (an invoke's)."""


def invoke_metadata(*, source_app_id: str, source_fn_id: str, target_fn_id: str,
                    correlation_id: str, expires_at: int | None, name: str) -> dict[str, Any]:
    """`data._inngest` of an `inngest/function.invoked` event, with Inngest's keys: who
    invoked (`source_*`), what (`fn_id`), the `correlation_id` (`<run id>.<hashed step id>`)
    that ties the child's end to the waiting step, and when the wait expires (`expire`, ms;
    0: never)."""
    return {"source_app_id": source_app_id, "source_fn_id": source_fn_id, "source_fn_v": 1,
            "fn_id": target_fn_id, "correlation_id": correlation_id,
            "expire": expires_at or 0, "gid": "", "name": name}


DEFERRED_EVENT = "inngest/deferred.schedule"
DEFER_KIND = "defer"
"""The step kind of a deferred run (`DeferAdd`): its output is `{fn_slug, input, meta,
aborted}`."""


def deferred_events(run: RunRecord, memo: Mapping[str, StepAttempt]) -> list[IncomingEvent]:
    """The `inngest/deferred.schedule` events of the runs `run` deferred and did not abort, in
    the order they were deferred: data is the deferred input with Inngest's `_inngest`
    (`fn_slug` routes it to the deferred function, `parent_*` and `defer_id` name where it
    came from); they carry the run's sessions."""
    out: list[IncomingEvent] = []
    for uid, record in sorted(memo.items(), key=lambda item: item[1].ended_at):
        doc = record.output
        if record.kind != DEFER_KIND or not isinstance(doc, dict) or doc.get("aborted"):
            continue
        given = doc.get("input")
        data = dict(given) if isinstance(given, dict) else {}
        data[INNGEST_DATA_KEY] = {"fn_slug": doc.get("fn_slug"), "parent_fn_slug": run.function_id,
                                  "parent_run_id": run.run_id, "defer_id": doc.get("hashed_id")
                                  or uid}
        out.append(IncomingEvent(name=DEFERRED_EVENT, data=data, id=None, ts=None, v=None,
                                 user=None, meta=None, sessions=dict(run.sessions)))
    return out
