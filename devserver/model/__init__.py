"""Pure logic, with no I/O: event validation, expressions, triggers, the retry schedule, the
function registry, lifecycle events, stored records and fixture lines.

Nothing here imports aiohttp, sqlite3 or aiosqlite (a test checks it), so all of it is tested
with plain values. It imports nothing of devserver's but the small shared modules at the top
of the package (`errors`, `clock`, `ids`, `jsontext`, `app`).
"""
