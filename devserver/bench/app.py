"""The app the end-to-end and memory benchmarks run: one trivial async function."""

from __future__ import annotations

from devserver.app import App
from devserver.context import Context

app = App("bench")


@app.function(trigger="bench/e2e", retries=0)
async def trivial(ctx: Context) -> int:
    """Does nothing worth measuring, so the benchmark measures devserver."""
    return len(ctx.event.data)
