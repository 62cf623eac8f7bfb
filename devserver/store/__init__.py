"""The store: all SQL and only SQL. `facade.Store` is the async API, over `database` (the
connections and the batching writer; group commit in `batch`, the file's faults in `faults`).
`tables` holds the current schema and `migrations` the upgrades of older files, both applied by
`schema`. The queries are plain functions of a connection: `ingest` (events in), `steps` (a
run's attempts and waits), `run_ends` (a run's end), `queries` (the reads, and the mapping of
rows to the plain records of `devserver.model.records`), `flow_queries` and `listing`.

Nothing outside this package imports sqlite3 or aiosqlite (a test checks it).
"""
