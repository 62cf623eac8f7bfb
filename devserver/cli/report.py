"""The summary of a replay: what it holds, how it is gathered, and how the terminal shows it.

A `Report` holds per-session figures (`SessionRow`) and the runs that failed (`FailedRun`). It is
filled from a running server over HTTP (`server_report`, for `replay --url --wait`) or from the
private store of an in-process replay (`fill_report`, for `replay --app`), and rendered as the
command line's per-session table and failed-run list (`print_report`).

`devserver.model.records.format_percent` is the one way a failure rate is written, in the
terminal table and on the dashboard (where it is the `percent` Jinja filter), so both read the
same.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from devserver.model.events import validate_event
from devserver.model.records import FAILED, QUEUED, RUNNING, RunRecord, format_percent
from devserver.store.facade import Store
from devserver.web.documents import run_detail_doc

FAILED_LISTED = 20
"""Failed runs described in a report; the count goes on beyond it."""
VALUE_WIDTH = 40
FUNCTIONS_WIDTH = 400


# ---------------------------------------------------------------------------------------------
# What a report holds


@dataclass
class SessionRow:
    """One session's figures in a report."""

    identifier: str
    value: str
    runs: int
    failed_runs: int
    functions: list[str] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        """failed_runs / runs, 0 without runs."""
        return self.failed_runs / self.runs if self.runs else 0.0


@dataclass
class FailedRun:
    """A failed run in a report."""

    run_id: str
    function_id: str
    event_name: str
    sessions: dict[str, str]
    error: str


@dataclass
class Report:
    """The outcome of a replay: per-session figures and the runs that failed."""

    events: int
    sessions: list[SessionRow] = field(default_factory=list)
    failed: list[FailedRun] = field(default_factory=list)
    failed_total: int = 0
    unfinished: int = 0
    timed_out: bool = False
    virtual_ms: int = 0
    """How far virtual time moved (sleeps, backoff and gaps that took no wall time)."""
    pending: list[str] = field(default_factory=list)
    """What each unfinished run waits for (`describe_pending`), when known."""

    @property
    def ok(self) -> bool:
        """No run failed and everything finished in time."""
        return self.failed_total == 0 and not self.timed_out


def _error_text(error: Any) -> str:
    if not isinstance(error, dict):
        return ""
    text = f"{error.get('name') or 'Error'}: {error.get('message') or ''}".strip()
    if error.get("step_id"):
        text += f" (step {error['step_id']!r})"
    return " ".join(text.split())


def _failed_run(run: RunRecord) -> FailedRun:
    return FailedRun(run.run_id, run.function_id, run.event_name, dict(run.sessions),
                     _error_text(run.error))


def describe_pending(run: dict[str, Any]) -> str:
    """One line on what an unfinished run (a `/api/runs/{id}` document) is waiting for:
    sleeping until T, waiting for event E until T, waiting for invoked run R, retrying at T."""
    head = f"{run.get('function_id')}  run {run.get('run_id')}"
    steps = [s for s in run.get("steps") or [] if isinstance(s, dict)]
    waits = []
    for step in steps:
        if step.get("status") != "Waiting":
            continue
        found = step.get("detail")
        detail: dict[str, Any] = found if isinstance(found, dict) else {}
        until = step.get("wait_until")
        where = f"step {step.get('step_id')!r}"
        if step.get("kind") == "sleep":
            waits.append(f"sleeping until {until} ({where})")
        elif step.get("kind") == "wait_for_event":
            waits.append(f"waiting for event {detail.get('event')!r} until {until} ({where})")
        elif step.get("kind") == "invoke":
            waits.append(f"waiting for invoked run {detail.get('run_id')} of "
                         f"{detail.get('function_id')}"
                         + (f" until {until}" if until else "") + f" ({where})")
    if waits:
        return f"{head}  " + "; ".join(waits)
    last = steps[-1] if steps else None
    if last is not None and last.get("status") == FAILED and not last.get("final"):
        what = "the function" if last.get("step_id") is None else f"step {last['step_id']!r}"
        error = _error_text(last.get("error"))
        return (f"{head}  retrying {what} at {run.get('next_at')} (attempt "
                f"{int(last.get('attempt') or 1)} failed" + (f": {_cell(error, 120)})"
                                                                 if error else ")"))
    if run.get("status") == QUEUED:
        return f"{head}  queued, not started yet"
    return f"{head}  running (attempt {int(run.get('attempt') or 1)})"


