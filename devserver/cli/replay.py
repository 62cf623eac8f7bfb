"""Fixture files: reading them, replaying them, and exporting a session as one.

Reading and grouping the events is `fixture_files`; sending them to a running server and
following the runs they led to is `sending` (its names are importable from here too).
This module runs them in-process: `run_in_process` runs them against functions on a private
store and a `VirtualClock`, waits for every run to finish and returns per-session figures as a
`Report` (the `report` module owns it: filling one, from a server too for `--url --wait`, and
rendering it). With `timing="original"` the gaps between the events' `ts` values are kept: as
real waits over HTTP (each capped), as virtual time in-process, where runs progress through the
gap as they would have (sleeps end, retries fire, waits time out) before the next event
arrives.

Exporting (`export_events`) keeps only the events users sent: events produced by runs (`send_event`,
lifecycle events) and by cron are left out, because replaying the export runs the functions again
and they produce those events anew. So an export replayed into an empty database gives the session
the same figures.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from devserver.app import FunctionDef
from devserver.cli.fixture_files import batches, first_ts
from devserver.cli.fixture_files import parse_events as parse_events
from devserver.cli.fixture_files import read_all as read_all
from devserver.cli.fixture_files import read_events as read_events
from devserver.cli.fixture_files import timed_groups as timed_groups
from devserver.cli.report import Report, fill_report
from devserver.cli.sending import Progress
from devserver.cli.sending import ReplayError as ReplayError
from devserver.cli.sending import event_endpoint as event_endpoint
from devserver.cli.sending import follow_runs as follow_runs
from devserver.cli.sending import send_to_server as send_to_server
from devserver.clock import VirtualClock
from devserver.errors import UserError
from devserver.model.events import validate_event
from devserver.model.fixtures import export_events as export_events
from devserver.runtime.local import LocalExecutor
from devserver.runtime.runner import DEFAULT_ENV, Runner
from devserver.store.facade import Store
from devserver.web.server import Config

# ---------------------------------------------------------------------------------------------
# Exporting


async def export_session(
    db: str | Path, env: str, identifier: str, value: str,
) -> tuple[list[dict[str, Any]], int]:
    """A session's fixture lines from a database file, and how many events were left out.

    `UserError` when the file is missing or the session unknown (naming the known identifiers).
    """
    path = Path(db)
    if str(db) == ":memory:":
        raise UserError("--db :memory: holds nothing once its server has stopped; "
                        "pass the database file the server used")
    if not await asyncio.to_thread(path.is_file):
        raise UserError(f"no database at {db} (pass the --db the server used)")
    store = Store(path, probe_write=False)  # export only reads: a read-only file is fine
    await store.open()
    try:
        if await store.session(env, identifier, value, limit=1) is None:
            known = [i.identifier for i in await store.identifiers(env)]
            hint = (f"; identifiers there: {', '.join(known[:10])}" if known
                    else "; it has no sessions")
            raise UserError(
                f"no session {identifier}={value!r} in environment {env!r} of {db}{hint}")
        events = await store.session_events(env, identifier, value)
    finally:
        await store.close()
    lines = export_events(events)
    return lines, len(events) - len(lines)


# ---------------------------------------------------------------------------------------------
# Running in-process


async def run_in_process(
    events: list[dict[str, Any]], functions: list[FunctionDef], *, env: str = DEFAULT_ENV,
    timing: str = "fast", retry_interval: float | None = None, db: str | Path = ":memory:",
    timeout: float = 600.0, progress: Progress | None = None,
) -> Report:
    """Run the events against `functions` on a fresh store and a virtual clock; report.

    Waits until no run executes or waits on a timer (virtual time skips every sleep, retry
    backoff and timeout), at most `timeout` seconds of wall time. `db` is `:memory:` (a
    temporary file removed afterwards) or a path to keep.
    """
    groups = timed_groups(events, timing)
    start = first_ts(events) if timing == "original" else None
    clock = VirtualClock(start_ms=start)
    began = clock.now_ms()
    store = Store(db)
    local = LocalExecutor()
    runner = Runner(store, clock, Config(retry_interval=retry_interval).backoff(), local=local)
    runner.register(functions)
    report = Report(events=len(events))
    await store.open()
    try:
        await runner.start()
        try:
            async with asyncio.timeout(timeout):
                done = 0
                for gap_ms, group in groups:
                    if gap_ms:
                        await _advance(runner, clock, clock.now_ms() + gap_ms)
                    for batch in batches(group):
                        await runner.ingest(env, [validate_event(ev, i)
                                                  for i, ev in enumerate(batch)])
                        done += len(batch)
                        if progress is not None:
                            progress(done, len(events))
                await runner.wait_idle()
        except TimeoutError:
            report.timed_out = True
        finally:
            await runner.stop()
            local.close()
        report.virtual_ms = clock.now_ms() - began
        await fill_report(report, store, env)
    finally:
        await store.close()
    return report


async def _advance(runner: Runner, clock: VirtualClock, target: int) -> None:
    """Let virtual time pass up to `target` the way real time would: every timer due by then
    fires in order, and the runs it wakes execute, before the clock moves on."""
    while True:
        await runner.wait_idle(skip_time=False)
        due = clock.next_due()
        if due is None or due > target:
            break
        clock.advance_to(due)
        await asyncio.sleep(0)  # the due timers' callbacks run on the loop's next turn
    clock.advance_to(target)
    await asyncio.sleep(0)
    await runner.wait_idle(skip_time=False)

