"""SQLite storage: the async API over the database, what the runtime and the web layer call.

All SQL in the project lives in the store: the schema in `tables`, its upgrades in
`migrations`, applied by `schema`; the writes in `ingest`, `steps` and `run_ends`, the reads in
`queries`, flow control's and the dashboard's in `flow_queries` and `listing`; the connections
and the batching writer in `database` (group commit in `batch`, the file's and disk's faults in
`faults`). Callers pass and get plain dataclasses, never cursors. The only statements outside
the query modules are the writer's and reader's own transaction control (BEGIN, COMMIT,
ROLLBACK, SAVEPOINT) and the connections' PRAGMAs.

Every write here returns once it is committed (or hands back the future that resolves then);
every read sees one commit (a snapshot), so figures and rows read together agree.
Per-session figures are counters kept up to date by the writes that change them (run created,
started, finished), so reading them never scans runs.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from typing import Any

from devserver.jsontext import dump_json
from devserver.model.flow import FlowConfig, FlowOutcome
from devserver.model.limits import MAX_TREE_RUNS
from devserver.model.metadata import MetadataUpdate
from devserver.model.records import (
    COMPLETED,
    EnvironmentSummary,
    IdentifierSummary,
    NewEvent,
    Page,
    RunDetail,
    RunRecord,
    RunState,
    SessionStats,
    StepAttempt,
    StoredEvent,
    WaitSpec,
)
from devserver.store import flow_queries, ingest, listing, queries, run_ends, steps
from devserver.store.database import LOCK_WAIT as LOCK_WAIT
from devserver.store.database import Database
from devserver.store.schema import SCHEMA as SCHEMA
from devserver.store.schema import SCHEMA_VERSION as SCHEMA_VERSION


class Store(Database):
    """The database's API: each method one write (committed when it returns) or one read."""

    # -- writes ------------------------------------------------------------------------------

    def ingest(
        self, env: str, received_at: int, events: list[NewEvent],
    ) -> asyncio.Future[list[str]]:
        """Store a request's events atomically and create their runs; resolves to the new
        run ids once committed."""
        return self._write(ingest.Ingest(env, received_at, events))

    async def ingest_once(
        self, env: str, received_at: int, events: list[NewEvent],
    ) -> list[str] | None:
        """`ingest` for a request whose event ids came from an SDK's id seed: None (and
        nothing stored) when its first event is already stored, i.e. the SDK sent it again."""
        return await self._write(lambda db: ingest.ingest_once(db, env, received_at, events))

    async def start_run(self, run_id: str, now: int) -> bool:
        """Mark a queued run Running; False when it was not Queued."""
        return await self.submit_start_run(run_id, now)

    def submit_start_run(self, run_id: str, now: int) -> asyncio.Future[bool]:
        """Queue marking a run Running without waiting for it; later writes commit after it."""
        if self._writer_task is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((functools.partial(steps.start_run, run_id=run_id, now=now),
                                future))
        return future

    async def record_attempt(
        self, run_id: str, attempt: StepAttempt, next_attempt: int, next_at: int | None = None,
    ) -> bool:
        """Store a step or function attempt and the run's next attempt number and wake time.

        False (and nothing stored) when the run has ended meanwhile, e.g. was cancelled.
        """
        return await self._write(
            lambda db: steps.record_attempt(db, run_id, attempt, next_attempt, next_at))

    async def begin_wait(
        self, env: str, run_id: str, step: StepAttempt, wait: WaitSpec | None = None,
    ) -> bool:
        """Store a step that waits (sleep, event, invoke) and the run's wake time."""
        return await self._write(lambda db: steps.begin_wait(db, env, run_id, step, wait))

    async def end_wait(
        self, run_id: str, step_id: str, status: str, now: int, *, output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Complete a waiting step with its result; False if the run has ended."""
        output_json = None if error is not None else dump_json(output)
        error_json = None if error is None else dump_json(error)
        return await self._write(
            lambda db: steps.end_wait(db, run_id, step_id, status, now, output_json, error_json))

    async def send_events(
        self, env: str, now: int, events: list[NewEvent], run_id: str, step: StepAttempt,
        max_tree_runs: int = MAX_TREE_RUNS,
    ) -> list[str] | None:
        """A `send_event` step: its events and its result in one commit (exactly once).

        Returns the runs the events started, or None when the sending run has ended. Raises
        `RunTreeTooLarge` (nothing stored) when the runs would grow the sender's tree of
        runs past `max_tree_runs`.
        """
        return await self._write(
            lambda db: steps.send_events(db, env, now, events, run_id, step, max_tree_runs))

    async def invoke(
        self, env: str, now: int, event: NewEvent, run_id: str, step: StepAttempt,
        wait: WaitSpec, max_tree_runs: int = MAX_TREE_RUNS,
    ) -> list[str] | None:
        """An `invoke` step: the child's event and run, and the parent's wait, in one commit
        (`RunTreeTooLarge` as for `send_events`)."""
        def write(db: sqlite3.Connection) -> list[str] | None:
            if not steps.begin_wait(db, env, run_id, step, wait):
                return None
            created = ingest.ingest(db, env, now, [event])
            ingest.grow_tree(db, run_id, created, max_tree_runs)
            return created

        return await self._write(write)

    async def note_restarts(self, run_ids: list[str]) -> dict[str, int]:
        """At start-up, for runs about to execute at once: one more restart each; returns
        each one's count of restarts without progress."""
        return await self._write(lambda db: steps.note_restarts(db, run_ids))

    async def clear_restarts(self) -> None:
        """At a clean shutdown: the runs it interrupted did not end the process."""
        await self._write(steps.clear_restarts)

    async def finish_run(
        self, run_id: str, status: str, now: int, *, output: Any = None,
        error: dict[str, Any] | None = None, attempt: StepAttempt | None = None,
        emitted: list[NewEvent] | None = None, output_json: str | None = None,
        started_at: int | None = None, max_tree_runs: int = MAX_TREE_RUNS,
        sessions: dict[str, str] | None = None,
    ) -> list[str] | None:
        """Record a run's final status, its last attempt and the events its end emits.

        `output_json` is the output already encoded, if the caller has it; `started_at` the
        run's start when that was never written; `sessions` the run's record's. Returns the
        ids of runs those events started, or None if the run had already ended.
        """
        if status != COMPLETED:
            output_json = None
        elif output_json is None:
            output_json = dump_json(output)
        error_json = None if error is None else dump_json(error)
        return await self._write(run_ends.Finish(
            run_id, status, now, output_json, error_json, attempt, emitted or [], started_at,
            max_tree_runs, sessions))

    async def add_metadata(self, run_id: str, updates: list[MetadataUpdate], now: int) -> bool:
        """Attach metadata an SDK reported to a run; False when there is no such run."""
        return await self._write(lambda db: steps.add_metadata(db, run_id, updates, now))

    async def waiting_for_events(self, env: str, names: list[str]) -> list[str]:
        """Runs with a `wait_for_event` step waiting for one of these event names."""
        return await self._read(lambda db: queries.waiting_for_events(db, env, names))

    async def waiting_for_run(self, child_run_id: str) -> list[str]:
        """Runs with an `invoke` step waiting for this run to end."""
        return await self._read(lambda db: queries.waiting_for_run(db, child_run_id))

    async def events_after(
        self, env: str, name: str, after_internal_id: str, limit: int = 100,
    ) -> list[StoredEvent]:
        """Events called `name` received after the event id boundary, oldest first."""
        return await self._read(
            lambda db: queries.read_events_after(db, env, name, after_internal_id, limit))

    async def run(self, run_id: str) -> RunRecord | None:
        """One run's row."""
        return await self._read(lambda db: queries.read_run(db, run_id))

    async def unfinished_runs_of(
        self, env: str, function_id: str, before_internal_id: str,
    ) -> list[tuple[RunRecord, StoredEvent]]:
        """Unfinished runs of a function created before an event id, with their trigger."""
        return await self._read(lambda db: queries.read_unfinished_runs_of(
            db, env, function_id, before_internal_id))

    # -- flow control (SPEC 3.3) -------------------------------------------------------------

    async def fire_pending(self, pending_id: str, now: int,
                           config: FlowConfig | None) -> FlowOutcome | None:
        """A pending debounce or batch whose time came: its run created, in one commit
        (None when it is gone; a later `pending_due` when it was pushed back)."""
        return await self._write(
            lambda db: flow_queries.fire_pending(db, pending_id, now, config))

    async def note_run(self, run_id: str, kind: str, text: str, now: int) -> None:
        """Say why a run is queued or was cancelled (`flow_queries.QUEUED_NOTE`, ...)."""
        await self._write(lambda db: flow_queries.note_run(db, run_id, kind, text, now))

    async def pending_flow(self) -> list[tuple[str, str, int]]:
        """(id, function id, when due) of every pending debounce and batch."""
        return await self._read(flow_queries.read_pending)

    async def flow_outcomes(self, internal_id: str) -> list[dict[str, Any]]:
        """What each function's flow control did with an event."""
        return await self._read(lambda db: flow_queries.read_outcomes(db, internal_id))

    async def run_notes(self, run_id: str) -> dict[str, str]:
        """Why a run is (was) queued, and why it was cancelled."""
        return await self._read(lambda db: flow_queries.read_notes(db, run_id))

    # -- reads -------------------------------------------------------------------------------

    async def run_state(self, run_id: str) -> RunState | None:
        """A run, its events and its memoized steps, for executing it."""
        return await self._read(lambda db: queries.read_run_state(db, run_id))

    async def run_detail(self, run_id: str) -> RunDetail | None:
        """A run with its events and every attempt of every step."""
        return await self._read(lambda db: queries.read_run_detail(db, run_id))

    async def unfinished_runs(self) -> list[tuple[str, str, int]]:
        """(run_id, function_id, when due) of every Queued or Running run.

        A run with a pending wait (event, invoke) is due at once, so it re-checks what it
        waits for; others are due at their stored wake time (sleep end, retry backoff).
        """
        return await self._read(queries.read_unfinished_runs)

    async def runs(
        self, env: str, *, function_id: str | None = None, status: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs of an environment, newest first, optionally of one function or status."""
        return await self._read(
            lambda db: queries.read_runs(db, env, function_id, status, limit))

    async def waited_event_names(self) -> list[tuple[str, str]]:
        """(env, event name) pairs that some run's `wait_for_event` step waits for."""
        return await self._read(queries.waited_event_names)

    async def event(self, internal_id: str) -> StoredEvent | None:
        """One event by its internal id."""
        return await self._read(lambda db: queries.read_event(db, internal_id))

    async def recent_events(self, limit: int, *, before: str | None = None,
                            after: str | None = None) -> list[StoredEvent]:
        """Received events (all environments), newest first: the latest `limit`, or those
        received before/after the event with internal id `before`/`after`."""
        return await self._read(
            lambda db: queries.read_recent_events(db, limit, before=before, after=after))

    async def event_runs(self, internal_id: str) -> list[RunRecord]:
        """The runs an event started, oldest first."""
        return await self._read(lambda db: queries.read_event_runs(db, internal_id))

    async def runs_of_events(self, internal_ids: list[str]) -> dict[str, list[RunRecord]]:
        """`event_runs` of many events in one read."""
        return await self._read(lambda db: listing.read_runs_of_events(db, internal_ids))

    async def environments(self) -> list[EnvironmentSummary]:
        """Every environment with data, most recently active first."""
        return await self._read(queries.read_environments)

    async def identifiers(self, env: str) -> list[IdentifierSummary]:
        """The session identifiers seen in `env`, most recently active first."""
        return await self._read_counted(lambda db: queries.read_identifiers(db, env))

    async def environments_page(self, *, limit: int = 50, cursor: str | None = None) -> Page:
        """A page of `environments` (rows are `EnvironmentSummary`)."""
        return await self._read(lambda db: queries.read_environments_page(db, limit, cursor))

    async def identifiers_page(self, env: str, *, limit: int = 50,
                               cursor: str | None = None) -> Page:
        """A page of `identifiers` (rows are `IdentifierSummary`)."""
        return await self._read_counted(
            lambda db: queries.read_identifiers_page(db, env, limit, cursor))

    async def identifier_known(self, env: str, identifier: str) -> bool:
        """Whether sessions with this identifier were seen in `env`."""
        return await self._read_counted(
            lambda db: queries.read_identifier_known(db, env, identifier))

    async def session(
        self, env: str, identifier: str, value: str, *, limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[SessionStats, Page] | None:
        """A session's figures and a page of its runs (newest first); None if unknown."""
        return await self._read_counted(
            lambda db: queries.read_session(db, env, identifier, value, limit, cursor))

    async def session_events(self, env: str, identifier: str, value: str) -> list[StoredEvent]:
        """Every event that carried a session, in the order they were received."""
        return await self._read(
            lambda db: queries.read_session_events(db, env, identifier, value))

    # -- the dashboard's lists (store.listing) -----------------------------------------------

    async def runs_page(self, env: str, *, status: str | None = None,
                        function_id: str | None = None, q: str | None = None,
                        window: listing.Window = listing.ALL_TIME, limit: int = 50,
                        cursor: str | None = None) -> Page:
        """A page of every run of `env`, newest first (rows are `RunRecord`)."""
        return await self._read(lambda db: listing.read_runs_page(
            db, env, status=status, function_id=function_id, q=q, window=window, limit=limit,
            cursor=cursor))

    async def events_page(self, env: str, *, q: str | None = None,
                          window: listing.Window = listing.ALL_TIME, limit: int = 50,
                          cursor: str | None = None) -> tuple[Page, dict[str, list[RunRecord]]]:
        """A page of every event of `env`, newest first, and the runs each started."""
        def read(db: sqlite3.Connection) -> tuple[Page, dict[str, list[RunRecord]]]:
            page = listing.read_events_page(db, env, q=q, window=window, limit=limit,
                                            cursor=cursor)
            return page, listing.read_runs_of_events(db, [e.internal_id for e in page.rows])
        return await self._read(read)

    async def function_figures(self, env: str, function_ids: list[str], *, recent: int = 5,
                               window: int = 100) -> dict[str, listing.FunctionFigures]:
        """Each function's latest runs and failures among its `window` latest runs."""
        return await self._read(lambda db: listing.read_function_figures(
            db, env, function_ids, recent, window))

    async def run_links(self, run: RunRecord, *, limit: int = 200) -> listing.RunLinks:
        """The run that started `run`, its reruns and the runs it started."""
        return await self._read(lambda db: listing.read_run_links(db, run, limit))

    async def rerun(self, run_id: str, new_run_id: str, now: int) -> RunRecord | None:
        """Create a rerun of `run_id` (Queued); None if there is no such run."""
        return await self._write(lambda db: listing.rerun(db, run_id, new_run_id, now))

    async def identifier_figures(self, env: str, identifiers: list[str],
                                 ) -> dict[str, listing.IdentifierFigures]:
        """Failure figures of each identifier."""
        return await self._read_counted(
            lambda db: listing.read_identifier_figures(db, env, identifiers))

    async def sessions_page(
        self, env: str, identifier: str, *, q: str | None = None, sort: str = "last_active",
        failing: bool = False, window: listing.Window = listing.ALL_TIME, limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[Page, dict[str, RunRecord]]:
        """A page of an identifier's sessions and the latest failed run of each."""
        def read(db: sqlite3.Connection) -> tuple[Page, dict[str, RunRecord]]:
            page = listing.read_sessions_page(db, env, identifier, q=q, sort=sort,
                                              failing=failing, window=window, limit=limit,
                                              cursor=cursor)
            return page, listing.read_latest_errors(
                db, env, identifier, [s.value for s in page.rows if s.failed_runs])
        return await self._read_counted(read)

    async def session_runs(
        self, env: str, identifier: str, value: str, *, status: str | None = None,
        window: listing.Window = listing.ALL_TIME, limit: int = 50, cursor: str | None = None,
    ) -> tuple[SessionStats, Page, listing.Timeline] | None:
        """A session's figures, a page of its runs of one status and time range, and its
        timeline, all from one snapshot."""
        def read(db: sqlite3.Connection) -> tuple[SessionStats, Page, listing.Timeline] | None:
            found = queries.read_session(db, env, identifier, value, 1, None)
            if found is None:
                return None
            return found[0], listing.read_session_runs(
                db, env, identifier, value, status=status, window=window, limit=limit,
                cursor=cursor), listing.read_timeline(db, env, identifier, value)
        return await self._read_counted(read)

    async def session_failed_run_ids(self, env: str, identifier: str, value: str, *,
                                     limit: int) -> list[str]:
        """A session's failed runs not rerun yet, oldest first."""
        return await self._read(lambda db: listing.read_session_failed_run_ids(
            db, env, identifier, value, limit))

    def add_log_lines(self, lines: list[tuple[str, int, str, str]]) -> asyncio.Future[None]:
        """Queue `ctx.logger` lines (run id, at, level, message) for the next commit."""
        return self._write(lambda db: listing.add_log_lines(db, lines))

    async def log_lines(self, run_id: str) -> list[listing.LogLine]:
        """A run's stored `ctx.logger` lines."""
        return await self._read(lambda db: listing.read_log_lines(db, run_id))