def apply_followed(report: Report, runs: dict[str, dict[str, Any]], finished: bool) -> None:
    """Base the report's failed and unfinished runs on the runs a replay led to (`runs`, by id,
    as `/api/runs/{id}` shows them) rather than on everything its sessions hold."""
    failed = [doc for _, doc in sorted(runs.items()) if doc.get("status") == FAILED]
    report.failed_total = len(failed)
    report.failed = [FailedRun(doc["run_id"], doc["function_id"], doc["event_name"],
                               dict(doc.get("sessions") or {}), _error_text(doc.get("error")))
                     for doc in failed[:FAILED_LISTED]]
    unfinished = [doc for _, doc in sorted(runs.items())
                  if doc.get("status") in (QUEUED, RUNNING)]
    report.unfinished = len(unfinished)
    report.pending = [describe_pending(doc) for doc in unfinished]
    report.timed_out = not finished


# ---------------------------------------------------------------------------------------------
# Filling one


async def server_report(
    base_url: str, session: aiohttp.ClientSession, events: list[dict[str, Any]], env: str | None,
) -> Report:
    """The figures of every session the events carry, and their failed runs, read over HTTP."""
    keys: dict[tuple[str, str], None] = {}
    for index, event in enumerate(events):
        for ident, value in validate_event(event, index).sessions.items():
            keys[(ident, value)] = None
    report = Report(events=len(events))
    failed: dict[str, FailedRun] = {}
    unfinished: set[str] = set()
    for ident, value in sorted(keys):
        params = {"identifier": ident, "value": value, "limit": "500"}
        if env is not None:
            params["env"] = env
        async with session.get(f"{base_url}/api/session", params=params) as resp:
            if resp.status != 200:
                continue
            doc = await resp.json()
        stats = doc["stats"]
        report.sessions.append(SessionRow(ident, value, stats["runs"], stats["failed_runs"],
                                list(stats["functions"])))
        for run in doc["runs"]:
            if run["status"] in (QUEUED, RUNNING):
                unfinished.add(run["run_id"])
            if run["status"] == FAILED and run["run_id"] not in failed:
                failed[run["run_id"]] = FailedRun(run["run_id"], run["function_id"],
                                                  run["event_name"], {ident: value}, "")
    for run in list(failed.values())[:FAILED_LISTED]:
        async with session.get(f"{base_url}/api/runs/{urllib.parse.quote(run.run_id)}") as resp:
            if resp.status == 200:
                detail = await resp.json()
                run.sessions = dict(detail.get("sessions") or run.sessions)
                run.error = _error_text(detail.get("error"))
    report.failed_total = len(failed)
    report.failed = list(failed.values())[:FAILED_LISTED]
    report.unfinished = len(unfinished)
    return report


async def fill_report(report: Report, store: Store, env: str) -> None:
    """Add every session of `env` in `store`, its failed runs and its unfinished count."""
    for summary in await store.identifiers(env):
        cursor: str | None = None
        while True:
            page, _ = await store.sessions_page(env, summary.identifier, sort="value",
                                                limit=500, cursor=cursor)
            report.sessions.extend(
                SessionRow(s.identifier, s.value, s.runs, s.failed_runs, list(s.functions))
                for s in page.rows)
            cursor = page.next_cursor
            if cursor is None:
                break
    failed = await store.runs(env, status=FAILED, limit=1000)
    report.failed_total = len(failed)
    report.failed = [_failed_run(run) for run in reversed(failed)][:FAILED_LISTED]
    unfinished = [run for status in (QUEUED, RUNNING)
                  for run in await store.runs(env, status=status, limit=1000)]
    report.unfinished = len(unfinished)
    for run in sorted(unfinished, key=lambda r: r.run_id)[:FAILED_LISTED]:
        detail = await store.run_detail(run.run_id)
        if detail is not None:
            report.pending.append(describe_pending(run_detail_doc(detail)))


