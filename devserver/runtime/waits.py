"""The steps that wait on the clock or for an event: `sleep`, `sleep_until` and
`wait_for_event`.

A waiting step records what it waits for and raises `Reschedule` to unwind the invocation; when
the run resumes, the step settles itself: a sleep checks the clock, a wait looks for a matching
event received after it began (so a wake-up lost to a crash only delays the run).
"""

from __future__ import annotations

from typing import Any

from devserver.clock import parse_duration, to_ms
from devserver.errors import Reschedule
from devserver.ids import new_ulid
from devserver.model.expressions import compile_expression
from devserver.model.records import COMPLETED, StepAttempt, WaitSpec, event_dict
from devserver.runtime.steps import Steps


class WaitingSteps(Steps):
    """An invocation's sleeps and waits for events."""

    async def sleep_until(self, step_id: str, until: Any) -> None:
        """Durable sleep until a point in time; the wake time survives restarts."""
        await self.sleep_until_step(self.unique_id(step_id), until)

    async def sleep_until_step(self, uid: str, until: Any) -> None:
        """`sleep_until` for a step id that is already unique (SDK steps come that way)."""
        if uid in self.memo:
            return
        pending = self.pending.get(uid)
        if pending is None:
            try:
                when = to_ms(until)
            except ValueError as exc:
                raise TypeError(f"step {uid!r}: {exc}") from None
            pending = await self._wait(uid, "sleep", when, {"until": when})
        await self._settle_sleep(pending)

    async def _settle_sleep(self, pending: StepAttempt) -> None:
        assert pending.wait_until is not None
        if self.clock.now_ms() < pending.wait_until:
            raise Reschedule(pending.wait_until)
        await self._resolve(pending, COMPLETED)

    async def sleep(self, step_id: str, duration: Any) -> None:
        """Durable sleep for a duration (`"2s"`, `"1h30m"`, seconds, a timedelta)."""
        try:
            ms = parse_duration(duration)
        except ValueError as exc:
            raise TypeError(f"step {step_id!r}: {exc}") from None
        await self.sleep_until(step_id, self.clock.now_ms() + ms)

    async def wait_for_event(
        self, step_id: str, event: str, timeout: Any, if_: str | None = None,
        match: str | None = None,
    ) -> dict[str, Any] | None:
        """Wait for an event named `event` received after the wait began; None on timeout.

        `if_` is a CEL condition with `event` (this run's trigger) and `async` (the candidate);
        `match="data.user_id"` is shorthand for `event.data.user_id == async.data.user_id`.
        """
        return await self.wait_for_event_step(self.unique_id(step_id), event, timeout, if_, match)

    async def wait_for_event_step(
        self, uid: str, event: str, timeout: Any, if_: str | None = None,
        match: str | None = None,
    ) -> dict[str, Any] | None:
        """`wait_for_event` for a step id that is already unique (SDK steps come that way)."""
        if uid in self.memo:
            return self.replay(self.memo[uid])  # type: ignore[no-any-return]
        pending = self.pending.get(uid)
        if pending is None:
            if not isinstance(event, str) or not event:
                raise TypeError(f"step {uid!r}: event must be a non-empty event name")
            condition = if_
            if match is not None:
                condition = f"event.{match} == async.{match}"
            if condition is not None:
                compile_expression(condition)  # a bad expression fails here, at the call
            try:
                expires = self.clock.now_ms() + parse_duration(timeout)
            except ValueError as exc:
                raise TypeError(f"step {uid!r}: timeout: {exc}") from None
            detail = {"event": event, "if": condition, "after": new_ulid(),
                      "timeout_at": expires}
            pending = await self._wait(uid, "wait_for_event", expires, detail,
                                       WaitSpec(event_name=event))
        return await self._settle_wait(pending)

    async def _settle_wait(self, pending: StepAttempt) -> dict[str, Any] | None:
        found = await self._find_event(pending.detail)
        if found is not None:
            await self._resolve(pending, COMPLETED, output=found)
            return found
        assert pending.wait_until is not None
        if self.clock.now_ms() < pending.wait_until:
            raise Reschedule(pending.wait_until)
        await self._resolve(pending, COMPLETED, output=None)
        return None

    async def _find_event(self, detail: dict[str, Any]) -> dict[str, Any] | None:
        condition = detail.get("if")
        expression = None if condition is None else compile_expression(condition)
        trigger = event_dict(self.events[0]) if self.events else {}
        after = str(detail["after"])
        while True:
            batch = await self.store.events_after(self.env, detail["event"], after)
            for candidate in batch:
                doc = event_dict(candidate)
                if expression is None or expression.matches(event=trigger, **{"async": doc}):
                    return doc
            if len(batch) < 100:
                return None
            after = batch[-1].internal_id
