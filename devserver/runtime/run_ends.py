"""How runs end: completed, failed or cancelled, with the events their end emits.

A run's end is one commit: its status and output or error, and the lifecycle events
(`inngest/function.finished`, `.failed`, `.cancelled`) with the `inngest/deferred.schedule`
events of the runs it deferred, stored only when some function or waiting run could use them.
After the commit those events start the functions they trigger (`on_failure` handlers among
them) and a parent waiting on the run (`step.invoke`) is woken. An end the database refused is
kept to write again instead of executing the function again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from devserver.app import INVOKED_EVENT
from devserver.clock import Clock
from devserver.errors import NotFound, StoreUnavailable
from devserver.jsontext import dump_json
from devserver.model.events import IncomingEvent
from devserver.model.lifecycle import lifecycle_events, lifecycle_names
from devserver.model.limits import MAX_TREE_RUNS
from devserver.model.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    UNFINISHED,
    NewEvent,
    RunRecord,
    RunState,
    StepAttempt,
    StoredEvent,
)
from devserver.runtime import runlog
from devserver.runtime.flow import note_cancel
from devserver.runtime.intake import Intake

if TYPE_CHECKING:
    from devserver.store.facade import Store

log = logging.getLogger("devserver.runtime.runner")  # the name operators' filters know


class RunEnds(Intake):
    """The runner's run ends: cancelling, completing and failing runs, and what follows."""

    def __init__(self, store: Store, clock: Clock) -> None:
        super().__init__(store, clock)
        self.dashboard_url: str | None = None
        """The dashboard's base URL once the server is bound: log lines link runs there."""
        self.max_tree_runs = MAX_TREE_RUNS
        """The most runs one tree of runs may hold (`devserver.model.limits`)."""
        self._cancelled: set[str] = set()  # tasks cancelled because their run was cancelled
        # Start times not written yet (see `Execution._invoke`), by run id.
        self._unstarted: dict[str, int] = {}
        # Runs whose end could not be written (the database failed): the write to retry
        # instead of executing the function again.
        self._unwritten_ends: dict[str, Callable[[], Awaitable[None]]] = {}

    async def complete(self, state: RunState, output: Any) -> None:
        """End a run its SDK ran to the end itself (a durable endpoint's, synchronously) as
        if an invocation had: its end recorded with the lifecycle events it emits."""
        await self._finish(state.run, state.events, COMPLETED, output_json=dump_json(output))

    # -- cancelling --------------------------------------------------------------------------

    async def cancel(self, run_id: str, *, reason: str | None = None) -> RunRecord:
        """Cancel a run (no-op if it has ended); returns its record. Unknown → NotFound.
        `reason` (flow control's: a singleton, a timeout) is recorded with the run."""
        self._fresh.pop(run_id, None)
        state = await self.store.run_state(run_id)
        if state is None:
            raise NotFound(f"no run with id {run_id!r}")
        if state.run.status in UNFINISHED:
            self.flow.forget(run_id)
            if reason is not None:
                log.info("run %s of %s %s", run_id, state.run.function_id, reason)
                await note_cancel(self, run_id, reason)
            emitted = self._lifecycle(state.run, state.events, CANCELLED, None, None)
            created = await self.store.finish_run(
                run_id, CANCELLED, self.clock.now_ms(), emitted=emitted)
            if created is not None:
                timer = self._timers.pop(run_id, None)
                if timer is not None:
                    timer.cancel()
                task = self._tasks.get(run_id)
                if task is not None:
                    self._cancelled.add(run_id)
                    task.cancel()
                await self._ended(state.run, emitted, created)
        run = await self.store.run(run_id)
        assert run is not None
        return run

    async def _finish(
        self, run: RunRecord, events: list[StoredEvent], status: str, *,
        output_json: str | None = None, error: dict[str, Any] | None = None,
        attempt: StepAttempt | None = None, emitted: list[NewEvent] | None = None,
        started_at: int | None = None, reason: str | None = None,
        deferred: list[IncomingEvent] | None = None,
    ) -> None:
        if emitted is None:
            emitted = self._lifecycle(run, events, status, output_json, error, reason,
                                      deferred or [])
        if started_at is None:
            started_at = self._unstarted.pop(run.run_id, None)
        try:
            created = await self.store.finish_run(run.run_id, status, self.clock.now_ms(),
                                                  output_json=output_json, error=error,
                                                  attempt=attempt, emitted=emitted,
                                                  started_at=started_at,
                                                  max_tree_runs=self.max_tree_runs,
                                                  sessions=run.sessions)
        except StoreUnavailable:
            # Retried by `_execute`'s reschedule: this write, not the function again.
            self._unwritten_ends[run.run_id] = functools.partial(
                self._finish, run, events, status, output_json=output_json, error=error,
                attempt=attempt, emitted=emitted, started_at=started_at)
            raise
        if created is not None:
            self.flow.forget(run.run_id)
            if status == FAILED:
                runlog.run_failed(run_id=run.run_id, function_id=run.function_id,
                                  sessions=run.sessions, error=error, base_url=self.dashboard_url)
            await self._ended(run, emitted, created)

    async def _ended(self, run: RunRecord, emitted: list[NewEvent], created: list[str]) -> None:
        await self.after_ingest(run.env, emitted, created)
        if run.event_name == INVOKED_EVENT:
            for parent in await self.store.waiting_for_run(run.run_id):
                self.schedule(parent, self.clock.now_ms())

    def _lifecycle(
        self, run: RunRecord, events: list[StoredEvent], status: str, output_json: str | None,
        error: dict[str, Any] | None, reason: str | None = None,
        deferred: list[IncomingEvent] | None = None,
    ) -> list[NewEvent]:
        """The events a run's end emits, prepared to store: its lifecycle events, then the
        `inngest/deferred.schedule` events of the runs it deferred. Only stored when some
        function or waiting run could use them: nothing else reads them."""
        wanted = [name for name in lifecycle_names(status)
                  if (run.env, name) in self._waited or self.registry.triggered_by(name)]
        deferred = [ev for ev in deferred or [] if self.registry.triggered_by(ev.name)]
        if not wanted and not deferred:
            return []
        return self.prepare(
            run.env, lifecycle_events(run, events, status, output_json, error, wanted, reason)
            + deferred,
            self.clock.now_ms(), skip_function=run.function_id, source=run.run_id)
