"""The store: all SQL and only SQL. `facade.Store` owns the connections and the batching writer;
`schema` holds the current schema and the migrations that upgrade older files; `queries` holds
every statement and maps rows to the plain records of `devserver.model.records`.

Nothing outside this package imports sqlite3 or aiosqlite (a test checks it).
"""
