"""The app the benchmarks run: one trivial async function (end to end, memory), and the same
behind a batch of up to 100 events and behind a debounce (the flow-control rows)."""

from __future__ import annotations

from devserver.app import App
from devserver.context import Context
from devserver.model.flow import Batch, Debounce

app = App("bench")


@app.function(trigger="bench/e2e", retries=0)
async def trivial(ctx: Context) -> int:
    """Does nothing worth measuring, so the benchmark measures devserver."""
    return len(ctx.event.data)


@app.function(trigger="bench/batched", retries=0,
              batch_events=Batch(max_size=100, timeout="1s"))
async def batched(ctx: Context) -> int:
    """One run for up to 100 events: returns how many it got."""
    return len(ctx.events)


@app.function(trigger="bench/debounced", retries=0,
              debounce=Debounce(period="1s", key="event.data.message"))
async def debounced(ctx: Context) -> int:
    """One run per key, a second after its last event."""
    return len(ctx.events)
