"""A session's events are indexed in passes after their commits (`store.session_index`):
readers see every committed event at once, passes index each event exactly once, and what a
crash or a renumbering left unindexed is found and indexed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from devserver.store import ingest, listing, queries, schema, session_counts
from devserver.store.facade import Store
from devserver.store.session_index import index_events, index_runs, session_events

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
    assert db.execute("SELECT count(*) FROM run_sessions").fetchone()[0] == 5 * 2
    assert index_runs(db) is False
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


def store_runs(db: sqlite3.Connection, count: int, sessions: dict[str, str]) -> list[str]:
    """`count` events with a run each, written as a commit writes them; the runs' ids."""
    made = [new_event("a/run", sessions=sessions, runs=1) for _ in range(count)]
    db.execute("BEGIN")
    ingest.ingest(db, "dev", 100, made)
    db.execute("COMMIT")
    return [ev.runs[0].run_id for ev in made]


def session_run_pages(db: sqlite3.Connection, value: str, limit: int) -> list[list[str]]:
    """Every page of a session's runs (newest first), following the cursors."""
    pages, cursor = [], None
    while True:
        page = listing.read_session_runs(db, "dev", "conversation_id", value, status=None,
                                         window=listing.ALL_TIME, limit=limit, cursor=cursor)
        pages.append([run.run_id for run in page.rows])
        cursor = page.next_cursor
        if cursor is None:
            return pages


def test_a_sessions_runs_are_listed_once_whether_indexed_or_not(tmp_path: Path) -> None:
    db = open_file(tmp_path / "db.sqlite3")
    first = store_runs(db, 3, CONV)
    store_runs(db, 2, OTHER)
    assert index_runs(db) is False  # the first five are indexed
    later = store_runs(db, 4, CONV)  # these are not yet
    newest_first = sorted(first + later, reverse=True)
    assert db.execute("SELECT count(*) FROM run_sessions").fetchone()[0] == 3 * 2 + 2
    for limit in (1, 2, 3, 50):  # pages cut across the indexed and unindexed runs alike
        pages = session_run_pages(db, "conv_1", limit)
        assert [r for page in pages for r in page] == newest_first, limit
    session_counts.apply(db)  # as the store's counted reads do first: the figures
    found = queries.read_session(db, "dev", "user_id", "u_1", 50, None)
    assert found is not None
    assert found[0].runs == 7
    assert [run.run_id for run in found[1].rows] == newest_first
    timeline = listing.read_timeline(db, "dev", "conversation_id", "conv_1")
    assert [run.run_id for run in timeline.runs] == sorted(first + later)
    assert index_runs(db) is False
    assert session_run_pages(db, "conv_1", 2) == [newest_first[i:i + 2] for i in range(0, 7, 2)]


def test_sessions_with_a_nul_in_them_are_indexed_whole(tmp_path: Path) -> None:
    """SQLite's JSON functions cut a string at an escaped NUL: such sessions are read in
    Python, so their rows hold the whole value (and do not land in another session's)."""
    db = open_file(tmp_path / "db.sqlite3")
    odd = {"conversation_id": "nul\x00inside"}
    store_events(db, [("a/odd", {"conversation_id": "nul"})])
    runs = store_runs(db, 2, odd)
    assert [r["name"] for r in session_events(db, "dev", "conversation_id", "nul\x00inside")
            ] == ["a/run", "a/run"]
    assert session_run_pages(db, "nul\x00inside", 50) == [sorted(runs, reverse=True)]
    index_events(db)
    index_runs(db)
    assert ("conversation_id", "nul\x00inside") in {
        (r[0], r[1]) for r in db.execute("SELECT identifier, value FROM event_sessions")}
    assert [r[0] for r in db.execute("SELECT run_id FROM run_sessions WHERE value = ?",
                                     ("nul\x00inside",))] == sorted(runs)
    assert [r["name"] for r in session_events(db, "dev", "conversation_id", "nul")
            ] == ["a/odd"]
    assert session_run_pages(db, "nul", 50) == [[]]
