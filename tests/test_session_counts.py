"""Sessions' figures are summed in passes from the deltas commits append
(`store.session_counts`): every reader of them gets exact figures, pending or not; a pass sums
each session's deltas into one change; what a crash left is applied at open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from devserver.model.records import COMPLETED, FAILED
from devserver.store import database, ingest, run_ends, session_counts
from devserver.store.facade import Store

from .test_session_index import open_file
from .test_store import new_event

CONV = {"conversation_id": "conv_1", "user_id": "u_1"}


def figures(db: sqlite3.Connection) -> list[tuple[object, ...]]:
    return [tuple(r) for r in db.execute(
        "SELECT identifier, value, runs, failed_runs, first_seen, last_active FROM sessions "
        "ORDER BY 1, 2")]


def identifier_sums(db: sqlite3.Connection) -> list[tuple[object, ...]]:
    return [tuple(r) for r in db.execute(
        "SELECT identifier, sessions, runs, failed_runs FROM identifiers ORDER BY 1")]


def deltas(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM session_deltas").fetchone()[0])


def test_a_pass_sums_each_sessions_deltas_into_its_figures(tmp_path: Path) -> None:
    db = open_file(tmp_path / "db.sqlite3")
    assert session_counts.apply(db) is False  # nothing pending: nothing written
    made = [new_event("a/one", sessions=CONV, runs=2),
            new_event("a/two", sessions={"conversation_id": "conv_2", "user_id": "u_1"}),
            new_event("a/three", sessions={"conversation_id": "nul\0inside"}, runs=0)]
    db.execute("BEGIN")
    ingest.ingest(db, "dev", 100, made[:2])
    ingest.ingest(db, "dev", 90, made[2:])  # received earlier: an earlier first seen
    run_ids = [run.run_id for ev in made for run in ev.runs]
    run_ends.finish_many(db, [
        run_ends.Finish(run_ids[0], FAILED, 150, None, '{"name": "Error"}', None, []),
        run_ends.Finish(run_ids[1], COMPLETED, 170, "1", None, None, []),
        run_ends.Finish(run_ids[2], FAILED, 160, None, '{"name": "Error"}', None, [])])
    db.execute("COMMIT")
    assert figures(db) == []  # the commits wrote deltas, not figures
    assert deltas(db) == 3
    assert session_counts.pending(db)
    db.execute("BEGIN")
    assert session_counts.apply(db) is True
    db.execute("COMMIT")
    assert not session_counts.pending(db)
    assert figures(db) == [
        ("conversation_id", "conv_1", 2, 1, 100, 170),
        ("conversation_id", "conv_2", 1, 1, 100, 160),
        ("conversation_id", "nul\0inside", 0, 0, 90, 90),
        ("user_id", "u_1", 3, 2, 100, 170),
    ]
    assert identifier_sums(db) == [("conversation_id", 3, 3, 2), ("user_id", 1, 3, 2)]
    # Later deltas add to the figures; first seen stays the earliest.
    db.execute("BEGIN")
    ingest.ingest(db, "dev", 200, [new_event("a/four", sessions=CONV, runs=1)])
    session_counts.apply(db)
    db.execute("COMMIT")
    assert figures(db)[0] == ("conversation_id", "conv_1", 3, 1, 100, 200)
    assert identifier_sums(db) == [("conversation_id", 3, 4, 2), ("user_id", 1, 4, 2)]


@pytest.mark.asyncio
async def test_readers_get_exact_figures_while_deltas_wait_for_a_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "INDEX_EVERY", 3600.0)  # no timed pass during the test
    path = tmp_path / "db.sqlite3"
    store = Store(path)
    await store.open()
    try:
        created = await store.ingest("dev", 100, [new_event("a/one", sessions=CONV, runs=2)])
        assert await store.start_run(created[0], 110)
        await store.finish_run(created[0], FAILED, 120, error={"name": "Error"})
        await store.rerun(created[0], "01RERUN0000000000000000000", 130)
        side = sqlite3.connect(path)
        assert deltas(side) == 4  # ingest, start, end and rerun: all pending
        found = await store.session("dev", "conversation_id", "conv_1")
        assert found is not None
        stats, page = found
        assert (stats.runs, stats.failed_runs, stats.last_active) == (3, 1, 120)
        assert len(page.rows) == stats.runs  # figures and rows from one transaction
        assert deltas(side) == 0  # that read applied them through the writer
        # Every counted read sees new deltas at once, each of its own kind.
        await store.ingest("dev", 140, [new_event("a/two", sessions={"user_id": "u_2"})])
        assert [i.identifier for i in await store.identifiers("dev")] == [
            "user_id", "conversation_id"]
        await store.ingest("dev", 150, [new_event("a/three", sessions={"shop_id": "s"})])
        assert await store.identifier_known("dev", "shop_id")
        await store.ingest("dev", 160, [new_event("a/four", sessions={"user_id": "u_2"})])
        figures_ = await store.identifier_figures("dev", ["user_id"])
        assert (figures_["user_id"].runs, figures_["user_id"].failed_runs) == (5, 1)
        await store.ingest("dev", 170, [new_event("a/five", sessions={"user_id": "u_3"})])
        page, _ = await store.sessions_page("dev", "user_id", sort="runs")
        assert [(s.value, s.runs) for s in page.rows] == [("u_1", 3), ("u_2", 2), ("u_3", 1)]
        await store.ingest("dev", 180, [new_event("a/six", sessions={"user_id": "u_3"})])
        found_runs = await store.session_runs("dev", "user_id", "u_3")
        assert found_runs is not None
        assert found_runs[0].runs == 2
        assert deltas(side) == 0
        # At rest (nothing pending), reads take the reader's connection as before.
        assert (await store.session("dev", "user_id", "u_1")) is not None
        side.close()
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_deltas_a_crash_left_are_applied_at_open(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    db = open_file(path)
    db.execute("BEGIN")
    ingest.ingest(db, "dev", 100, [new_event("a/one", sessions=CONV, runs=1)])
    db.execute("COMMIT")  # committed with its deltas, and no pass: as a crash leaves it
    db.close()
    store = Store(path)
    await store.open()
    await store.close()  # the pass at open (or at close) applies them
    db = sqlite3.connect(path)
    assert deltas(db) == 0
    assert figures(db) == [("conversation_id", "conv_1", 1, 0, 100, 100),
                           ("user_id", "u_1", 1, 0, 100, 100)]
