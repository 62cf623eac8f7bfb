"""The store on its own: schema migrations and the counters its triggers keep."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from devserver.errors import ConfigError
from devserver.ids import new_ulid
from devserver.model.records import NewEvent, NewRun, StepAttempt
from devserver.store.facade import Store
from devserver.store.schema import SCHEMA_VERSION, seed_runs, statements

from .helpers import eventually

SCHEMA_V1 = (Path(__file__).parent / "schema_v1.sql").read_text()


def make_v1_database(path: Path) -> None:
    """A database as devserver's first schema version left it, with one event in it."""
    db = sqlite3.connect(path, isolation_level=None)
    for statement in statements(SCHEMA_V1):
        db.execute(statement)
    db.execute("INSERT INTO events (internal_id, env, name, ts, received_at, data, sessions) "
               "VALUES ('01J00000000000000000000000', 'dev', 'app/old', 1, 1, '{}', '{}')")
    db.execute("PRAGMA user_version = 1")
    db.close()


@pytest.mark.asyncio
async def test_an_older_database_migrates_on_open_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    make_v1_database(path)
    store = Store(path)
    await store.open()
    try:
        old = await store.event("01J00000000000000000000000")
        assert old is not None
        assert old.name == "app/old"
    finally:
        await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "events_by_name" in indexes
    db.close()


def _shape(path: Path) -> list[tuple[str, str, str, str]]:
    """Every table, index and trigger of a database, with its SQL (whitespace normalised)."""
    db = sqlite3.connect(path)
    try:
        return sorted((kind, name, table, " ".join((sql or "").split())) for kind, name, table, sql
                      in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        db.close()


@pytest.mark.asyncio
async def test_an_upgraded_database_has_exactly_the_shape_of_a_new_one(tmp_path: Path) -> None:
    old, new = tmp_path / "old.sqlite3", tmp_path / "new.sqlite3"
    make_v1_database(old)
    for path in (old, new):
        store = Store(path)
        await store.open()
        await store.close()
    assert _shape(old) == _shape(new)
    assert len(_shape(new)) > 10
    for path in (old, new):
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.close()


@pytest.mark.asyncio
async def test_a_newer_or_foreign_database_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ConfigError, match="newer than this devserver"):
        await Store(newer).open()

    foreign = tmp_path / "foreign.sqlite3"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE mine (x)")
    db.close()
    with pytest.raises(ConfigError, match="not a devserver database"):
        await Store(foreign).open()

    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ConfigError, match="cannot open database"):
        await Store(junk).open()


def new_event(name: str, *, event_id: str | None = None, internal_id: str | None = None,
              sessions: dict[str, str] | None = None, runs: int = 1) -> NewEvent:
    return NewEvent(
        internal_id=internal_id or new_ulid(), name=name, event_id=event_id, ts=1, data="{}",
        v=None, user=None, meta=None, sessions=sessions or {},
        runs=tuple(NewRun(new_ulid(), f"fn-{i}") for i in range(runs)))


