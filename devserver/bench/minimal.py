"""The reference side of the batched-ingest benchmark: what storing the same rows costs with a
minimal SQLite schema and no other work.

    python -m devserver.bench.minimal PORT DB

An aiohttp handler that parses `POST /e/{key}` and, in one transaction per request, inserts
each event, upserts each of its sessions (count and last activity) and indexes the event under
them: the rows devserver's store keeps for an event, with none of its validation, runs,
environments or notifications. Same PRAGMAs as devserver's store (WAL, synchronous NORMAL), so
a commit is as durable; the reply comes after the commit.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

from aiohttp import web

from devserver.ids import new_ulid

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    internal_id TEXT PRIMARY KEY, name TEXT NOT NULL, ts INTEGER NOT NULL,
    data TEXT NOT NULL, sessions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    identifier TEXT NOT NULL, value TEXT NOT NULL, events INTEGER NOT NULL,
    last_active INTEGER NOT NULL, PRIMARY KEY (identifier, value)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_sessions (
    identifier TEXT NOT NULL, value TEXT NOT NULL, internal_id TEXT NOT NULL,
    PRIMARY KEY (identifier, value, internal_id)) WITHOUT ROWID;
"""

DB = web.AppKey("db", sqlite3.Connection)


async def events(request: web.Request) -> web.Response:
    """Store the body's events in one transaction, then answer like the event API."""
    body = json.loads(await request.read())
    batch = body if isinstance(body, list) else [body]
    now = int(time.time() * 1000)
    db = request.app[DB]
    ids = []
    rows, upserts, index = [], [], []
    for ev in batch:
        internal_id = new_ulid()
        ids.append(internal_id)
        sessions = {str(k): str(v) for k, v in (ev.get("sessions") or {}).items()}
        rows.append((internal_id, ev["name"], now, json.dumps(ev.get("data") or {}),
                     json.dumps(sessions)))
        for identifier, value in sessions.items():
            upserts.append((identifier, value, now))
            index.append((identifier, value, internal_id))
    with db:
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", rows)
        db.executemany(
            "INSERT INTO sessions VALUES (?, ?, 1, ?) ON CONFLICT (identifier, value) DO UPDATE"
            " SET events = events + 1, last_active = excluded.last_active", upserts)
        db.executemany("INSERT INTO event_sessions VALUES (?, ?, ?)", index)
    return web.json_response({"ids": ids, "status": 200})


async def health(request: web.Request) -> web.Response:
    """Liveness."""
    return web.json_response({"status": 200, "message": "OK"})


def main() -> None:
    """Serve on 127.0.0.1:PORT, storing into DB."""
    db = sqlite3.connect(Path(sys.argv[2]), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.executescript(SCHEMA)
    db.isolation_level = "DEFERRED"
    app = web.Application()
    app[DB] = db
    app.router.add_post("/e/{key}", events)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
