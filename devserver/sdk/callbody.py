"""The body of a call to an SDK function, as Inngest builds it: the events, the memo of
finished steps (hashed step id -> outcome, in completion order), the run's deferred runs, and
`ctx` (the run, the attempt, the stack, `disable_immediate_execution`, and `fn_id` with the
call's id `qi_id`, which let the TypeScript SDK checkpoint). A memo too large to send inline is
left out with `use_api: true`, and the SDK fetches it from the API instead
(`devserver.web.sdk_state`). Pure logic: dicts and JSON text in, JSON bytes out.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from devserver.jsontext import dump_json
from devserver.model.lifecycle import DEFER_KIND
from devserver.model.records import StepAttempt, StoredEvent, event_dict
from devserver.sdk.protocol import ROOT_STEP, memo_key, memo_value, sdk_event

MAX_CALL_BYTES = 4 * 1024 * 1024
"""The largest call body sent with its memo and events inline (Inngest's limit): past it the
call says `use_api: true` and the SDK fetches them from `GET /v0/runs/{id}/actions` and
`/batch`, so an app behind a body limit of a few MiB still gets a memo of tens."""


def memo_steps(memo: Mapping[str, StepAttempt]) -> dict[str, Any]:
    """The memo as the SDKs read it (`steps`, `/v0/runs/{id}/actions`): hashed step id ->
    outcome, in completion order. Deferred runs are not steps (see `memo_defers`)."""
    done = sorted(memo.items(), key=lambda item: item[1].ended_at)
    return {memo_key(uid): memo_value(record) for uid, record in done
            if record.kind != DEFER_KIND}


def memo_defers(memo: Mapping[str, StepAttempt]) -> dict[str, Any]:
    """A call's `defers`: the deferred runs not aborted, so the SDK does not defer them again
    on replay."""
    return {memo_key(uid): {"abortable": True} for uid, record in memo.items()
            if record.kind == DEFER_KIND and isinstance(record.output, dict)
            and not record.output.get("aborted")}


def function_uuid(function_id: str) -> str:
    """`ctx.fn_id`: Inngest's functions have UUIDs; this one is derived from the function's
    id, so it is the same on every call and after every restart."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"devserver:function:{function_id}"))


def call_body(
    *, events: list[StoredEvent], memo: Mapping[str, StepAttempt], run_id: str, attempt: int,
    max_attempts: int, disable_immediate_execution: bool, fn_id: str = "", qi_id: str = "",
    use_api: bool = False,
) -> dict[str, Any]:
    """The body of a call to an SDK function, as Inngest sends it. `fn_id` and `qi_id` (the
    call's id) let the TypeScript SDK checkpoint steps to `/v1/checkpoint/{run}/async`."""
    docs = [sdk_event(event_dict(ev)) for ev in events]
    steps = memo_steps(memo)
    body = _body(docs[0] if docs else {}, docs, list(steps), run_id=run_id, attempt=attempt,
                 max_attempts=max_attempts, force_plan=disable_immediate_execution,
                 fn_id=fn_id, qi_id=qi_id, use_api=use_api, defers=memo_defers(memo))
    body["steps"] = {} if use_api else steps
    return body


def encode_call(
    *, events: list[StoredEvent], memo: Mapping[str, StepAttempt], run_id: str, attempt: int,
    max_attempts: int, disable_immediate_execution: bool, fn_id: str, qi_id: str,
    max_bytes: int = MAX_CALL_BYTES,
) -> tuple[bytes, bool]:
    """The call body as sent, and whether it says `use_api`. As Inngest decides: a memo over
    `max_bytes` (less 1 KiB) is left out; a body still over `max_bytes` leaves out the events
    too (`event`, the first, always stays)."""
    docs = [sdk_event(event_dict(ev)) for ev in events]
    steps = memo_steps(memo)
    steps_text = dump_json(steps)
    use_api = len(steps_text) > max_bytes - 1024 and \
        len(steps_text.encode("utf-8")) > max_bytes - 1024
    fields: dict[str, Any] = {
        "run_id": run_id, "attempt": attempt, "max_attempts": max_attempts,
        "force_plan": disable_immediate_execution, "fn_id": fn_id, "qi_id": qi_id,
        "defers": memo_defers(memo)}
    event = docs[0] if docs else {}
    head = dump_json(_body(event, docs, list(steps), use_api=use_api, **fields))
    text = f'{head[:-1]},"steps":{"{}" if use_api else steps_text}}}'
    if len(text) > max_bytes and len(text.encode("utf-8")) > max_bytes:
        use_api = True
        text = dump_json({**_body(event, [], list(steps), use_api=True, **fields), "steps": {}})
    return text.encode("utf-8"), use_api


def _body(event: dict[str, Any], docs: list[dict[str, Any]], stack: list[str], *, run_id: str,
          attempt: int, max_attempts: int, force_plan: bool, fn_id: str, qi_id: str,
          use_api: bool, defers: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "run_id": run_id, "attempt": attempt, "max_attempts": max_attempts, "env": "",
        "stack": {"stack": stack, "current": len(stack)},
        "disable_immediate_execution": force_plan, "use_api": use_api}
    if fn_id:
        ctx.update(fn_id=fn_id, step_id=ROOT_STEP, qi_id=qi_id)
    return {**({"defers": defers} if defers else {}),
            "event": event, "events": docs, "ctx": ctx, "version": -1, "use_api": use_api}
