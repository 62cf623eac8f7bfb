"""Database faults (SPEC 8): a locked, read-only, damaged, deleted or full database gives a
clear error and never an acknowledgement of a write that is not on disk.

At start-up each is one line on stderr and exit code 2; while running, the requests that need
a write get 503 (507 for a full disk) in the canonical JSON error shape, naming the cause,
while reads and /health go on answering, and writes succeed again once the cause is gone.
Every case ends by reading the file back after the server stopped: every event acknowledged
with a 200 is there, and nothing else.

Real faults only: a second SQLite connection holding `BEGIN IMMEDIATE`, a tmpfs remounted
read-only (root ignores file modes; a plain chmod otherwise), garbage and truncated files, a
deleted file, a tmpfs of a few MB filled up (mounting needs root, as CI runs: without it
these fail, never skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devserver import App, Context
from devserver.errors import ConfigError, StoreUnavailable
from devserver.store.facade import LOCK_WAIT, Store
from devserver.store.schema import BUSY_TIMEOUT_MS, connect_pragmas, migrate, seed_runs

from .helpers import MakeServer, eventually, get_json, post_events, run_doc
from .procs import ERROR_PREFIX, ERROR_TIMEOUT, Spawn
from .test_store import new_event

BLOCKED = "the event loop has been blocked"
"""What the loop watchdog says when something holds the loop."""


# ---------------------------------------------------------------------------------------------
# Helpers


def stored_ids(path: Path) -> list[str]:
    """The internal ids of the events in a database file (read after the server stopped),
    after SQLite found nothing to repair."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return [row[0] for row in db.execute("SELECT internal_id FROM events")]
    finally:
        db.close()


def create_database(path: Path) -> None:
    """A current devserver database, as the server would create it."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        connect_pragmas(db)
        migrate(db)
    finally:
        db.close()


def event(name: str, size: int = 0) -> dict[str, Any]:
    return {"name": name, "data": {"pad": "x" * size}}


async def post(http: aiohttp.ClientSession, server: Any, body: Any,
               acked: list[str]) -> tuple[int, dict[str, Any]]:
    """POST events; the ids of a 200 go to `acked`."""
    status, doc = await post_events(http, server, body)
    if status == 200:
        assert doc["status"] == 200, doc
        assert len(doc["ids"]) == (len(body) if isinstance(body, list) else 1), doc
        acked.extend(doc["ids"])
    return status, doc


def assert_refused(status: int, doc: dict[str, Any], expected_status: int, *needles: str
                   ) -> None:
    """The event API's canonical error shape, naming the cause."""
    assert status == expected_status, doc
    assert set(doc) == {"ids", "status", "error"}, doc
    assert doc["ids"] == [], doc
    assert doc["status"] == expected_status, doc
    for needle in needles:
        assert needle in doc["error"], doc


def start_fails(spawn: Spawn, db: Path) -> str:
    """Start `python -m devserver --db db`: it must exit 2 with one line on stderr; the line."""
    child = spawn("--port", "0", "--db", str(db))
    code = child.proc.wait(timeout=ERROR_TIMEOUT)
    stderr = child.stderr()
    assert code == 2, (code, stderr, child.stdout_lines)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{ERROR_PREFIX} cannot open database {db}: "), lines
    return lines[0]


