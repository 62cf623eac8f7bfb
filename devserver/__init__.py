"""devserver: a local, offline dev server for Inngest-style durable functions, centred on Sessions.

Write functions with `App` and `@app.function(...)`, run them with `python -m devserver --app ...`.
"""

from devserver.app import (
    App,
    Cancel,
    FunctionDef,
    NonRetriableError,
    RetryAfterError,
    StepError,
    TriggerCron,
    TriggerEvent,
)
from devserver.clock import VirtualClock, WallClock
from devserver.context import Context, Event, SyncContext
from devserver.model.flow import (
    Batch,
    Concurrency,
    Debounce,
    Priority,
    RateLimit,
    Singleton,
    Throttle,
    Timeouts,
)

__all__ = [
    "App",
    "Batch",
    "Cancel",
    "Concurrency",
    "Context",
    "Debounce",
    "Event",
    "FunctionDef",
    "NonRetriableError",
    "Priority",
    "RateLimit",
    "RetryAfterError",
    "Singleton",
    "StepError",
    "SyncContext",
    "Throttle",
    "Timeouts",
    "TriggerCron",
    "TriggerEvent",
    "VirtualClock",
    "WallClock",
]
__version__ = "0.1.0"
