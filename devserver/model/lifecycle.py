"""The events a run's end emits, in Inngest's shapes: `inngest/function.finished` for every end,
plus `inngest/function.failed` or `inngest/function.cancelled`. They carry the trigger's sessions,
so an `on_failure` handler (a function triggered by `.failed`) runs in the same sessions.
"""

from __future__ import annotations

import json
from typing import Any

from devserver.app import CANCELLED_EVENT, FAILED_EVENT, FINISHED_EVENT
from devserver.model.events import IncomingEvent
from devserver.model.failures import stored_error
from devserver.model.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    RunRecord,
    StoredEvent,
    event_dict,
)


def lifecycle_names(status: str) -> list[str]:
    """The names of the events a run that ended with `status` emits."""
    return [FINISHED_EVENT, *{FAILED: [FAILED_EVENT], CANCELLED: [CANCELLED_EVENT]}.get(status, [])]


def lifecycle_events(
    run: RunRecord, events: list[StoredEvent], status: str, output_json: str | None,
    error: dict[str, Any] | None, names: list[str],
) -> list[IncomingEvent]:
    """The events called `names` for `run`, which ended with `status` after being triggered by
    `events`; `output_json` is its output when it completed, `error` why it failed."""
    docs = [event_dict(ev) for ev in events]
    base: dict[str, Any] = {"function_id": run.function_id, "run_id": run.run_id,
                            "event": docs[0] if docs else {}, "events": docs}
    output = None if output_json is None else json.loads(output_json)
    outcome = {"result": output} if status == COMPLETED else {
        "error": error or stored_error("FunctionCancelledError", "the run was cancelled")}
    return [IncomingEvent(name=name, data={**base, **outcome}, id=None, ts=None, v=None,
                          user=None, meta=None, sessions=dict(run.sessions))
            for name in names]
