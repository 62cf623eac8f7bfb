"""Crash safety under load: `kill -9` a server that is busy ingesting and running, many times.

A `python -m devserver` child runs an app whose functions take a few steps; client threads send
events with sessions without pause while the test kills the server at random moments (a seeded
RNG picks how many acknowledged events to let through between kills) and restarts it on the same
database. Afterwards every event the server acknowledged with a 200 must be stored, every run it
started must have finished (resumed after the kills, nothing left Queued or Running), the
per-session figures must equal a recount from the runs, and SQLite must find nothing to repair.
"""

from __future__ import annotations

import collections
import http.client
import os
import random
import signal
import sqlite3
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .procs import FINAL_STATUSES, Devserver, Http, Spawn

pytestmark = pytest.mark.slow  # devserver children killed under load

SEED = int(os.environ.get("DEVSERVER_CRASH_SEED", "20240807"))
"""The RNG seed: set DEVSERVER_CRASH_SEED to explore other kill schedules."""
KILLS = int(os.environ.get("DEVSERVER_CRASH_KILLS", "0"))
"""Kills to make (0: 5 to 8, picked by the RNG); more with a longer LOAD_SECONDS."""
LOAD_SECONDS = float(os.environ.get("DEVSERVER_CRASH_SECONDS", "20"))
"""Wall time for the kill loop (the kills stop early once this is spent)."""
SETTLE_TIMEOUT = 30.0
"""Seconds for every run to finish after the last restart."""
CLIENTS = 4
CONVERSATIONS = 12
USERS = 4

CRASH_APP = textwrap.dedent(
    """
    import devserver

    app = devserver.App("crash")


    def double(n):
        return n * 2


    @app.function(trigger="load/*", retries=0)
    async def work(ctx):
        a = await ctx.step.run("double", double, ctx.event.data["n"])
        b = await ctx.step.run("again", double, a)
        if ctx.event.data.get("fail"):
            raise devserver.NonRetriableError("asked to fail")
        return b


    @app.function(trigger="load/sync", retries=0)
    def sync_work(ctx):
        return ctx.step.run("half", lambda n: n // 2, ctx.event.data["n"])
    """
)


@dataclass
class Load:
    """What the clients sent and what the server acknowledged, shared between threads."""

    url: str
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)  # event id -> event
    requests: int = 0
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def set_url(self, url: str) -> None:
        with self.changed:
            self.url = url
            self.changed.notify_all()

    def count(self) -> int:
        with self.changed:
            return len(self.acked)


def make_event(rng: random.Random, n: int) -> dict[str, Any]:
    sessions = {"conversation_id": f"conv_{rng.randrange(CONVERSATIONS)}"}
    if rng.random() < 0.5:
        sessions["user_id"] = f"user_{rng.randrange(USERS)}"
    return {"name": rng.choice(["load/msg", "load/msg", "load/sync"]),
            "data": {"n": n, "fail": rng.random() < 0.2}, "sessions": sessions}


def client(load: Load, index: int) -> None:
    """Send batches of 1-3 events until told to stop; remember what got a 200."""
    rng = random.Random(SEED * 100 + index)
    n = index * 1_000_000
    url, conn = "", None
    while not load.stop.is_set():
        with load.changed:
            if load.url != url:
                url = load.url
                if conn is not None:
                    conn.close()
                conn = Http(url, timeout=5.0)
        assert conn is not None
        batch = [make_event(rng, n + i) for i in range(rng.randint(1, 3))]
        n += len(batch)
        try:
            status, body = conn.post_json("/e/crash-key", batch)
        except (OSError, http.client.HTTPException, ValueError):
            # The server is down (killed): wait for the restart, or pace the retry.
            with load.changed:
                load.failures += 1
                if load.url == url:
                    load.changed.wait(0.05)
            continue
        assert status == 200, (status, body)
        with load.changed:
            load.requests += 1
            load.acked.update(zip(body["ids"], batch, strict=True))
            load.changed.notify_all()
    if conn is not None:
        conn.close()


def wait_for_acks(load: Load, more: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    target = load.count() + more
    with load.changed:
        while len(load.acked) < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"clients got only {len(load.acked)} of {target} acknowledgements "
                            f"in {timeout}s ({load.failures} failed requests)")
            load.changed.wait(remaining)


def start(spawn: Spawn, tmp_path: Path, app: Path) -> Devserver:
    child = spawn("--port", "0", "--db", str(tmp_path / "crash.sqlite3"), "--app", str(app),
                  "--no-reload", "--log-level", "warning")
    child.wait_banner()
    return child


def unfinished_runs(db_path: Path) -> int:
    """Runs Queued or Running in a database no server has open."""
    db = sqlite3.connect(db_path)
    try:
        return int(db.execute(
            "SELECT count(*) FROM runs WHERE status IN ('Queued', 'Running')").fetchone()[0])
    finally:
        db.close()


def all_pages(http: Http, path: str, key: str, **params: str) -> tuple[dict[str, Any], list[Any]]:
    """Every row of a paginated endpoint: (first page's document, rows of all pages)."""
    status, doc = http.get_json(path, limit="500", **params)
    assert status == 200, (path, params, doc)
    first, rows = doc, list(doc[key])
    while doc["next_cursor"]:
        status, doc = http.get_json(path, limit="500", cursor=doc["next_cursor"], **params)
        assert status == 200, (path, params, doc)
        rows.extend(doc[key])
    return first, rows


def expected_functions(event: dict[str, Any]) -> dict[str, str]:
    """function id -> final status, for the runs an acknowledged event must have started."""
    runs = {"crash-work": "Failed" if event["data"]["fail"] else "Completed"}
    if event["name"] == "load/sync":
        runs["crash-sync-work"] = "Completed"
    return runs


