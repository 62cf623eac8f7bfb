"""Flow control's decisions (SPEC 3.3), as pure functions of plain values.

Per event, `request` evaluates what the store needs to decide (the keys, the batch `if`); the
functions below take the state the store read (a pending debounce's first event, a throttle
key's theoretical arrival time, a count of recent runs) and say what happens. Order, as Inngest
applies them: idempotency, rate limit, debounce or batch, then singleton and throttle when a
run is created; concurrency and priority when a run is about to execute; timeouts on the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devserver.model.flow.options import (
    BatchRule,
    DebounceRule,
    FlowConfig,
    RateRule,
    ThrottleRule,
)

IDEMPOTENCY_MS = 24 * 3600 * 1000
"""An idempotency key drops repeats for 24 hours."""
PRIORITY_MAX_S = 600
"""A priority expression's result is clamped to +-600 seconds, as in Inngest."""

# What flow control did with one event for one function (the event's page and JSON).
STARTED, THROTTLED, DEBOUNCED, BATCHED = "started", "throttled", "debounced", "batched"
RATE_LIMITED, SINGLETON_SKIPPED, IDEMPOTENT_DROPPED = (
    "rate_limited", "singleton_skipped", "idempotency_duplicate")
SINGLETON_CANCELLED = "singleton_cancelled"
DEBOUNCE, BATCH = "debounce", "batch"
"""The kinds of pending work (a debounce or a batch waiting for its time)."""


# ---------------------------------------------------------------------------------------------
# Per event: what the store needs to decide


@dataclass(slots=True)
class FlowOutcome:
    """What flow control did with an event for one function (set by the store)."""

    action: str
    run_id: str | None = None
    """The run the event started, will start (debounce, batch) or was dropped for."""
    run_created: bool = False
    """Whether `run_id` was created by this write (and is to be scheduled)."""
    start_at: int | None = None
    """When the created run may start (throttle); when pending work is due."""
    pending_id: str | None = None
    pending_due: int | None = None
    cancel_run: str | None = None
    """A run singleton `cancel` replaces: to cancel once the write is committed."""
    detail: str = ""


@dataclass(slots=True)
class FlowRequest:
    """One (event, function) pair under flow control, with its keys evaluated."""

    function_id: str
    run_id: str
    """The id of the run this event would start (or the pending debounce/batch's, if new)."""
    config: FlowConfig
    keys: dict[str, str] = field(default_factory=dict)
    batched: bool = False
    """Whether the event goes into a batch (the function batches and `if` holds)."""
    outcome: FlowOutcome | None = None


def event_doc(name: str, data: Any, event_id: str | None, ts: int, v: Any,
              user: Any) -> dict[str, Any]:
    """An event as CEL expressions see it."""
    return {"name": name, "data": data, "id": event_id or "", "ts": ts, "v": v,
            "user": user or {}}


def request(function_id: str, run_id: str, config: FlowConfig,
            event: Mapping[str, Any]) -> FlowRequest:
    """Evaluate an event's keys for a function's intake decisions."""
    keys: dict[str, str] = {}
    if config.idempotency is not None and (
            config.idempotency.expression is None
            or config.idempotency.expression.value(event=event) is not None):
        # A key that evaluates to nothing (a missing field) drops nothing.
        keys["idempotency"] = config.idempotency.of(event)
    if config.rate_limit is not None:
        keys["rate"] = config.rate_limit.key.of(event)
    if config.debounce is not None:
        keys["debounce"] = config.debounce.key.of(event)
    batched = False
    if config.batch is not None:
        condition = config.batch.condition
        batched = condition is None or condition.matches(event=event)
        if batched:
            keys["batch"] = config.batch.key.of(event)
    if config.singleton is not None:
        keys["singleton"] = config.singleton.key.of(event)
    if config.throttle is not None:
        keys["throttle"] = config.throttle.key.of(event)
    return FlowRequest(function_id, run_id, config, keys, batched)


# ---------------------------------------------------------------------------------------------
# Decisions


def debounce_due(rule: DebounceRule, now: int, first_at: int | None) -> int:
    """When a debounce fires after an event at `now`: `period` later, but no later than
    `timeout` after the first event it holds."""
    due = now + rule.period_ms
    if rule.timeout_ms is not None:
        due = min(due, (now if first_at is None else first_at) + rule.timeout_ms)
    return due


def batch_due(rule: BatchRule, first_at: int) -> int:
    """When a batch that began at `first_at` runs, full or not."""
    return first_at + rule.timeout_ms


def batch_full(rule: BatchRule, size: int) -> bool:
    """Whether a batch of `size` events runs at once."""
    return size >= rule.max_size


def rate_allows(rule: RateRule, recent: int) -> bool:
    """Whether one more run fits, given the runs started in the last `period`."""
    return recent < rule.limit


def throttle_start(rule: ThrottleRule, now: int, tat: int | None) -> tuple[int, int]:
    """(when the run may start, the key's new theoretical arrival time), by GCRA as Inngest
    uses it: `limit + burst` runs may start at once, then one every `period / limit`."""
    interval = rule.period_ms / rule.limit
    tolerance = (rule.limit + rule.burst - 1) * interval
    arrival = float(now if tat is None else max(tat, now))
    start = max(float(now), arrival - tolerance)
    return int(start + 0.5), int(max(arrival, start) + interval + 0.5)


def concurrency_keys(config: FlowConfig, function_id: str, env: str,
                     event: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The (key, limit) pairs a run of this function counts toward while it executes."""
    keys = []
    for rule in config.concurrency:
        if rule.scope == "fn":  # a function's own limits, one per rule
            where = f"fn:{function_id}:{rule.key.source or ''}"
        else:  # shared by every function whose key evaluates the same in the scope
            where = f"env:{env}" if rule.scope == "env" else "account"
        keys.append((f"{where}:{rule.key.of(event)}", rule.limit))
    return keys


def priority_ms(config: FlowConfig, event: Mapping[str, Any]) -> int:
    """How far ahead (ms, negative: behind) a queued run of this event moves."""
    if config.priority is None:
        return 0
    value = config.priority.value(event=event)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(max(-PRIORITY_MAX_S, min(PRIORITY_MAX_S, value)) * 1000)


def shared_sessions(sessions: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The sessions every event of a batch agrees on (`ctx.sessions`, as the TypeScript SDK
    computes it): a key kept only with the same value on all of them."""
    shared: dict[str, str] | None = None
    for own in sessions:
        if shared is None:
            shared = dict(own)
        else:
            shared = {k: v for k, v in shared.items() if own.get(k) == v}
    return dict(sorted((shared or {}).items()))


def all_sessions(sessions: Iterable[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Every (identifier, value) pair of a batch's events: the sessions its run counts in."""
    seen: dict[tuple[str, str], None] = {}
    for own in sessions:
        for pair in own.items():
            seen.setdefault(pair)
    return list(seen)
