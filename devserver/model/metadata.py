"""Run metadata an SDK attaches through `POST /v1/runs/{id}/metadata` (the TypeScript SDK's
`metadata` helpers and its warnings), validated as Inngest's API validates it.

Pure logic. The body is `{"target": {step_id?, step_index?, step_attempt?, span_id?},
"metadata": [{kind, op, values}]}`: without a `step_id` the metadata is the run's own (and
naming an index, attempt or span without a step is an error); with one it belongs to that
step (its `step_index`-th repeat, `id:n`, as step ids are recorded). Kinds are at most 128
characters; `inngest.`-prefixed kinds only from Inngest's allowlist; each update's values are a
JSON object of at most 64 KiB.

The TypeScript SDK also ships metadata written inside a step with that step's opcode
(`metadata: [{kind, scope, op, values}]`): `op_metadata` reads it by the same rules, skipping
what breaks them (an SDK's extra, never a reason to fail its run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from devserver.errors import PayloadTooLarge, UserError

MAX_KIND_CHARS = 128
MAX_UPDATE_BYTES = 64 * 1024
"""The largest one update's values may be, as JSON (Inngest: a metadata span's limit)."""
MAX_UPDATES = 100
"""The most updates one request may carry."""
OPS = ("set", "merge", "delete", "add")
ALLOWED_INNGEST_KINDS = frozenset({
    "inngest.ai", "inngest.http", "inngest.http.timing", "inngest.response_headers",
    "inngest.warnings", "inngest.experiment", "inngest.score"})
"""The `inngest.*` kinds an SDK may set (any other would pass for Inngest's own)."""
RUN_SCOPE = "run"
STEP_SCOPE = "step"


@dataclass(frozen=True, slots=True)
class MetadataUpdate:
    """One update as stored: where it belongs, its kind, op and values."""

    scope: str
    step_id: str | None
    step_attempt: int | None
    kind: str
    op: str
    values: dict[str, Any]
    created_at: int = 0

    def doc(self) -> dict[str, Any]:
        """The update in a run document."""
        return {"scope": self.scope, "step_id": self.step_id,
                "step_attempt": self.step_attempt, "kind": self.kind, "op": self.op,
                "values": self.values}


def parse_metadata_request(body: Any) -> list[MetadataUpdate]:
    """The updates of a `POST /v1/runs/{id}/metadata` body; `UserError` (400) saying what is
    wrong and where, `PayloadTooLarge` (413) for values over MAX_UPDATE_BYTES."""
    if not isinstance(body, dict):
        raise UserError("the body must be a JSON object with 'target' and 'metadata'")
    target = body.get("target", {})
    if target is None:
        target = {}
    if not isinstance(target, dict):
        raise UserError("'target' must be an object")
    step_id = target.get("step_id")
    if step_id is None:
        for key in ("step_index", "step_attempt", "span_id"):
            if target.get(key) is not None:
                raise UserError(f"target.step_id must be defined if target.{key} is defined")
        scope, uid, attempt = RUN_SCOPE, None, None
    else:
        if not isinstance(step_id, str) or not step_id:
            raise UserError("target.step_id must be a non-empty string")
        index = _int(target.get("step_index"), "target.step_index", minimum=0)
        attempt = _int(target.get("step_attempt"), "target.step_attempt", minimum=-1)
        if attempt == -1:
            attempt = None  # Inngest's legacy "the latest attempt"
        scope, uid = STEP_SCOPE, step_id if not index else f"{step_id}:{index}"
    updates = body.get("metadata")
    if not isinstance(updates, list) or not updates:
        raise UserError("'metadata' must be a non-empty array of {kind, op, values}")
    if len(updates) > MAX_UPDATES:
        raise UserError(f"'metadata' has {len(updates)} updates; at most {MAX_UPDATES}")
    return [_update(item, f"metadata[{i}]", scope, uid, attempt)
            for i, item in enumerate(updates)]


def op_metadata(entries: Any, step_id: str, attempt: int) -> list[MetadataUpdate]:
    """The valid updates an opcode carries (`scope` "run" is the run's; anything else the
    step's, at `attempt`)."""
    if not isinstance(entries, list):
        return []
    updates: list[MetadataUpdate] = []
    for index, item in enumerate(entries[:MAX_UPDATES]):
        run_scoped = isinstance(item, dict) and item.get("scope") == RUN_SCOPE
        try:
            updates.append(_update(item, f"metadata[{index}]",
                                   RUN_SCOPE if run_scoped else STEP_SCOPE,
                                   None if run_scoped else step_id,
                                   None if run_scoped else attempt))
        except UserError:
            continue
    return updates


def _update(item: Any, where: str, scope: str, step_id: str | None,
            attempt: int | None) -> MetadataUpdate:
    if not isinstance(item, dict):
        raise UserError(f"{where} must be an object with kind, op and values")
    kind, op, values = item.get("kind"), item.get("op"), item.get("values")
    if not isinstance(kind, str) or not kind:
        raise UserError(f"{where}.kind must be a non-empty string")
    if len(kind) > MAX_KIND_CHARS:
        raise UserError(f"{where}.kind is {len(kind)} characters; at most {MAX_KIND_CHARS}")
    if kind.startswith("inngest.") and kind not in ALLOWED_INNGEST_KINDS:
        raise UserError(f"{where}.kind {kind!r}: inngest-prefixed kinds are Inngest's own; "
                        f"an SDK may set {', '.join(sorted(ALLOWED_INNGEST_KINDS))}")
    if op not in OPS:
        raise UserError(f"{where}.op must be one of {', '.join(OPS)}, got {op!r}")
    if not isinstance(values, dict):
        raise UserError(f"{where}.values must be an object")
    size = len(json.dumps(values, ensure_ascii=False).encode("utf-8"))
    if size > MAX_UPDATE_BYTES:
        raise PayloadTooLarge(f"{where}.values is {size:,} bytes as JSON; at most "
                              f"{MAX_UPDATE_BYTES:,}")
    return MetadataUpdate(scope, step_id, attempt, kind, op, values)


def _int(value: Any, where: str, *, minimum: int) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise UserError(f"{where} must be a whole number, {minimum} or more")
    return value