@contextlib.contextmanager
def read_only_file(db: Path) -> Iterator[None]:
    """Make a file read-only for this process while the block runs: a chmod, or for root,
    who ignores file modes, an immutable file (`chattr +i`; the test fails where that is not
    possible rather than pass unchecked)."""
    if os.geteuid() != 0:
        db.chmod(0o444)
        yield
        return
    done = subprocess.run(["chattr", "+i", str(db)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot make a file immutable here (chattr +i, as root): "
                    f"{done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems under tmp_path (needs root, as CI runs; the test fails
    where mounting is not permitted rather than pass unchecked); each is unmounted after the
    test."""
    mounted: list[Path] = []

    def mount(size: str = "4m", name: str = "fs") -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs here (the full-disk and read-only tests need "
                        f"root): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        # Lazy: a child that just exited may still hold a file for a moment.
        subprocess.run(["umount", "-l", str(where)], check=False)


def make_read_only(directory: Path, tmpfs_mounted: bool) -> None:
    """Make a directory and its files read-only for this process, for real."""
    if tmpfs_mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
        return
    for child in directory.iterdir():
        child.chmod(0o444)
    directory.chmod(0o555)


@pytest.fixture
def read_only_dir(tmp_path: Path, tmpfs: Callable[..., Path]) -> Iterator[
        tuple[Path, Callable[[], None]]]:
    """A directory to put a database in, and the function that makes it read-only: a tmpfs
    remounted read-only as root (root ignores file modes), a chmod otherwise."""
    if os.geteuid() == 0:
        where = tmpfs("4m", "ro")
        yield where, lambda: make_read_only(where, True)
        return
    where = tmp_path / "ro"
    where.mkdir()
    yield where, lambda: make_read_only(where, False)
    where.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Locked by another process


@pytest.mark.slow  # waits LOCK_WAIT for the lock
@pytest.mark.asyncio
async def test_a_locked_database_refuses_writes_within_a_bound_and_nothing_else_waits(
    make_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    db = tmp_path / "locked.sqlite3"
    server = await make_server(db=db, watchdog_threshold=0.3)
    acked: list[str] = []
    assert (await post(http, server, [event("t/before")] * 3, acked))[0] == 200

    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        posts = [asyncio.create_task(post(http, server, [event(f"t/locked{i}")] * 2, acked))
                 for i in range(5)]
        # While the writes wait for the lock, /health and reads answer at once.
        for _ in range(10):
            asked = loop.time()
            status, health = await get_json(http, server, "/health")
            assert status == 200
            assert health["status"] == 200
            status, _ = await get_json(http, server, "/api/runs")
            assert status == 200
            assert loop.time() - asked < 0.25
        assert not any(task.done() for task in posts), "the writes did not wait for the lock"
        for status, doc in await asyncio.gather(*posts):
            assert_refused(status, doc, 503, "locked by another process", str(db), "retry")
        waited = loop.time() - began
        assert LOCK_WAIT * 0.9 <= waited < LOCK_WAIT + 1.5, waited
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert (await post(http, server, [event("t/after")] * 2, acked))[0] == 200
    assert not [r for r in caplog.records if BLOCKED in r.getMessage()], caplog.text
    refusals = [r for r in caplog.records if "database write failed" in r.getMessage()]
    assert len(refusals) == 1, caplog.text
    assert refusals[0].exc_info is None, caplog.text
    assert any("succeed again" in r.getMessage() for r in caplog.records), caplog.text
    await server.stop()
    assert sorted(stored_ids(db)) == sorted(acked)
    assert len(acked) == 5


@pytest.mark.slow  # devserver children
def test_a_server_process_under_a_lock_answers_503_logs_one_line_and_keeps_what_it_acked(
    spawn: Spawn, tmp_path: Path,
) -> None:
    db = tmp_path / "child.sqlite3"
    child = spawn("--port", "0", "--db", str(db))
    child.wait_banner()
    acked = child.send(event("t/before"), event("t/before"))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(3):
            with ThreadPoolExecutor(1) as pool:
                posted = pool.submit(child.request, "POST", "/e/key", [event("t/locked")])
                status, health = child.request("GET", "/health", timeout=0.5)  # meanwhile
                assert status == 200, health
                assert not posted.done(), "the write did not wait for the lock"
                assert_refused(*posted.result(timeout=LOCK_WAIT + 5), 503,
                               "locked by another process", str(db))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    acked += child.send(event("t/after"))
    assert child.stop() == 0
    stderr = child.stderr()
    assert "Traceback" not in stderr, stderr
    assert BLOCKED not in stderr, stderr
    assert len([line for line in stderr.splitlines() if "database write failed" in line]) == 1
    assert "succeed again" in stderr, stderr

    restarted = spawn("--port", "0", "--db", str(db))
    restarted.wait_banner()
    for event_id in acked:
        assert restarted.get(f"/v1/events/{event_id}")["data"]["internal_id"] == event_id
    assert restarted.stop() == 0
    assert sorted(stored_ids(db)) == sorted(acked)


@pytest.mark.slow  # the end's write waits for the lock, then is retried on the clock
@pytest.mark.asyncio
async def test_a_run_whose_end_could_not_be_written_ends_once_the_lock_is_gone(
    make_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    app = App("gated")
    gate = asyncio.Event()
    calls: list[str] = []

    @app.function(trigger="t/gated", retries=0)
    async def gated(ctx: Context) -> dict[str, Any]:
        calls.append(ctx.run_id)
        await gate.wait()
        return {"done": True}

    db = tmp_path / "gated.sqlite3"
    server = await make_server(app, db=db, watchdog_threshold=0.3)
    acked: list[str] = []
    assert (await post(http, server, event("t/gated"), acked))[0] == 200
    run_id = (await eventually(
        lambda: _running_run(http, server, acked[0]), "the run to be Running"))

    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        gate.set()
        await eventually(
            lambda: _logged(caplog, "database write failed"), "the run's end to be refused")
        doc = await run_doc(http, server, run_id)
        assert doc["status"] == "Running", doc
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    doc = await eventually(lambda: _ended(http, server, run_id), "the run to end")
    assert doc["status"] == "Completed", doc
    assert doc["output"] == {"done": True}, doc
    assert calls == [run_id], "the end's write is retried, not the function"
    assert not [r for r in caplog.records if BLOCKED in r.getMessage()], caplog.text
    assert not [r for r in caplog.records if r.exc_info is not None], caplog.text
    await server.stop()
    assert stored_ids(db) == acked
    check = sqlite3.connect(db)
    try:
        assert check.execute("SELECT status FROM runs WHERE run_id = ?",
                             (run_id,)).fetchone() == ("Completed",)
    finally:
        check.close()


async def _running_run(http: aiohttp.ClientSession, server: Any, event_id: str) -> str | None:
    status, runs = await get_json(http, server, f"/v1/events/{event_id}/runs")
    assert status == 200, runs
    if runs["data"] and runs["data"][0]["status"] == "Running":
        return str(runs["data"][0]["run_id"])
    return None


async def _ended(http: aiohttp.ClientSession, server: Any, run_id: str) -> dict[str, Any]:
    doc = await run_doc(http, server, run_id)
    return doc if doc["status"] != "Running" else {}


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


def test_connections_wait_busy_timeout_ms_for_a_lock(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "pragmas.sqlite3")
    try:
        connect_pragmas(db)
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS
    finally:
        db.close()


@pytest.mark.slow  # a devserver child that waits BUSY_TIMEOUT_MS for the lock
def test_a_database_locked_at_start_exits_2_with_one_line(spawn: Spawn, tmp_path: Path) -> None:
    db = tmp_path / "held.sqlite3"
    create_database(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        line = start_fails(spawn, db)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "locked by another process" in line
    assert f"waited {BUSY_TIMEOUT_MS / 1000:g} s" in line


# ---------------------------------------------------------------------------------------------
# Read-only, damaged


@pytest.mark.slow  # a devserver child
def test_a_read_only_database_file_exits_2_with_one_line(spawn: Spawn, tmp_path: Path) -> None:
    """The file can't be written but its directory can: SQLite opens it read-only, and only
    the probe's write finds out. Root ignores file modes: an immutable file instead."""
    db = tmp_path / "ro-file.sqlite3"
    create_database(db)
    with read_only_file(db):
        assert "it is read-only" in start_fails(spawn, db)


@pytest.mark.asyncio
async def test_a_read_only_file_opened_for_reading_reads_and_refuses_writes_with_503(
    tmp_path: Path,
) -> None:
    """`Store(probe_write=False)` (a reader such as `export`) opens a read-only file; a
    write then fails as the database's fault, naming it, and stores nothing."""
    db = tmp_path / "read-only.sqlite3"
    create_database(db)
    with read_only_file(db):
        with pytest.raises(ConfigError, match="it is read-only"):
            await Store(db).open()
        store = Store(db, probe_write=False)
        await store.open()
        try:
            assert await store.runs("dev") == []
            with pytest.raises(StoreUnavailable, match=r"is read-only .*make it writable") as e:
                await store.ingest("dev", 1, [new_event("t/read-only")])
            assert e.value.status == 503
            assert await store.environments() == []
        finally:
            await store.close()
    assert stored_ids(db) == []


@pytest.mark.slow  # devserver children
def test_a_database_on_a_read_only_file_system_or_directory_exits_2_with_one_line(
    spawn: Spawn, read_only_dir: tuple[Path, Callable[[], None]],
) -> None:
    where, make_it_read_only = read_only_dir
    db = where / "ro.sqlite3"
    create_database(db)
    make_it_read_only()
    assert "it is read-only" in start_fails(spawn, db)
    # A new database in a directory that can't be written.
    assert "it is read-only" in start_fails(spawn, where / "new.sqlite3")


@pytest.mark.slow  # a devserver child
def test_a_file_that_is_not_a_database_exits_2_with_one_line(
    spawn: Spawn, tmp_path: Path,
) -> None:
    db = tmp_path / "garbage.sqlite3"
    db.write_bytes(random.Random(8).randbytes(64 * 1024))
    assert "it is not a database or is damaged" in start_fails(spawn, db)


def seeded_database(path: Path) -> int:
    """A database of a few hundred pages, checkpointed into the file; its size."""
    seed_runs(path, runs=2000, sessions=20)
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return path.stat().st_size


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", ["truncated", "page overwritten", "header overwritten"])
async def test_a_damaged_database_is_refused_at_open(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "damaged.sqlite3"
    size = seeded_database(db)
    junk = random.Random(damage).randbytes(4096)
    if damage == "truncated":
        os.truncate(db, size // 2)
    else:
        with db.open("r+b") as file:
            file.seek(0 if damage == "header overwritten" else (size // 4096 // 2) * 4096)
            file.write(junk)
    with pytest.raises(ConfigError, match=r"cannot open database .*: it is (not a database "
                                          r"or is )?damaged") as raised:
        await Store(db).open()
    assert "\n" not in str(raised.value)


@pytest.mark.asyncio
async def test_an_intact_database_passes_the_checks_at_open(tmp_path: Path) -> None:
    db = tmp_path / "intact.sqlite3"
    seeded_database(db)
    store = Store(db)
    await store.open()
    try:
        assert len(await store.runs("dev", limit=5)) == 5
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------
# Deleted while running


@pytest.mark.asyncio
async def test_a_database_deleted_while_running_refuses_writes_until_a_restart(
    make_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    db = tmp_path / "deleted.sqlite3"
    server = await make_server(db=db)
    before: list[str] = []
    assert (await post(http, server, event("t/before"), before))[0] == 200
    for suffix in ("", "-wal", "-shm"):  # as `rm deleted.sqlite3*` does
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{db}{suffix}")

    after: list[str] = []
    for _ in range(3):  # the first write finds it out; the later ones are refused at once
        status, doc = await post(http, server, [event("t/after")] * 2, after)
        assert_refused(status, doc, 503, str(db), "deleted", "restart devserver")
    assert after == []
    status, health = await get_json(http, server, "/health")
    assert status == 200
    assert health["status"] == 200
    refusals = [r for r in caplog.records if "database write failed" in r.getMessage()]
    assert len(refusals) == 1, caplog.text
    assert refusals[0].exc_info is None, caplog.text
    await server.stop()

    assert not db.exists(), "nothing was written to the path after it was deleted"
    restarted = await make_server(db=db)
    again: list[str] = []
    assert (await post(http, restarted, event("t/restarted"), again))[0] == 200
    await restarted.stop()
    assert stored_ids(db) == again


# ---------------------------------------------------------------------------------------------
# Disk full


@pytest.mark.slow  # fills a file system
@pytest.mark.asyncio
async def test_a_full_disk_gives_507_without_a_traceback_and_writes_resume_once_freed(
    make_server: MakeServer, http: aiohttp.ClientSession, tmpfs: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    where = tmpfs("4m", "full")
    db = where / "full.sqlite3"
    server = await make_server(db=db)
    acked: list[str] = []
    assert (await post(http, server, event("t/first"), acked))[0] == 200
    # Leave about 200 KB free: a few dozen requests fill it.
    free = os.statvfs(where)
    filler = where / "filler"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 200 * 1024))

    refused: list[dict[str, Any]] = []
    for _ in range(200):
        answers = await asyncio.gather(*(post(http, server, [event("t/fill", 2000)] * 4, acked)
                                         for _ in range(4)))
        for status, doc in answers:
            if status != 200:
                refused.append(doc)
                assert_refused(status, doc, 507, f"disk full writing {db}")
        if refused:
            break
    assert refused, "the disk never filled up"
    # More writes while the disk is full. Some may fit again: the background checkpoint
    # recycles the WAL, which needs no new space. Every other one is a clean 507; each
    # outage (refusals with no success between them) is one log line.
    outages, failing = 1, True
    for _ in range(20):
        status, doc = await post(http, server, [event("t/more", 2000)] * 4, acked)
        if status == 200:
            failing = False
            continue
        assert_refused(status, doc, 507, f"disk full writing {db}")
        outages += not failing
        failing = True
    status, health = await get_json(http, server, "/health")
    assert status == 200
    assert health["status"] == 200
    status, _ = await get_json(http, server, "/api/runs")
    assert status == 200

    filler.unlink()
    assert (await post(http, server, [event("t/freed")] * 3, acked))[0] == 200
    refusals = [r for r in caplog.records if "database write failed" in r.getMessage()]
    assert len(refusals) == outages, caplog.text
    assert not [r for r in caplog.records if r.exc_info is not None], caplog.text
    await server.stop()
    stored = stored_ids(db)
    assert sorted(stored) == sorted(acked), "exactly the acknowledged events are stored"
    assert len(stored) == len(set(stored))
    assert len(acked) > 4


@pytest.mark.slow  # the step's write waits for the lock, then the run is retried on the clock
@pytest.mark.asyncio
async def test_user_code_catching_exception_cannot_swallow_a_refused_step_write(
    make_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    app = App("careless")
    gate = asyncio.Event()
    bodies: list[int] = []

    @app.function(trigger="t/careless", retries=0)
    async def careless(ctx: Context) -> dict[str, Any]:
        async def body() -> int:
            bodies.append(1)
            await gate.wait()
            return 42
        try:
            value = await ctx.step.run("answer", body)
        except Exception as exc:  # noqa: BLE001 - the careless code under test
            return {"swallowed": repr(exc)}
        return {"value": value}

    db = tmp_path / "careless.sqlite3"
    server = await make_server(app, db=db)
    acked: list[str] = []
    assert (await post(http, server, event("t/careless"), acked))[0] == 200
    run_id = await eventually(lambda: _running_run(http, server, acked[0]), "a Running run")
    await eventually(lambda: _true(bool(bodies)), "the step's body to start")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        gate.set()  # the step returns; its write meets the lock
        await eventually(
            lambda: _logged(caplog, "database write failed"), "the step's write to be refused")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    doc = await eventually(lambda: _ended(http, server, run_id), "the run to end")
    assert doc["status"] == "Completed", doc
    assert doc["output"] == {"value": 42}, doc  # not {"swallowed": ...}
    assert len(bodies) == 2  # its result was never stored, so the step ran again


async def _true(value: bool) -> bool:
    return value
