"""A session's timeline (SPEC 5): every run of every function on one time axis, the step
attempts inside each run, and cause → effect (the event that started a run, the run that sent
that event or invoked it, the events a run sent and the runs those started).

`timeline_doc` builds the document the session page draws and its JSON twin returns; the page
draws it as server-rendered SVG bars (no script), positions already computed here on a 0 to 1000
scale so the template only places them.
"""

from __future__ import annotations

from typing import Any

from devserver.clock import iso
from devserver.model.records import UNFINISHED
from devserver.store.listing import MAX_TIMELINE_RUNS, Timeline

SCALE = 1000
"""The width of the axis, in the SVG's user units."""
TICKS = 5
"""Marks on the time axis, the first at the start and the last at the end."""
MIN_WIDTH = 2.0
"""The narrowest bar drawn (a 1 ms step stays visible)."""


def timeline_doc(timeline: Timeline, now: int) -> dict[str, Any]:
    """The timeline of a session's runs (oldest first), as the page draws it."""
    runs, events = timeline.runs, timeline.events
    if not runs:
        return {"start": None, "end": None, "span_ms": 0, "ticks": [], "runs": [], "events": [],
                "more": False, "max_runs": MAX_TIMELINE_RUNS, "live": False}
    starts = [r.queued_at for r in runs] + [e.received_at for e in events]
    ends = [r.ended_at if r.ended_at is not None else now for r in runs]
    ends += [s.ended_at for s in timeline.steps]
    ends += [s.wait_until for s in timeline.steps if s.wait_until is not None
             and s.status == "Waiting"]
    t0, t1 = min(starts), max([*ends, *starts])
    span = max(t1 - t0, 1)

    def x(at: int) -> float:
        return round((at - t0) / span * SCALE, 2)

    def bar(start: int, end: int) -> dict[str, float]:
        left = x(start)
        return {"x": left, "width": max(round(x(end) - left, 2), MIN_WIDTH)}

    in_timeline = {r.run_id for r in runs}
    by_event: dict[str, list[str]] = {}
    for run in runs:
        by_event.setdefault(run.event_id, []).append(run.run_id)
    event_source = {e.internal_id: e.source for e in events}
    sent: dict[str, list[str]] = {}
    for ev in events:
        if ev.source in in_timeline:
            sent.setdefault(ev.source, []).append(ev.internal_id)
    steps: dict[str, list[dict[str, Any]]] = {}
    for step in timeline.steps:
        end = step.ended_at
        if step.status == "Waiting":
            end = step.wait_until if step.wait_until is not None else now
        steps.setdefault(step.run_id, []).append({
            "step_id": step.step_id, "kind": step.kind, "status": step.status,
            "attempt": step.attempt + 1, "started_at": iso(step.started_at),
            "ended_at": iso(step.ended_at), "wait_until": iso(step.wait_until),
            **bar(step.started_at, max(end, step.started_at))})
    function_of = {r.run_id: r.function_id for r in runs}
    run_docs = []
    for run in runs:
        source = event_source.get(run.event_id)
        end = run.ended_at if run.ended_at is not None else now
        children = [child for ev_id in sent.get(run.run_id, [])
                    for child in by_event.get(ev_id, [])]
        run_docs.append({
            "run_id": run.run_id, "function_id": run.function_id, "status": run.status,
            "event_id": run.event_id, "event_name": run.event_name,
            "queued_at": iso(run.queued_at), "started_at": iso(run.started_at),
            "ended_at": iso(run.ended_at),
            "parent_run_id": source if source in in_timeline else None,
            "parent_function_id": function_of.get(source) if source else None,
            "sent_events": sent.get(run.run_id, []), "child_runs": children,
            "child_functions": [function_of[c] for c in children],
            "steps": steps.get(run.run_id, []), **bar(run.queued_at, max(end, run.queued_at)),
        })
    return {
        "start": iso(t0), "end": iso(t1), "span_ms": t1 - t0, "more": timeline.more,
        # Evenly spaced marks on the axis: ms after the start, and when.
        "ticks": [{"offset_ms": (t1 - t0) * i // (TICKS - 1),
                   "at": iso(t0 + (t1 - t0) * i // (TICKS - 1))} for i in range(TICKS)],
        "max_runs": MAX_TIMELINE_RUNS,
        "live": any(r.status in UNFINISHED for r in runs),
        "runs": run_docs,
        "events": [{"internal_id": e.internal_id, "name": e.name,
                    "received_at": iso(e.received_at), "source": e.source,
                    "runs": by_event.get(e.internal_id, []), "x": x(e.received_at)}
                   for e in events],
    }
