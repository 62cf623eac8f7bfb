"""devserver: a local, offline dev server for Inngest-style durable functions, centred on Sessions.

Write functions with `App` and `@app.function(...)`, run them with `python -m devserver --app ...`.
"""

from .functions import App, FunctionDef, NonRetriableError, RetryAfterError, StepError
from .steps import Context, Event

__all__ = [
    "App",
    "Context",
    "Event",
    "FunctionDef",
    "NonRetriableError",
    "RetryAfterError",
    "StepError",
]
__version__ = "0.1.0"
