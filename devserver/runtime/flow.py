"""Flow control at run time (SPEC 3.3): what the runner does with the store's decisions.

The store decides, as it stores an event, what each function's flow control does with it
(`devserver.store.flow_queries`); after the commit this module acts on the outcomes: it
schedules the runs created (a throttled one at its turn), arms a timer for each pending
debounce and batch (on the clock, in the runner's timers, so `wait_idle` and virtual time
treat them like sleeps) and fires it through one write that creates the run exactly once, and
cancels the run a singleton replaced. At execution it holds runs to their concurrency limits
(a queued run waits, in priority order, for a slot of each of its keys) and cancels runs that
missed their start or finish timeout. Pending work is in the database, so `start` re-arms it
after a restart; queued runs are Queued runs, resumed like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from devserver.app import FunctionDef
from devserver.clock import TimerHandle
from devserver.errors import StoreUnavailable
from devserver.model import flow
from devserver.model.flow import FlowOutcome
from devserver.model.records import QUEUED, UNFINISHED, NewEvent, RunState, event_dict
from devserver.store.flow_queries import CANCELLED_NOTE, QUEUED_NOTE

if TYPE_CHECKING:
    from devserver.runtime.intake import Intake
    from devserver.runtime.runner import Runner

log = logging.getLogger(__name__)

PENDING_PREFIX, DEADLINE_PREFIX = "flow:", "deadline:"
"""Keys of the runner's timers and tasks that are not runs."""
RETRY_MS = 500
"""A pending fire whose write failed is tried again this much later."""