# ---------------------------------------------------------------------------------------------
# Rendering


def _cell(text: str, width: int) -> str:
    shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                    for ch in text)
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def pick_rows(rows: list[SessionRow], limit: int) -> tuple[list[SessionRow], int]:
    """At most `limit` rows (0: all), sessions with failed runs first; (rows, rows left out).
    The rows come back sorted by identifier, then value."""
    ordered = sorted(rows, key=lambda r: (r.identifier, r.value))
    if limit <= 0 or len(ordered) <= limit:
        return ordered, 0
    chosen = sorted(ordered, key=lambda r: (r.failed_runs == 0, -r.failed_runs))[:limit]
    return sorted(chosen, key=lambda r: (r.identifier, r.value)), len(ordered) - limit


def format_table(rows: list[SessionRow], limit: int = 100) -> str:
    """The per-session table: identifier, value, runs, failed, failure rate, functions."""
    if not rows:
        return "no sessions: none of the events carried sessions"
    shown, left_out = pick_rows(rows, limit)
    header = ("IDENTIFIER", "VALUE", "RUNS", "FAILED", "RATE", "FUNCTIONS")
    body = [(_cell(r.identifier, VALUE_WIDTH), _cell(r.value, VALUE_WIDTH), str(r.runs),
             str(r.failed_runs), format_percent(r.failure_rate),
             _cell(", ".join(r.functions) or "-", FUNCTIONS_WIDTH)) for r in shown]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = []
    for row in [header, *body]:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                 row[3].rjust(widths[3]), row[4].rjust(widths[4]), row[5]]
        lines.append("  ".join(cells).rstrip())
    if left_out:
        failing = sum(1 for r in rows if r.failed_runs)
        lines.append(f"... {left_out} more sessions not shown ({failing} of {len(rows)} have "
                     "failed runs, listed first); --limit 0 shows every session")
    return "\n".join(lines)


def format_failed(failed: list[FailedRun], total: int) -> str:
    """The failed runs, two lines each: function, run id, trigger and sessions; the error."""
    if not total:
        return ""
    more = "+" if total >= 1000 else ""
    lines = [f"{total}{more} failed run{'s' if total != 1 else ''}:"]
    for run in failed:
        sessions = " ".join(f"{k}={_cell(v, VALUE_WIDTH)}" for k, v in run.sessions.items())
        lines.append(f"  {run.function_id}  run {run.run_id}  on {run.event_name}"
                     + (f"  [{sessions}]" if sessions else ""))
        if run.error:
            lines.append(f"      {_cell(run.error, 200)}")
    if total > len(failed):
        lines.append(f"  ... and {total - len(failed)}{more} more")
    return "\n".join(lines)


def print_report(report: Report, limit: int, note: str | None = None) -> None:
    """Print the summary on stdout: the table, the failed runs, unfinished runs, the result.

    The command line's output (the one place that prints); the tables come from the pure
    `format_table` and `format_failed`.
    """
    print(format_table(report.sessions, limit))
    failed = format_failed(report.failed, report.failed_total)
    if failed:
        print(failed)
    if report.pending:
        print(f"{report.unfinished} run(s) still unfinished:")
        shown = report.pending[:FAILED_LISTED]
        for line in shown:
            print(f"  {line}")
        if report.unfinished > len(shown):
            print(f"  ... and {report.unfinished - len(shown)} more")
    elif report.unfinished:
        print(f"{report.unfinished} run(s) still unfinished (waiting for an event or an "
              "invoked run that never came)")
    if note and (report.failed_total or report.unfinished):
        print(note)  # about the run ids above, so only when some were listed
    print("result: " + ("ok, no run failed" if report.ok else
                        "FAILED" if report.failed_total else "TIMED OUT"))
