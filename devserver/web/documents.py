"""The JSON documents: plain functions (`*_doc`) from stored records to the dicts the JSON API
returns and the dashboard renders, so a page and its `/api` twin show the same data (the
terminal report prints `run_detail_doc` too). Times are ISO strings (`clock.iso`), attempts
1-based.
"""

from __future__ import annotations

from typing import Any

from devserver.clock import iso
from devserver.model.records import (
    FAILED,
    UNFINISHED,
    RunDetail,
    RunRecord,
    SessionStats,
    StepAttempt,
    StoredEvent,
)


def stats_doc(stats: SessionStats) -> dict[str, Any]:
    """The SPEC 2.3 figures of a session."""
    return {
        "runs": stats.runs,
        "failed_runs": stats.failed_runs,
        "failure_rate": stats.failure_rate,
        "last_active": iso(stats.last_active),
        "functions": stats.functions,
    }


def event_doc(ev: StoredEvent) -> dict[str, Any]:
    """An event in the JSON API."""
    return {
        "internal_id": ev.internal_id,
        "id": ev.event_id,
        "name": ev.name,
        "data": ev.data,
        "ts": ev.ts,
        "v": ev.v,
        "user": ev.user,
        "sessions": ev.sessions,
        "received_at": iso(ev.received_at),
        "duplicate": ev.duplicate,
        "source": ev.source,
    }


def _duration_ms(run: RunRecord) -> int | None:
    if run.started_at is None or run.ended_at is None:
        return None
    return run.ended_at - run.started_at


def run_summary_doc(run: RunRecord) -> dict[str, Any]:
    """A run as listed on a session's page."""
    return {
        "run_id": run.run_id,
        "function_id": run.function_id,
        "status": run.status,
        "event_id": run.event_id,
        "event_name": run.event_name,
        "queued_at": iso(run.queued_at),
        "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at),
        "duration_ms": _duration_ms(run),
    }


def step_doc(step: StepAttempt) -> dict[str, Any]:
    """One attempt of a step (or of the function, outside steps)."""
    return {
        "step_id": step.step_id,
        "kind": step.kind,
        "attempt": step.attempt + 1,  # 1-based everywhere people read it
        "status": step.status,
        "started_at": iso(step.started_at),
        "ended_at": iso(step.ended_at),
        "duration_ms": step.ended_at - step.started_at,
        "output": step.output,
        "error": step.error,
        "final": step.final,
        # A waiting step: when it wakes (None: never by itself) and what it waits for.
        "wait_until": iso(step.wait_until),
        "detail": step.detail,
    }


def run_detail_doc(detail: RunDetail) -> dict[str, Any]:
    """Everything the run page shows."""
    run = detail.run
    live = run.status in UNFINISHED
    last = detail.steps[-1] if detail.steps else None
    retrying = (live and last is not None and last.status == FAILED and not last.final)
    return {
        **run_summary_doc(run),
        "env": run.env,
        # The most attempts any step (or the function) has had, 1-based, counting the one
        # a live run is on or will retry with.
        "attempt": max([step.attempt + 1 for step in detail.steps]
                       + [run.attempt + 1 if live else 1]),
        "next_at": iso(run.next_at),
        # When a failed attempt is retried (None: no retry pending).
        "retry_at": iso(run.next_at) if retrying else None,
        "sessions": run.sessions,
        "output": run.output,
        "error": run.error,
        "events": [event_doc(ev) for ev in detail.events],
        "steps": [step_doc(step) for step in detail.steps],
        "emitted_events": detail.emitted,
        "metadata": [update.doc() for update in detail.metadata],
    }


def inngest_run_doc(run: RunRecord) -> dict[str, Any]:
    """A run in the shape of Inngest's REST API (`/v1/runs/{id}`)."""
    return {
        "run_id": run.run_id,
        "run_started_at": iso(run.started_at),
        "function_id": run.function_id,
        "function_version": 1,
        "environment_id": run.env,
        "event_id": run.event_id,
        "status": run.status,
        "ended_at": iso(run.ended_at),
        "output": run.output if run.error is None else run.error,
    }
