"""Flow control (SPEC 3.3): a function's options, validated (`options`), and the decisions they
make (`decisions`), as pure logic. The store gives the decisions their state, in the same
transaction as the events they are about (`devserver.store.flow_queries`); the runtime acts on
them on the clock (`devserver.runtime.flow`). Everything is importable from here.
"""

from devserver.model.expressions import Expression
from devserver.model.flow.decisions import (
    BATCH,
    BATCHED,
    DEBOUNCE,
    DEBOUNCED,
    IDEMPOTENCY_MS,
    IDEMPOTENT_DROPPED,
    PRIORITY_MAX_S,
    RATE_LIMITED,
    SINGLETON_CANCELLED,
    SINGLETON_SKIPPED,
    STARTED,
    THROTTLED,
    FlowOutcome,
    FlowRequest,
    all_sessions,
    batch_due,
    batch_full,
    concurrency_keys,
    debounce_due,
    event_doc,
    priority_ms,
    rate_allows,
    request,
    shared_sessions,
    throttle_start,
)
from devserver.model.flow.options import (
    MAX_CONCURRENCY_RULES,
    Batch,
    BatchRule,
    Concurrency,
    ConcurrencyRule,
    Debounce,
    DebounceRule,
    Duration,
    FlowConfig,
    Key,
    Priority,
    RateLimit,
    RateRule,
    Singleton,
    SingletonRule,
    Throttle,
    ThrottleRule,
    Timeouts,
    parse_local,
    parse_sdk,
)

__all__ = [
    "BATCH", "BATCHED", "DEBOUNCE", "DEBOUNCED", "IDEMPOTENCY_MS", "IDEMPOTENT_DROPPED",
    "MAX_CONCURRENCY_RULES", "PRIORITY_MAX_S", "RATE_LIMITED", "SINGLETON_CANCELLED",
    "SINGLETON_SKIPPED", "STARTED", "THROTTLED", "Batch", "BatchRule", "Concurrency",
    "ConcurrencyRule", "Debounce", "DebounceRule", "Duration", "Expression", "FlowConfig",
    "FlowOutcome", "FlowRequest", "Key", "Priority", "RateLimit", "RateRule", "Singleton",
    "SingletonRule", "Throttle", "ThrottleRule", "Timeouts", "all_sessions", "batch_due",
    "batch_full", "concurrency_keys", "debounce_due", "event_doc", "parse_local", "parse_sdk",
    "priority_ms", "rate_allows", "request", "shared_sessions", "throttle_start",
]
