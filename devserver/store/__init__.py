"""The store: all SQL and only SQL. `facade.Store` is the async API, over `database` (the
connections and the batching writer; group commit in `batch`, the file's faults in `faults`);
`schema` holds the current schema and the migrations that upgrade older files; `queries` holds
every statement and maps rows to the plain records of `devserver.model.records`.

Nothing outside this package imports sqlite3 or aiosqlite (a test checks it).
"""