@pytest.mark.timeout(LOAD_SECONDS + SETTLE_TIMEOUT + 60)
def test_kill_9_under_load_loses_nothing_acknowledged_and_figures_match_a_recount(
    spawn: Spawn, tmp_path: Path
) -> None:
    app = tmp_path / "crash_app.py"
    app.write_text(CRASH_APP)
    rng = random.Random(SEED)
    server = start(spawn, tmp_path, app)
    load = Load(server.url)
    threads = [threading.Thread(target=client, args=(load, i), daemon=True)
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    kills = KILLS or rng.randint(5, 8)
    began = time.monotonic()
    done = 0
    cut_off: list[int] = []  # runs left Queued or Running by each kill
    try:
        for _ in range(kills):
            if time.monotonic() - began > LOAD_SECONDS:
                break
            # Mostly mid-load; sometimes right after the restart, while runs resume.
            wait_for_acks(load, 0 if rng.random() < 0.25 else rng.randint(50, 400), timeout=20)
            server.proc.send_signal(signal.SIGKILL)
            server.kill()  # reaped, pipes closed
            cut_off.append(unfinished_runs(tmp_path / "crash.sqlite3"))
            with load.changed:
                latest = list(load.acked)[-50:]  # the acks most at risk: just before the kill
            server = start(spawn, tmp_path, app)
            check = Http(server.url)
            for event_id in latest:
                assert check.get_json(f"/v1/events/{event_id}")[0] == 200, event_id
            check.close()
            load.set_url(server.url)
            done += 1
        wait_for_acks(load, 20, timeout=20)  # the last server takes load too
    finally:
        load.stop.set()
        with load.changed:
            load.changed.notify_all()
        for thread in threads:
            thread.join(timeout=10)
    assert done >= 3, f"only {done} kills happened in {LOAD_SECONDS}s"
    assert load.failures > 0, "no request ever failed: the kills did not land under load"
    assert sum(cut_off) > 0, "no kill caught a run mid-way: nothing had to resume"

    http = Http(server.url)

    # Every run finishes: those cut off by a kill resume after the restart.
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        unfinished = [run for status in ("Queued", "Running")
                      for run in http.get_json("/api/runs", status=status, limit="500")[1]["runs"]]
        if not unfinished:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{len(unfinished)} runs still unfinished {SETTLE_TIMEOUT}s after the "
                        f"last restart, e.g. {unfinished[:3]}")
        time.sleep(0.05)  # poll interval, not a synchronisation point

    # Every acknowledged event is stored, with the runs it should have started.
    for event_id, sent in load.acked.items():
        status, stored = http.get_json(f"/v1/events/{event_id}")
        assert status == 200, f"acknowledged event {event_id} is missing: {stored}"
        assert stored["data"]["data"] == sent["data"]
        assert stored["data"]["sessions"] == sent["sessions"]

    # The figures of every session equal a recount from its runs.
    by_event: dict[str, dict[str, str]] = collections.defaultdict(dict)
    checked = 0
    for identifier, prefix, values in (("conversation_id", "conv", CONVERSATIONS),
                                       ("user_id", "user", USERS)):
        _, listed = all_pages(http, "/api/sessions", "sessions", identifier=identifier)
        listed_by_value = {row["value"]: row for row in listed}
        for v in range(values):
            value = f"{prefix}_{v}"
            if value not in listed_by_value:
                continue
            doc, runs = all_pages(http, "/api/session", "runs", identifier=identifier,
                                  value=value)
            stats = doc["stats"]
            assert all(run["status"] in FINAL_STATUSES for run in runs), runs
            stamps = [run[k] for run in runs for k in ("queued_at", "started_at", "ended_at")
                      if run[k] is not None]
            recount = {
                "runs": len(runs),
                "failed_runs": sum(run["status"] == "Failed" for run in runs),
                "functions": sorted({run["function_id"] for run in runs}),
                "last_active": max(stamps) if stamps else stats["last_active"],
            }
            recount["failure_rate"] = (recount["failed_runs"] / recount["runs"]
                                       if recount["runs"] else 0)
            assert stats == recount, (identifier, value)
            row = listed_by_value[value]
            assert {k: row[k] for k in stats} == stats, (identifier, value)
            if identifier == "conversation_id":
                for run in runs:
                    by_event[run["event_id"]][run["function_id"]] = run["status"]
            checked += 1
    assert checked == CONVERSATIONS + USERS

    for event_id, sent in load.acked.items():
        assert by_event.get(event_id) == expected_functions(sent), (event_id, sent)
    http.close()

    # The database needs no repair, even right after one more kill.
    server.proc.send_signal(signal.SIGKILL)
    server.kill()
    db = sqlite3.connect(tmp_path / "crash.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        drift = db.execute(
            "SELECT s.identifier, s.value, s.runs, s.failed_runs, count(r.run_id), "
            "coalesce(sum(r.status = 'Failed'), 0) FROM sessions s "
            "LEFT JOIN run_sessions rs ON (rs.env, rs.identifier, rs.value) = "
            "(s.env, s.identifier, s.value) LEFT JOIN runs r ON r.run_id = rs.run_id "
            "GROUP BY s.env, s.identifier, s.value "
            "HAVING s.runs != count(r.run_id) OR s.failed_runs != coalesce(sum(r.status = "
            "'Failed'), 0)").fetchall()
        assert drift == []
    finally:
        db.close()
    assert unfinished_runs(tmp_path / "crash.sqlite3") == 0
    print(f"{done} kills, {len(load.acked)} events acknowledged in {load.requests} requests, "
          f"{load.failures} failed requests, runs cut off by each kill: {cut_off}")
