"""The runtime: runs on the clock. `runner` turns events into runs and schedules them (built in
layers: `scheduling`, `intake`, `run_ends`, `execution`), `invocation` holds the durable logic
of one run's steps (built from `steps`, `waits` and `child_runs`), `local` executes local
Python functions (SDK functions have their executor in `devserver.sdk`), plus cron schedules,
app loading, hot reload and the loop watchdog.

It reaches the database only through `devserver.store`, and knows nothing of HTTP.
"""
