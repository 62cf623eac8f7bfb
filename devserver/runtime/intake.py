"""Events in: the runs an event's triggers start, and what else arriving events set off.

`Runner.ingest` stores a request's events with the runs their triggers start, in one commit,
and then (`after_ingest`) schedules those runs, hands flow control its outcomes, wakes runs
waiting for those events and applies `cancel_on`. The events a run's end emits, a step's
`send_event` and a cron's fire come in the same way. Runs just created keep their state here
so their first invocation needn't read it back.
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from devserver.app import CRON_EVENT, CancelTrigger, FunctionDef
from devserver.clock import Clock
from devserver.errors import StoreUnavailable
from devserver.ids import new_ulid
from devserver.jsontext import dump_json
from devserver.model import flow
from devserver.model.events import IncomingEvent
from devserver.model.records import (
    QUEUED,
    NewEvent,
    NewRun,
    RunRecord,
    RunState,
    StoredEvent,
    event_dict,
)
from devserver.model.registry import Registry
from devserver.model.triggers import CronTrigger
from devserver.runtime.scheduling import Scheduling

if TYPE_CHECKING:
    from devserver.store.facade import Store

log = logging.getLogger("devserver.runtime.runner")  # the name operators' filters know

DEFAULT_ENV = "dev"


class Intake(Scheduling):
    """The runner's intake: events stored with the runs they start, then fanned out."""

    def __init__(self, store: Store, clock: Clock) -> None:
        super().__init__(clock)
        self.store = store
        self.registry = Registry()
        self._waited: set[tuple[str, str]] = set()  # (env, event name) some run waits for
        # State of runs just created, so their first invocation needn't read it back.
        self._fresh: dict[str, RunState] = {}

    @property
    def functions(self) -> list[FunctionDef]:
        """Every registered function, in registration order."""
        return self.registry.functions

    def resolve_function(self, ref: object) -> FunctionDef:
        """A registered function from its FunctionDef, its decorated handler or its id."""
        return self.registry.resolve(ref)

    def prepare(
        self, env: str, events: list[IncomingEvent], now: int, *, skip_function: str | None = None,
        source: str | None = None, internal_ids: list[str] | None = None,
    ) -> list[NewEvent]:
        """Give events their ids (new ULIDs unless `internal_ids` are given) and the runs
        their triggers start."""
        prepared = []
        for index, ev in enumerate(events):
            ts = now if ev.ts is None else ev.ts
            matched = self.registry.match_incoming(ev, ts)
            requests: list[flow.FlowRequest] = []
            if any(fn.flow is not None and fn.flow.at_intake for fn in matched):
                doc = flow.event_doc(ev.name, ev.data, ev.id, ts, ev.v, ev.user)
                requests = [flow.request(fn.id, new_ulid(), fn.flow, doc) for fn in matched
                            if fn.flow is not None and fn.flow.at_intake
                            and fn.id != skip_function]
                matched = [fn for fn in matched if fn.flow is None or not fn.flow.at_intake]
            runs = tuple(NewRun(new_ulid(), fn.id) for fn in matched if fn.id != skip_function)
            prepared.append(NewEvent(
                internal_id=new_ulid() if internal_ids is None else internal_ids[index],
                name=ev.name, event_id=ev.id, ts=ts,
                data=dump_json(ev.data), v=None if ev.v is None else dump_json(ev.v),
                user=None if ev.user is None else dump_json(ev.user),
                meta=None if ev.meta is None else dump_json(ev.meta),
                sessions=ev.sessions, runs=runs, source=source, flow=tuple(requests)))
        return prepared

    async def ingest(self, env: str, events: list[IncomingEvent], *,
                     ids: list[str] | None = None) -> list[str]:
        """Store events (all or none) with the runs they start; return their internal ids.

        Returns once everything is committed; the runs are scheduled after the commit.
        With `ids` (one per event, derived from an SDK's `x-inngest-event-id-seed`), a
        request whose events are already stored is a retry: nothing happens and the same
        ids are returned.
        """
        now = self.clock.now_ms()
        prepared = self.prepare(env, events, now, internal_ids=ids)
        if ids is None:
            created: list[str] | None = await self.store.ingest(env, now, prepared)
        else:
            created = await self.store.ingest_once(env, now, prepared)
        if created or (created is not None and (
                self._waited or self.registry.cancels_anything
                or any(ev.flow for ev in prepared))):
            await self.after_ingest(env, prepared, created, incoming=events)
        return [ev.internal_id for ev in prepared]

    async def after_ingest(self, env: str, events: list[NewEvent], created: list[str], *,
                           incoming: list[IncomingEvent] | None = None) -> None:
        """After a commit: schedule the new runs, wake waiting runs, apply `cancel_on`.
        `incoming`: the events as validated, one for each of `events`, when at hand."""
        if not events:  # e.g. the end of a run that emitted nothing
            return
        now = self.clock.now_ms()
        if created:
            self._remember_fresh(env, events, set(created), now, incoming)
        for run_id in created:
            self.schedule(run_id, now)
        await self.flow.after_ingest(env, events, now)
        names = list({ev.name for ev in events if (env, ev.name) in self._waited})
        if names:
            for run_id in await self.store.waiting_for_events(env, names):
                self.schedule(run_id, now)
        for ev in events:
            for fn, cancel in self.registry.cancels(ev.name):
                await self._cancel_matching(env, fn, cancel, ev)

    def _remember_fresh(self, env: str, events: list[NewEvent], created: set[str],
                        now: int, incoming: list[IncomingEvent] | None) -> None:
        for index, ev in enumerate(events):
            runs = [run for run in ev.runs if run.run_id in created]
            if not runs:
                continue
            decoded = incoming[index] if incoming is not None else None
            for position, run in enumerate(runs):
                # Each run its own copy of the event, as each gets its own request on
                # Inngest: what one function does to it is not seen by another.
                if position == 0 and decoded is not None and decoded.decoded:
                    stored = _stored(env, ev, now, decoded.data, decoded.v, decoded.user,
                                     decoded.meta)  # equal to what was stored, decoded
                else:
                    stored = _stored(env, ev, now, json.loads(ev.data), _loads(ev.v),
                                     _loads(ev.user), _loads(ev.meta))
                record = RunRecord(
                    run_id=run.run_id, env=env, function_id=run.function_id,
                    event_id=ev.internal_id, event_name=ev.name, status=QUEUED, attempt=0,
                    queued_at=now, started_at=None, ended_at=None, next_at=now, output=None,
                    error=None, sessions=ev.sessions)
                self._fresh[run.run_id] = RunState(run=record, events=[stored], memo={})

    def note_wait(self, env: str, event_name: str) -> None:
        """A run is about to wait for `event_name`: wake it when one arrives."""
        self._waited.add((env, event_name))

    async def _cancel_matching(
        self, env: str, fn: FunctionDef, cancel: CancelTrigger, ev: NewEvent,
    ) -> None:
        incoming = await self.store.event(ev.internal_id)
        if incoming is None:
            return
        incoming_doc = event_dict(incoming)
        for run, trigger in await self.store.unfinished_runs_of(env, fn.id, ev.internal_id):
            if cancel.condition is None or cancel.condition.matches(
                    event=event_dict(trigger), **{"async": incoming_doc}):
                log.info("run %s of %s cancelled by event %s", run.run_id, fn.id, ev.name)
                await self.cancel(run.run_id)

    async def _fire_cron(self, fn: FunctionDef, cron: CronTrigger, due: int) -> None:
        if not self._started or self.registry.get(fn.id) is not fn:
            return
        runs: tuple[NewRun, ...] = (NewRun(new_ulid(), fn.id),)
        requests: tuple[flow.FlowRequest, ...] = ()
        if fn.flow is not None and fn.flow.at_intake:  # e.g. a singleton cron: no overlap
            runs, requests = (), (flow.request(fn.id, new_ulid(), fn.flow, flow.event_doc(
                CRON_EVENT, {"cron": cron.cron}, None, due, None, None)),)
        event = NewEvent(internal_id=new_ulid(), name=CRON_EVENT, event_id=None, ts=due,
                         data=dump_json({"cron": cron.cron}), v=None, user=None, meta=None,
                         sessions={}, runs=runs, source="cron", flow=requests)
        try:
            created = await self.store.ingest(DEFAULT_ENV, self.clock.now_ms(), [event])
        except StoreUnavailable as exc:
            # The schedule goes on; this fire is lost (a cron only runs for times to come).
            log.warning("cron %r of %s did not fire at %d: %s", cron.cron, fn.id, due,
                        exc.message)
            return
        await self.after_ingest(DEFAULT_ENV, [event], created)

    @abstractmethod
    async def cancel(self, run_id: str, *, reason: str | None = None) -> RunRecord:
        """Cancel a run (`cancel_on` does): the layer above's (`runtime.run_ends`)."""


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _stored(env: str, ev: NewEvent, now: int, data: dict[str, Any], v: Any, user: Any,
            meta: dict[str, Any] | None) -> StoredEvent:
    """`ev` as it reads back from the store, with its JSON fields decoded."""
    return StoredEvent(
        internal_id=ev.internal_id, env=env, name=ev.name, event_id=ev.event_id, ts=ev.ts,
        received_at=now, data=data, v=v, user=user, meta=meta, sessions=ev.sessions,
        duplicate=False, source=ev.source)
