"""A session's events are indexed in passes after their commits (`store.session_index`):
readers see every committed event at once, passes index each event exactly once, and what a
crash or a renumbering left unindexed is found and indexed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from devserver.store import ingest, schema
from devserver.store.facade import Store
from devserver.store.session_index import index_events, session_events

from .helpers import eventually
from .test_store import make_v1_database, new_event

CONV = {"conversation_id": "conv_1", "user_id": "u_1"}
OTHER = {"conversation_id": "conv_2"}


def open_file(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    schema.connect_pragmas(db)
    schema.migrate(db)
    return db


def indexed(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
    return [tuple(r) for r in db.execute(
        "SELECT identifier, value, internal_id FROM event_sessions ORDER BY 1, 2, 3")]


def store_events(db: sqlite3.Connection, events: list[tuple[str, dict[str, str]]]) -> list[str]:
    """Events written as a commit writes them (no pass); their ids, in order."""
    made = [new_event(name, sessions=sessions, runs=0) for name, sessions in events]
    db.execute("BEGIN")
    ingest.ingest(db, "dev", 100, made)
    db.execute("COMMIT")
    return [ev.internal_id for ev in made]


def test_passes_index_every_event_once_in_order_and_readers_never_miss_one(
        tmp_path: Path) -> None:
    db = open_file(tmp_path / "db.sqlite3")
    ids = store_events(db, [("a/one", CONV), ("a/two", OTHER), ("a/three", CONV),
                            ("a/four", {}), ("a/five", CONV)])
    mine = [ids[0], ids[2], ids[4]]
    assert indexed(db) == []  # the commit wrote no index rows
    assert [r["internal_id"] for r in session_events(db, "dev", "conversation_id",
                                                     "conv_1")] == mine
    # Passes of two events: each takes the next two, and says whether more remain.
    assert index_events(db, limit=2) is True
    assert [r["internal_id"] for r in session_events(db, "dev", "conversation_id",
                                                     "conv_1")] == mine
    assert index_events(db, limit=2) is True
    assert index_events(db, limit=2) is False
    assert index_events(db) is False  # nothing new: nothing written
    rows = indexed(db)
    assert len(rows) == len(set(rows)) == 3 * 2 + 1
    assert [r["internal_id"] for r in session_events(db, "dev", "user_id", "u_1")] == mine
    assert [r["internal_id"] for r in session_events(db, "dev", "conversation_id", "conv_2")
            ] == [ids[1]]
    # Half indexed, half not: limits and the received-since filter apply to the whole.
    later = store_events(db, [("a/six", CONV), ("a/seven", CONV)])
    got = session_events(db, "dev", "conversation_id", "conv_1", limit=4)
    assert [r["internal_id"] for r in got] == [*mine, later[0]]
    assert session_events(db, "dev", "conversation_id", "conv_1", received_since=101) == []
    assert session_events(db, "prod", "conversation_id", "conv_1") == []


def test_rows_renumbered_under_the_mark_are_indexed_again_without_duplicates(
        tmp_path: Path) -> None:
    db = open_file(tmp_path / "db.sqlite3")
    store_events(db, [("a/one", CONV), ("a/two", CONV)])
    assert index_events(db) is False
    before = indexed(db)
    # What a VACUUM that renumbered the rows would leave: the mark names another event.
    db.execute("UPDATE event_sessions_upto SET internal_id = 'not-that-event'")
    new = store_events(db, [("a/three", CONV)])
    assert index_events(db) is False
    after = indexed(db)
    assert len(after) == len(set(after)) == len(before) + 2
    assert ("conversation_id", "conv_1", new[0]) in after


@pytest.mark.asyncio
async def test_the_server_indexes_after_commits_and_a_closed_file_is_indexed_whole(
        tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = Store(path)
    await store.open()
    try:
        made = [new_event("app/msg", sessions=CONV, runs=1) for _ in range(5)]
        await store.ingest("dev", 10, made)
        got = await store.session_events("dev", "conversation_id", "conv_1")
        assert [ev.internal_id for ev in got] == [ev.internal_id for ev in made]

        async def marked() -> bool:
            with sqlite3.connect(path) as db:
                upto = db.execute("SELECT upto FROM event_sessions_upto").fetchone()[0]
                top = db.execute("SELECT max(rowid) FROM events").fetchone()[0]
            return bool(upto == top)

        await eventually(marked, "a pass shortly after the commit", timeout=5)
        await store.ingest("dev", 11, [new_event("app/msg", sessions=CONV, runs=0)])
    finally:
        await store.close()
    db = open_file(path)
    assert len(indexed(db)) == 6 * 2  # the last event too: close indexed it
    assert index_events(db) is False


@pytest.mark.asyncio
async def test_what_a_crash_left_unindexed_is_read_and_then_indexed_at_open(
        tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    db = open_file(path)
    ids = store_events(db, [("a/one", CONV), ("a/two", CONV)])  # committed, never indexed
    db.close()
    store = Store(path)
    await store.open()
    try:
        got = await store.session_events("dev", "conversation_id", "conv_1")
        assert [ev.internal_id for ev in got] == ids

        async def all_indexed() -> bool:
            with sqlite3.connect(path) as check:
                return bool(check.execute("SELECT count(*) FROM event_sessions").fetchone()[0]
                            == 4)

        await eventually(all_indexed, "the pass at open", timeout=5)
        got = await store.session_events("dev", "conversation_id", "conv_1")
        assert [ev.internal_id for ev in got] == ids  # not twice
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_an_upgraded_file_keeps_its_indexed_events_and_indexes_new_ones(
        tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    make_v1_database(path)
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("INSERT INTO events (internal_id, env, name, ts, received_at, data, sessions) "
                "VALUES ('01J00000000000000000000001', 'dev', 'app/old', 2, 2, '{}', "
                "'{\"conversation_id\":\"conv_1\"}')")
    old.execute("INSERT INTO event_sessions VALUES ('dev', 'conversation_id', 'conv_1', "
                "'01J00000000000000000000001')")
    old.close()
    store = Store(path)
    await store.open()
    try:
        await store.ingest("dev", 10, [new_event("app/new", sessions=CONV, runs=0)])
        got = await store.session_events("dev", "conversation_id", "conv_1")
        assert [ev.name for ev in got] == ["app/old", "app/new"]
    finally:
        await store.close()
    db = open_file(path)
    assert len(indexed(db)) == 1 + 2