@pytest.mark.asyncio
async def test_ingests_sharing_a_commit_are_applied_together_each_with_its_own_result(
        tmp_path: Path) -> None:
    """Concurrent ingests queue before the writer wakes, so they share one batch (applied as
    one `ingest_many`): each still gets its own runs, duplicates across requests are caught,
    counters are right, and one bad ingest fails alone."""
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        taken = new_event("app/first")
        assert len(await store.ingest("dev", 100, [taken])) == 1
        conv = {"conversation_id": "conv_1"}
        results = await asyncio.gather(
            store.ingest("dev", 200, [new_event("app/a", sessions=conv, event_id="key-1")]),
            store.ingest("dev", 201, [new_event("app/b", sessions=conv, runs=2)]),
            # The same event id as the first request of the batch: stored, starts nothing.
            store.ingest("dev", 202, [new_event("app/c", sessions=conv, event_id="key-1")]),
            store.ingest("other", 204, [new_event("app/e", sessions=conv), new_event("app/f")]),
        )
        assert [len(r) for r in results] == [1, 2, 0, 2]
        # An internal id already stored: that request alone fails, the others are stored.
        failing = await asyncio.gather(
            store.ingest("dev", 205, [new_event("app/g")]),
            store.ingest("dev", 206, [new_event("app/h", internal_id=taken.internal_id)]),
            store.ingest("dev", 207, [new_event("app/i", sessions=conv)]),
            return_exceptions=True)
        assert isinstance(failing[1], sqlite3.IntegrityError)
        assert [len(r) for r in (failing[0], failing[2]) if isinstance(r, list)] == [1, 1]

        found = await store.session("dev", "conversation_id", "conv_1")
        assert found is not None
        stats, runs = found
        assert (stats.runs, stats.last_active) == (4, 207)
        assert sorted(stats.functions) == ["fn-0", "fn-1"]
        assert sorted(run.event_name for run in runs.rows) == ["app/a", "app/b", "app/b", "app/i"]
        assert [ev.name for ev in await store.session_events(
            "dev", "conversation_id", "conv_1")] == ["app/a", "app/b", "app/c", "app/i"]
        envs = {e.env: (e.events, e.last_active) for e in await store.environments()}
        assert envs == {"dev": (6, 207), "other": (2, 204)}
        assert [i.sessions for i in await store.identifiers("other")] == [1]
        # A clock that went back between two requests of a batch: last active stays the latest.
        await asyncio.gather(
            store.ingest("dev", 300, [new_event("app/j", sessions=conv)]),
            store.ingest("dev", 250, [new_event("app/k", sessions=conv)]))
        found = await store.session("dev", "conversation_id", "conv_1")
        assert found is not None
        assert found[0].last_active == 300
        kept = await store.event(taken.internal_id)
        assert kept is not None
        assert kept.name == "app/first"
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_migrated_database_counts_new_runs_once(tmp_path: Path) -> None:
    """Version 3 moved a run's count from a trigger to the ingest: an upgraded database must
    count each new run once (not by both, not by neither)."""
    path = tmp_path / "old.sqlite3"
    make_v1_database(path)
    store = Store(path)
    await store.open()
    try:
        conv = {"conversation_id": "conv_9"}
        await store.ingest("dev", 500, [new_event("app/new", sessions=conv, runs=2)])
        await store.ingest("dev", 501, [new_event("app/new", sessions=conv, runs=1)])
        found = await store.session("dev", "conversation_id", "conv_9")
        assert found is not None
        assert found[0].runs == 3
        assert sorted(found[0].functions) == ["fn-0", "fn-1"]
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_seeded_benchmark_database_has_the_figures_of_a_recount(tmp_path: Path) -> None:
    path = tmp_path / "seeded.sqlite3"
    seed_runs(path, runs=700, sessions=50)
    db = sqlite3.connect(path)
    recount = {value: (runs, failed) for value, runs, failed in db.execute(
        "SELECT rs.value, count(*), sum(r.status = 'Failed') FROM run_sessions rs "
        "JOIN runs r ON r.run_id = rs.run_id GROUP BY rs.value")}
    db.close()
    assert len(recount) == 50
    store = Store(path)
    await store.open()
    try:
        for value, (runs, failed) in recount.items():
            found = await store.session("dev", "conversation_id", value)
            assert found is not None
            assert (found[0].runs, found[0].failed_runs) == (runs, failed) == (14, failed)
            assert found[0].functions == ["bench-trivial"]
        assert [i.sessions for i in await store.identifiers("dev")] == [50]
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_run_ends_sharing_a_commit_are_applied_together_each_with_its_own_result(
        tmp_path: Path) -> None:
    """Ends of runs queued together are applied as one `finish_many`: each still reports
    whether it ended the run, a run ends once, the sessions' figures are summed right, and a
    bad end fails alone."""
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        conv, user = {"conversation_id": "c1"}, {"conversation_id": "c1", "user_id": "u1"}
        runs: list[str] = []
        for index, sessions in enumerate([conv, user, user, user, conv]):
            runs += await store.ingest("dev", 100 + index, [new_event("app/e", sessions=sessions)])
        assert await store.start_run(runs[4], 150)
        assert not await store.start_run(runs[4], 151)  # already running
        found = await store.session("dev", "conversation_id", "c1")
        assert found is not None
        assert found[0].last_active == 150  # a start is activity

        failed = {"name": "Error", "message": "boom", "stack": None}
        bad = StepAttempt(0, None, "function", 0, "Failed", 1, 2, object(), None, final=True)
        results = await asyncio.gather(
            store.finish_run(runs[0], "Completed", 200, output={"ok": 1}),
            store.finish_run(runs[1], "Failed", 210, error=failed),
            store.finish_run(runs[1], "Cancelled", 211),  # already ended earlier in the batch
            store.finish_run(runs[2], "Completed", 220, attempt=bad),  # output not JSON
            store.finish_run(runs[3], "Failed", 205, error=failed, started_at=190),
            return_exceptions=True)
        assert results[:3] == [[], [], None]
        assert isinstance(results[3], TypeError)
        assert results[4] == []

        statuses = {run: (await store.run(run)) for run in runs}
        assert [r.status if r else None for r in statuses.values()] == \
            ["Completed", "Failed", "Queued", "Failed", "Running"]
        assert statuses[runs[3]] is not None
        assert (statuses[runs[3]].started_at, statuses[runs[3]].ended_at) == (190, 205)
        conv_stats = await store.session("dev", "conversation_id", "c1")
        user_stats = await store.session("dev", "user_id", "u1")
        assert conv_stats is not None
        assert user_stats is not None
        assert (conv_stats[0].runs, conv_stats[0].failed_runs, conv_stats[0].last_active) == \
            (5, 2, 210)
        assert (user_stats[0].runs, user_stats[0].failed_runs, user_stats[0].last_active) == \
            (3, 2, 210)
        # Ending the rest one at a time takes the single-write path: same figures.
        assert await store.finish_run(runs[2], "Completed", 300) == []
        assert await store.finish_run(runs[4], "Failed", 310, error=failed) == []
        conv_stats = await store.session("dev", "conversation_id", "c1")
        assert conv_stats is not None
        assert (conv_stats[0].failed_runs, conv_stats[0].last_active) == (3, 310)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_run_ended_in_a_batch_is_ended_for_the_writes_queued_after_it(
        tmp_path: Path) -> None:
    """Run ends are grouped only where they follow one another: a write queued after a run's
    end (a cancelled run's next step, its late start) must find the run ended, even when a
    later end in the same batch could have been grouped with it."""
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        conv = {"conversation_id": "c1"}
        cancelled, other = (await store.ingest("dev", 100, [new_event("app/e", sessions=conv)])
                            + await store.ingest("dev", 101, [new_event("app/e", sessions=conv)]))
        step = StepAttempt(0, "send", "send_event", 0, "Completed", 110, 110, {"ids": []}, None,
                           final=True)
        results = await asyncio.gather(
            store.finish_run(cancelled, "Cancelled", 120),
            store.send_events("dev", 121, [new_event("app/sent", sessions=conv)], cancelled,
                              step),
            store.start_run(cancelled, 122),
            store.finish_run(other, "Completed", 123),
        )
        assert results == [[], None, False, []]
        run = await store.run(cancelled)
        assert run is not None
        assert (run.status, run.started_at) == ("Cancelled", None)
        found = await store.session("dev", "conversation_id", "c1")
        assert found is not None
        assert (found[0].runs, found[0].last_active) == (2, 123)
        assert [ev.name for ev in await store.session_events("dev", "conversation_id", "c1")] \
            == ["app/e", "app/e"]
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_commits_are_copied_into_the_database_file_in_the_background(
    tmp_path: Path,
) -> None:
    """The WAL is checkpointed off the writer: committed pages reach the database file
    although the writer's own checkpoint (every 10,000 pages) never came due."""
    path = tmp_path / "ckpt.sqlite3"
    store = Store(path)
    await store.open()
    try:
        before = _size(path)
        for i in range(20):
            await store.ingest("dev", 1000 + i, [
                new_event("app/x", sessions={"conversation_id": f"c{i}_{n}"})
                for n in range(50)])
        # Far below the 10,000 pages of the writer's own checkpoint:
        assert _size(Path(f"{path}-wal")) > 100 * 4096

        async def copied() -> bool:
            return _size(path) > before + 50 * 4096
        await eventually(copied, "the background checkpoint to copy the WAL into the file")
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (1000,)
    finally:
        db.close()


def _size(path: Path) -> int:
    return path.stat().st_size


def test_reads_of_unfinished_runs_take_their_index_not_every_run(tmp_path: Path) -> None:
    """cancel_on's lookup of a function's unfinished runs, the start's recovery and the clean
    stop's reset read the index of unfinished runs, never every run of the file."""
    from devserver.store import queries, schema, steps

    db = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    schema.connect_pragmas(db)
    schema.migrate(db)
    ran: list[str] = []
    db.set_trace_callback(ran.append)
    queries.read_unfinished_runs_of(db, "dev", "fn-0", new_ulid())
    queries.read_unfinished_runs(db)
    steps.clear_restarts(db)
    db.set_trace_callback(None)
    reads = [sql for sql in ran if " runs" in sql and not sql.startswith("SELECT * FROM events")]
    assert len(reads) == 3
    for sql in reads:
        plan = [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
        of_runs = [step for step in plan if step.split()[:2] in (
            ["SCAN", "runs"], ["SCAN", "r"], ["SEARCH", "runs"], ["SEARCH", "r"])]
        assert of_runs, (sql, plan)
        assert all("INDEX runs_unfinished" in step for step in of_runs), (sql, plan)
