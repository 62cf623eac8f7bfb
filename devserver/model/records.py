"""The plain records the store takes and returns: events, runs, step attempts, session figures.

No SQL and no I/O here; `store` fills these from rows and the rest of the project reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devserver.model.flow import FlowRequest

from devserver.model.metadata import MetadataUpdate

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "Queued", "Running", "Completed", "Failed", "Cancelled"
)
"""Run statuses."""
UNFINISHED = (QUEUED, RUNNING)
WAITING = "Waiting"
"""Status of a step that waits: a sleep, a wait for an event, an invoked run."""
FINISHED = (COMPLETED, FAILED, CANCELLED)



@dataclass(slots=True)  # not frozen: made on every request, and frozen init is slow
class NewRun:
    """A run to create for an event, unless the event turns out to be a duplicate."""

    run_id: str
    function_id: str


@dataclass(slots=True)  # not frozen: made on every request, and frozen init is slow
class NewEvent:
    """A validated event ready to store; JSON fields are already encoded."""

    internal_id: str
    name: str
    event_id: str | None
    ts: int
    data: str
    v: str | None
    user: str | None
    meta: str | None
    sessions: dict[str, str]
    runs: tuple[NewRun, ...]
    source: str | None = None
    """None for events sent to the event API; else the run (or "cron") that produced it."""
    flow: tuple[FlowRequest, ...] = ()
    """The functions it triggers that have flow control: decided by the store as it stores
    the event (`devserver.model.flow`); `runs` are the others'."""


@dataclass(slots=True)  # not frozen: made on every request, and frozen init is slow
class StoredEvent:
    """An event as stored."""

    internal_id: str
    env: str
    name: str
    event_id: str | None
    ts: int
    received_at: int
    data: dict[str, Any]
    v: Any
    user: Any
    meta: Any
    sessions: dict[str, str]
    duplicate: bool
    source: str | None = None
    """None for events sent to the event API; else the run (or "cron") that produced it."""


@dataclass(slots=True)  # not frozen: made on every request, and frozen init is slow
class RunRecord:
    """A run's row."""

    run_id: str
    env: str
    function_id: str
    event_id: str
    event_name: str
    status: str
    attempt: int
    queued_at: int
    started_at: int | None
    ended_at: int | None
    next_at: int | None
    output: Any
    error: dict[str, Any] | None
    sessions: dict[str, str]


@dataclass(frozen=True, slots=True)
class StepAttempt:
    """One attempt of a step (`kind` "run"), or a function-level attempt (`kind` "function")."""

    seq: int
    step_id: str | None
    kind: str
    attempt: int
    status: str
    started_at: int
    ended_at: int
    output: Any
    error: dict[str, Any] | None
    final: bool
    wait_until: int | None = None
    """For a waiting step: when it wakes (sleep end, wait timeout); None waits for good."""
    detail: Any = None
    """For a waiting step: what it waits for, as shown on the run page."""


@dataclass(frozen=True, slots=True)
class RunState:
    """What executing a run needs: its row, its events and its memoized steps."""

    run: RunRecord
    events: list[StoredEvent]
    memo: dict[str, StepAttempt]
    """Final outcome of each finished step, by step id."""
    pending: dict[str, StepAttempt] = field(default_factory=dict)
    """Steps waiting (sleep, event, invoke), by step id."""
    tries: dict[str, int] = field(default_factory=dict)
    """Failed attempts of each step that has not finished, by step id."""


@dataclass(frozen=True, slots=True)
class RunDetail:
    """A run with everything the run page shows."""

    run: RunRecord
    events: list[StoredEvent]
    steps: list[StepAttempt]
    emitted: list[str] = field(default_factory=list)
    """Ids of the events the run produced (send_event steps, its end's lifecycle events)."""
    metadata: list[MetadataUpdate] = field(default_factory=list)
    """Metadata an SDK attached to the run or its steps, in arrival order."""


@dataclass(frozen=True, slots=True)
class SessionStats:
    """The SPEC 2.3 figures of one session."""

    identifier: str
    value: str
    runs: int
    failed_runs: int
    last_active: int
    functions: list[str] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        """failed_runs / runs, 0 when there are no runs."""
        return self.failed_runs / self.runs if self.runs else 0.0


@dataclass(frozen=True, slots=True)
class IdentifierSummary:
    """One session identifier and how many values it has."""

    identifier: str
    sessions: int
    last_active: int


@dataclass(frozen=True, slots=True)
class EnvironmentSummary:
    """An environment that has data."""

    env: str
    events: int
    last_active: int


@dataclass(frozen=True, slots=True)
class Page:
    """A page of rows and the cursor of the next page (None on the last page)."""

    rows: list[Any]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class WaitSpec:
    """What a waiting step waits for, so the runtime knows whom to wake."""

    event_name: str | None = None
    child_run_id: str | None = None


def event_dict(ev: StoredEvent) -> dict[str, Any]:
    """An event as functions, expressions and lifecycle events see it."""
    return {"name": ev.name, "data": ev.data, "id": ev.event_id or "", "ts": ev.ts,
            "v": ev.v, "user": ev.user or {}, "sessions": ev.sessions,
            "internal_id": ev.internal_id}


def inngest_event(doc: dict[str, Any]) -> dict[str, Any]:
    """An event (as `event_dict` gives it) in Inngest's wire shape, which the SDKs validate:
    `ts` an integer, `id` a string (the sender's id, else ours: never empty), sessions under
    `meta.sessions`."""
    out: dict[str, Any] = {
        "name": doc["name"], "data": doc.get("data") or {},
        "id": doc.get("id") or doc.get("internal_id") or "",
        "ts": int(doc.get("ts") or 0), "user": doc.get("user") or {},
    }
    if doc.get("v") is not None:
        out["v"] = doc["v"]
    if doc.get("sessions"):
        out["meta"] = {"sessions": dict(doc["sessions"])}
    return out


def format_percent(rate: float) -> str:
    """A failure rate (a fraction) as a percent: `0%`, `<0.1%`, `33.3%`, `>99.9%`, `100%`."""
    percent = rate * 100
    if percent in (0, 100) or 0.1 <= percent <= 99.9:
        return f"{percent:.1f}".rstrip("0").rstrip(".") + "%"
    return "<0.1%" if percent < 0.1 else ">99.9%"