class FlowRuntime:
    """The runner's flow-control state: pending timers, concurrency slots, deadlines."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._pending_fn: dict[str, str] = {}  # pending id -> function id
        self._running: dict[str, set[str]] = {}  # concurrency key -> runs holding a slot
        self._waiting: dict[str, dict[str, int]] = {}  # key -> queued run -> its order
        self._holding: dict[str, list[str]] = {}  # run -> the keys it holds
        self._noted: set[str] = set()  # runs whose queued reason is written
        self._deadlines: dict[str, TimerHandle] = {}

    # -- intake ------------------------------------------------------------------------------

    async def after_ingest(self, env: str, events: list[NewEvent], now: int) -> None:
        """Act on the outcomes the store decided for these (committed) events."""
        for ev in events:
            for run in ev.runs:
                self._arm_start_timeout(run.run_id, run.function_id, now)
            for request in ev.flow:
                outcome, request.outcome = request.outcome, None
                if outcome is not None:
                    await self._act(outcome, request.function_id, now)

    async def _act(self, outcome: FlowOutcome, function_id: str, now: int) -> None:
        runner = self.runner
        if outcome.run_created and outcome.run_id is not None:
            timer = runner._timers.pop(PENDING_PREFIX + outcome.run_id, None)
            if timer is not None:  # a batch that filled up before its timeout
                timer.cancel()
            self._pending_fn.pop(outcome.run_id, None)
            runner.schedule(outcome.run_id, outcome.start_at or now)
            self._arm_start_timeout(outcome.run_id, function_id, now)
        elif outcome.pending_id is not None and outcome.pending_due is not None:
            self._pending_fn[outcome.pending_id] = function_id
            self.arm_pending(outcome.pending_id, outcome.pending_due)
        if outcome.cancel_run is not None:
            await runner.cancel(outcome.cancel_run, reason=(
                f"cancelled by singleton: run {outcome.run_id} replaced it"))

    def arm_pending(self, pending_id: str, due: int) -> None:
        """Fire a pending debounce or batch at `due` (replacing an earlier timer)."""
        runner = self.runner
        key = PENDING_PREFIX + pending_id
        old = runner._timers.pop(key, None)
        if old is not None:
            old.cancel()
        runner._timers[key] = runner.clock.call_at(due, lambda: self._fire_soon(pending_id))
        runner._notify()

    def _fire_soon(self, pending_id: str) -> None:
        runner = self.runner
        key = PENDING_PREFIX + pending_id
        runner._timers.pop(key, None)
        if not runner._started or key in runner._tasks:
            return
        runner.track(key, self._fire(pending_id))

    async def _fire(self, pending_id: str) -> None:
        runner = self.runner
        function_id = self._pending_fn.get(pending_id)
        fn = None if function_id is None else runner.registry.get(function_id)
        now = runner.clock.now_ms()
        try:
            outcome = await runner.store.fire_pending(pending_id, now,
                                                      None if fn is None else fn.flow)
        except StoreUnavailable as exc:
            log.warning("pending %s could not fire: %s; trying again", pending_id, exc.message)
            self.arm_pending(pending_id, now + RETRY_MS)
            return
        if outcome is None:
            self._pending_fn.pop(pending_id, None)
            return
        await self._act(outcome, function_id or "", now)

    async def start(self) -> None:
        """Re-arm every pending debounce and batch in the database (after a restart)."""
        for pending_id, function_id, due in await self.runner.store.pending_flow():
            self._pending_fn[pending_id] = function_id
            self.arm_pending(pending_id, due)

    # -- execution ---------------------------------------------------------------------------

    async def admit(self, state: RunState, fn: FunctionDef) -> bool:
        """Whether a run may execute now: not past a timeout (else it is cancelled) and
        within its concurrency limits (else it waits, Queued, for a slot)."""
        cfg, run, runner = fn.flow, state.run, self.runner
        if cfg is None:
            return True
        now = runner.clock.now_ms()
        if (cfg.start_timeout_ms is not None and run.status == QUEUED
                and now >= run.queued_at + cfg.start_timeout_ms):
            await runner.cancel(run.run_id, reason=(
                f"cancelled by timeouts.start: not started within "
                f"{cfg.start_timeout_ms / 1000:g} s"))
            return False
        if (cfg.finish_timeout_ms is not None and run.started_at is not None
                and now >= run.started_at + cfg.finish_timeout_ms):
            await runner.cancel(run.run_id, reason=(
                f"cancelled by timeouts.finish: not finished within "
                f"{cfg.finish_timeout_ms / 1000:g} s of its start"))
            return False
        if cfg.concurrency:
            doc = event_dict(state.events[0]) if state.events else {}
            keys = flow.concurrency_keys(cfg, fn.id, run.env, doc)
            full = [(key, limit) for key, limit in keys
                    if len(self._running.get(key, ())) >= limit]
            if full:
                order = run.queued_at - flow.priority_ms(cfg, doc)
                for key, _ in full:
                    self._waiting.setdefault(key, {})[run.run_id] = order
                if run.run_id not in self._noted:  # once a process: it also resets
                    # the restarts the run was counted at (it was not executing)
                    self._noted.add(run.run_id)
                    await runner.store.note_run(run.run_id, QUEUED_NOTE, (
                        "waiting for concurrency: " + "; ".join(
                            f"{limit} run(s) of key {key.rsplit(':', 1)[-1]!r} executing"
                            for key, limit in full)), now)
                return False
            for key, _ in keys:
                self._running.setdefault(key, set()).add(run.run_id)
                waiting = self._waiting.get(key)
                if waiting is not None:
                    waiting.pop(run.run_id, None)
            self._holding[run.run_id] = [key for key, _ in keys]
        if cfg.finish_timeout_ms is not None:
            self._arm_deadline(run.run_id, (run.started_at or now) + cfg.finish_timeout_ms)
        return True

    def released(self, run_id: str) -> None:
        """A run's execution ended: free its concurrency slots for the next queued runs."""
        for key in self._holding.pop(run_id, ()):
            holders = self._running.get(key)
            if holders is not None:
                holders.discard(run_id)
            waiting = self._waiting.get(key)
            if waiting:
                best = min(waiting, key=lambda r: (waiting[r], r))
                del waiting[best]
                self.runner.schedule(best, self.runner.clock.now_ms())

    def forget(self, run_id: str) -> None:
        """A run ended (cancelled, finished): it waits for nothing any more."""
        for waiting in self._waiting.values():
            waiting.pop(run_id, None)
        self._noted.discard(run_id)
        timer = self._deadlines.pop(run_id, None)
        if timer is not None:
            timer.cancel()

    # -- timeouts ----------------------------------------------------------------------------

    def _arm_start_timeout(self, run_id: str, function_id: str, now: int) -> None:
        fn = self.runner.registry.get(function_id)
        if fn is not None and fn.flow is not None and fn.flow.start_timeout_ms is not None:
            self._arm_deadline(run_id, now + fn.flow.start_timeout_ms)

    def _arm_deadline(self, run_id: str, when: int) -> None:
        old = self._deadlines.pop(run_id, None)
        if old is not None:
            old.cancel()
        self._deadlines[run_id] = self.runner.clock.call_at(when, self._deadline_cb(run_id))

    def _deadline_cb(self, run_id: str) -> Callable[[], None]:
        def due() -> None:
            self._deadlines.pop(run_id, None)
            if self.runner._started:
                self.runner.track(DEADLINE_PREFIX + run_id, self._check_deadline(run_id))
        return due

    async def _check_deadline(self, run_id: str) -> None:
        runner = self.runner
        state = await runner.store.run_state(run_id)
        if state is None or state.run.status not in UNFINISHED:
            return
        fn = runner.registry.get(state.run.function_id)
        if fn is None or fn.flow is None:
            return
        cfg, run, now = fn.flow, state.run, runner.clock.now_ms()
        if (cfg.start_timeout_ms is not None and run.status == QUEUED
                and now >= run.queued_at + cfg.start_timeout_ms):
            await runner.cancel(run_id, reason=(
                f"cancelled by timeouts.start: not started within "
                f"{cfg.start_timeout_ms / 1000:g} s"))
        elif (cfg.finish_timeout_ms is not None and run.started_at is not None
              and now >= run.started_at + cfg.finish_timeout_ms):
            await runner.cancel(run_id, reason=(
                f"cancelled by timeouts.finish: not finished within "
                f"{cfg.finish_timeout_ms / 1000:g} s of its start"))

    async def close(self) -> None:
        for timer in self._deadlines.values():
            timer.cancel()
        self._deadlines.clear()


async def note_cancel(runner: Intake, run_id: str, reason: str) -> None:
    """Write why a run is being cancelled (before its end is written)."""
    try:
        await runner.store.note_run(run_id, CANCELLED_NOTE, reason, runner.clock.now_ms())
    except StoreUnavailable:
        log.warning("run %s: could not write why it was cancelled (%s)", run_id, reason)

