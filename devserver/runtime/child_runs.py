"""The steps that start other runs in the run's tree: `send_event` (the runs its events
trigger) and `invoke` (one child run, whose output the step returns once it ends).

Both store the events, the step and the runs they start in one commit, bounded by the tree's
size (`max_tree_runs`), then hand them to the runner's intake. An invoke then waits like any
waiting step, settled by reading the child run.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from devserver.app import INVOKED_EVENT, NonRetriableError
from devserver.clock import parse_duration
from devserver.errors import Reschedule, UserError
from devserver.ids import new_ulid
from devserver.jsontext import dump_json
from devserver.model.events import validate_event
from devserver.model.failures import (
    INVOKE_TIMEOUT_MESSAGE,
    INVOKE_TIMEOUT_NAME,
    FinalReportedError,
    step_error,
    stored_error,
)
from devserver.model.lifecycle import INNGEST_DATA_KEY, invoke_metadata
from devserver.model.limits import RunTreeTooLarge
from devserver.model.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    FINISHED,
    WAITING,
    NewEvent,
    NewRun,
    StepAttempt,
    WaitSpec,
)
from devserver.model.registry import FunctionNotFound
from devserver.runtime.outputs import to_json_value
from devserver.runtime.steps import Steps


class ChildRunSteps(Steps):
    """An invocation's steps that start runs: sending events and invoking functions."""

    async def send_event(self, step_id: str, events: Any) -> list[str]:
        """Send events (exactly once) through the same validation as `/e/`; returns their ids.

        Events inherit the run's sessions unless they set sessions of their own.
        """
        uid = self.unique_id(step_id)
        if uid in self.memo:
            return list(self.replay(self.memo[uid]))
        started = self.clock.now_ms()
        raw = [events] if isinstance(events, dict) else events
        try:
            if not isinstance(raw, list) or not raw:
                raise UserError("send_event needs an event object or a non-empty list of them")
            incoming = [validate_event(self._inherit(obj), i) for i, obj in enumerate(raw)]
        except UserError as exc:
            await self.step_failed(uid, NonRetriableError(exc.message), started,
                                   kind="send_event")
            raise AssertionError("step_failed always raises") from None
        now = self.clock.now_ms()
        prepared = self.runtime.prepare(self.env, incoming, now, source=self.run_id)
        ids = [ev.internal_id for ev in prepared]
        record = StepAttempt(0, uid, "send_event", self.attempt, COMPLETED, started, now, ids,
                             None, final=True)
        try:
            created = await self.store.send_events(self.env, now, prepared, self.run_id, record,
                                                   self.runtime.max_tree_runs)
        except RunTreeTooLarge as exc:
            await self.step_failed(uid, NonRetriableError(str(exc)), started, kind="send_event")
            raise AssertionError("step_failed always raises") from None
        self._check_live(created is not None)
        assert created is not None
        self._done(record)
        await self.runtime.after_ingest(self.env, prepared, created)
        return ids

    def _inherit(self, obj: Any) -> Any:
        if not isinstance(obj, dict) or not self.sessions:
            return obj
        meta = obj.get("meta")
        if obj.get("sessions") or (isinstance(meta, dict) and meta.get("sessions")):
            return obj
        merged_meta = dict(meta) if isinstance(meta, dict) else {}
        merged_meta["propagated_sessions"] = dict(self.sessions)
        return {**obj, "meta": merged_meta}

    async def invoke(self, step_id: str, function: object, data: Any = None,
                     timeout: Any = None) -> Any:
        """Run another function with `data` as its event data and return its output.

        The child run carries this run's sessions. Its failure is raised here as `StepError`.
        """
        return await self.invoke_step(self.unique_id(step_id), function, data, timeout)

    async def invoke_step(self, uid: str, function: object, data: Any = None,
                          timeout: Any = None) -> Any:
        """`invoke` for a step id that is already unique (SDK steps come that way)."""
        if uid in self.memo:
            return self.replay(self.memo[uid])
        pending = self.pending.get(uid)
        if pending is None:
            started = self.clock.now_ms()
            try:
                target = self.runtime.resolve_function(function)
                if data is not None and not isinstance(data, dict):
                    raise UserError("invoke data must be a JSON object")
                payload = to_json_value(data or {}, "invoke data")
                expires = None if timeout is None else started + parse_duration(timeout)
            except FunctionNotFound as exc:
                # As Inngest resolves it: `{name: "Error", message}`, no stack, no retry.
                return await self.step_failed(
                    uid, FinalReportedError(stored_error("Error", exc.message)), started,
                    kind="invoke")
            except (UserError, TypeError, ValueError) as exc:
                message = exc.message if isinstance(exc, UserError) else str(exc)
                return await self.step_failed(uid, NonRetriableError(message), started,
                                              kind="invoke")
            child_id = new_ulid()
            payload[INNGEST_DATA_KEY] = invoke_metadata(
                source_app_id=self.function.app_id, source_fn_id=self.function.id,
                target_fn_id=target.id, correlation_id=f"{self.run_id}.{_hashed(uid)}",
                expires_at=expires, name=uid)
            event = NewEvent(
                internal_id=new_ulid(), name=INVOKED_EVENT, event_id=None, ts=started,
                data=dump_json(payload), v=None, user=None, meta=None,
                sessions=dict(self.sessions), runs=(NewRun(child_id, target.id),),
                source=self.run_id)
            record = StepAttempt(0, uid, "invoke", 0, WAITING, started, started, None, None,
                                 final=False, wait_until=expires,
                                 detail={"function_id": target.id, "run_id": child_id})
            try:
                created = await self.store.invoke(self.env, started, event, self.run_id, record,
                                                  WaitSpec(child_run_id=child_id),
                                                  self.runtime.max_tree_runs)
            except RunTreeTooLarge as exc:
                return await self.step_failed(uid, NonRetriableError(str(exc)), started,
                                              kind="invoke")
            self._check_live(created is not None)
            assert created is not None
            self.pending[uid] = pending = record
            await self.runtime.after_ingest(self.env, [event], created)
        return await self._settle_invoke(pending)

    async def _settle_invoke(self, pending: StepAttempt) -> Any:
        child = await self.store.run(str(pending.detail["run_id"]))
        if child is not None and child.status in FINISHED:
            if child.status == COMPLETED:
                return (await self._resolve(pending, COMPLETED, output=child.output)).output
            error = child.error or stored_error(
                "FunctionCancelledError", f"invoked run {child.run_id} was {CANCELLED}")
            raise step_error(await self._resolve(pending, FAILED, error=error))
        if pending.wait_until is not None and self.clock.now_ms() >= pending.wait_until:
            # Inngest's own words, which the SDKs raise as-is (`step.invoke` callers match
            # on the name).
            error = stored_error(INVOKE_TIMEOUT_NAME, INVOKE_TIMEOUT_MESSAGE)
            raise step_error(await self._resolve(pending, FAILED, error=error))
        raise Reschedule(pending.wait_until)


def _hashed(uid: str) -> str:
    """A step id as the SDKs hash it (the SHA-1 of the user's id), for correlation ids."""
    if re.fullmatch(r"[0-9a-f]{40}", uid):
        return uid
    return hashlib.sha1(uid.encode("utf-8"), usedforsecurity=False).hexdigest()
