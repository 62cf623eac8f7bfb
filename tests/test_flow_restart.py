"""Pending debounces and batches survive a restart: a clean stop (in-process, on virtual
time) and `kill -9` of a real `python -m devserver` child. After the restart each fires once,
with the events it held; nothing runs twice and nothing is lost."""

from __future__ import annotations

import asyncio
import itertools
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.clock import VirtualClock

from .helpers import (
    MakeServer,
    eventually,
    eventually_sync,
    get,
    idle,
    run_doc,
    runs_of_function,
    send,
)
from .procs import FINAL_STATUSES, RUN_TIMEOUT, Devserver, Spawn

T0 = 1_700_000_000_000

FLOW_APP = textwrap.dedent(
    """
    import devserver

    app = devserver.App("flow")


    @app.function(trigger="cart/updated",
                  debounce=devserver.Debounce(period="2s", key="event.data.user"))
    async def save(ctx):
        return ctx.event.data["n"]


    @app.function(trigger="order/placed",
                  batch_events=devserver.Batch(max_size=10, timeout="3s"))
    async def ship(ctx):
        return [e.data["n"] for e in ctx.events]
    """
)


def flow_app() -> devserver.App:
    app = devserver.App("flow")

    @app.function(trigger="cart/updated",
                  debounce=devserver.Debounce(period="1h", key="event.data.user"))
    async def save(ctx: devserver.Context) -> Any:
        return ctx.event.data["n"]

    @app.function(trigger="order/placed",
                  batch_events=devserver.Batch(max_size=10, timeout="10m"))
    async def ship(ctx: devserver.Context) -> Any:
        return [e.data["n"] for e in ctx.events]

    return app


@pytest.mark.asyncio
async def test_pending_work_fires_once_after_a_restart(
    make_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    db = tmp_path / "flow.sqlite3"
    first = await make_server(flow_app(), db=db, clock=VirtualClock(T0))
    for n in range(3):
        await send(http, first, "cart/updated", {"user": "a", "n": n})
        await send(http, first, "order/placed", {"n": n},
                   sessions={"conversation_id": "c1"})
    await first.runner.wait_idle(skip_time=False)
    assert await runs_of_function(http, first, "flow-save") == []
    await first.stop()

    second = await make_server(flow_app(), db=db, clock=VirtualClock(T0 + 1000))
    await idle(second)  # the hour and the ten minutes pass at once
    (save,) = await runs_of_function(http, second, "flow-save")
    (ship,) = await runs_of_function(http, second, "flow-ship")
    assert (await run_doc(http, second, save["run_id"]))["output"] == 2
    assert (await run_doc(http, second, ship["run_id"]))["output"] == [0, 1, 2]
    session = await get(http, second, "/api/session", identifier="conversation_id", value="c1")
    assert session["stats"]["runs"] == 1
    await second.stop()

    third = await make_server(flow_app(), db=db, clock=VirtualClock(T0 + 7_200_000))
    await idle(third)
    assert len(await runs_of_function(http, third, "flow-save")) == 1
    assert len(await runs_of_function(http, third, "flow-ship")) == 1


def _start(spawn: Spawn, tmp_path: Path, app: Path) -> Devserver:
    child = spawn("--port", "0", "--db", str(tmp_path / "db.sqlite3"), "--app", str(app),
                  "--no-reload")
    child.wait_banner()
    return child


@pytest.mark.slow  # real devserver children, killed
def test_kill_9_in_the_middle_of_a_batch_and_a_debounce(spawn: Spawn, tmp_path: Path) -> None:
    app = tmp_path / "flow_app.py"
    app.write_text(FLOW_APP)
    server = _start(spawn, tmp_path, app)
    debounced = server.send(*({"name": "cart/updated", "data": {"user": "a", "n": n}}
                              for n in range(3)))
    batched = server.send(*({"name": "order/placed", "data": {"n": n},
                             "sessions": {"conversation_id": "c9"}} for n in range(4)))
    for event_id in debounced + batched:  # acknowledged: stored with its decision
        assert server.get(f"/api/events/{event_id}")["flow"][0]["action"] in (
            "debounced", "batched")
    server.kill()  # SIGKILL, well before the 2 s and 3 s are up

    server = _start(spawn, tmp_path, app)

    def finished(fn: str) -> list[dict[str, Any]] | None:
        runs = server.get("/api/runs", function_id=fn)["runs"]
        return runs if runs and all(r["status"] in FINAL_STATUSES for r in runs) else None

    (save,) = eventually_sync(lambda: finished("flow-save"), "the debounce to fire",
                              RUN_TIMEOUT)
    (ship,) = eventually_sync(lambda: finished("flow-ship"), "the batch to fire", RUN_TIMEOUT)
    assert server.get(f"/api/runs/{save['run_id']}")["output"] == 2
    ship_doc = server.get(f"/api/runs/{ship['run_id']}")
    assert ship_doc["output"] == [0, 1, 2, 3]
    assert [e["internal_id"] for e in ship_doc["events"]] == batched
    server.kill()

    server = _start(spawn, tmp_path, app)  # and once more: nothing fires twice
    assert len(server.get("/api/runs", function_id="flow-save")["runs"]) == 1
    assert len(server.get("/api/runs", function_id="flow-ship")["runs"]) == 1
    session = server.get("/api/session", identifier="conversation_id", value="c9")
    assert session["stats"]["runs"] == 1


def paced_app(gate: asyncio.Event | None, seen: list[tuple[int, int]],
              clock: VirtualClock, executing: dict[str, int] | None = None) -> devserver.App:
    """Throttled (one an hour, one burst) and concurrency-limited (one at a time) functions;
    with a `gate`, the concurrency-limited one blocks until it is set."""
    app = devserver.App("paced")

    @app.function(trigger="api/call", throttle=devserver.Throttle(limit=1, period="1h"))
    async def call(ctx: devserver.Context) -> Any:
        seen.append((ctx.event.data["n"], clock.now_ms() - T0))
        return ctx.event.data["n"]

    @app.function(trigger="job/run", concurrency=devserver.Concurrency(limit=1))
    async def job(ctx: devserver.Context) -> Any:
        if gate is not None:
            await gate.wait()
        if executing is not None:
            executing["now"] += 1
            executing["most"] = max(executing["most"], executing["now"])
            await asyncio.sleep(0)  # a yield: another job would start here if it could
            executing["now"] -= 1
        return ctx.event.data["n"]

    return app


@pytest.mark.asyncio
async def test_throttled_and_concurrency_queued_runs_survive_a_restart(
    make_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    db = tmp_path / "paced.sqlite3"
    seen: list[tuple[int, int]] = []
    clock = VirtualClock(T0)
    first = await make_server(paced_app(asyncio.Event(), seen, clock), db=db, clock=clock)
    for n in range(3):
        await send(http, first, "api/call", {"n": n})
        await send(http, first, "job/run", {"n": n})

    async def queued() -> bool:
        runs = await runs_of_function(http, first, "paced-job")
        return sorted(r["status"] for r in runs) == ["Queued", "Queued", "Running"]

    await eventually(queued, "one job running and two queued for concurrency")
    assert sorted(seen) == [(0, 0), (1, 0)]  # the third call waits an hour for its turn
    await first.stop()  # the running job is interrupted: it resumes after the restart

    clock = VirtualClock(T0 + 60_000)
    executing = {"now": 0, "most": 0}
    second = await make_server(paced_app(None, seen, clock, executing), db=db, clock=clock)
    await idle(second)
    assert sorted(seen) == [(0, 0), (1, 0), (2, 3_600_000)]  # once, at its turn
    jobs = [await run_doc(http, second, r["run_id"])
            for r in await runs_of_function(http, second, "paced-job")]
    assert sorted(j["output"] for j in jobs) == [0, 1, 2]
    assert all(j["status"] == "Completed" for j in jobs)
    assert executing["most"] == 1  # one at a time after the restart too


QUEUE_APP = textwrap.dedent(
    """
    import time

    import devserver

    app = devserver.App("queue")


    def work(n):
        time.sleep(0.4)  # long enough for the test to kill the server in the middle
        return n * 10


    @app.function(trigger="job/run", concurrency=devserver.Concurrency(limit=1))
    def job(ctx):
        return ctx.step.run("work", work, ctx.event.data["n"])
    """
)


@pytest.mark.slow  # real devserver children, killed
def test_kill_9_with_runs_queued_for_concurrency(spawn: Spawn, tmp_path: Path) -> None:
    app = tmp_path / "queue_app.py"
    app.write_text(QUEUE_APP)
    server = _start(spawn, tmp_path, app)
    server.send(*({"name": "job/run", "data": {"n": n}} for n in range(3)))

    def one_running_two_queued() -> bool:
        runs = server.get("/api/runs", function_id="queue-job")["runs"]
        return sorted(r["status"] for r in runs) == ["Queued", "Queued", "Running"]

    eventually_sync(one_running_two_queued, "one job running, two queued", RUN_TIMEOUT)
    server.kill()

    server = _start(spawn, tmp_path, app)

    def finished() -> list[dict[str, Any]] | None:
        runs = server.get("/api/runs", function_id="queue-job")["runs"]
        return runs if len(runs) == 3 and all(
            r["status"] in FINAL_STATUSES for r in runs) else None

    runs = eventually_sync(finished, "the three jobs to finish", RUN_TIMEOUT)
    docs = [server.get(f"/api/runs/{r['run_id']}") for r in runs]
    assert sorted(d["output"] for d in docs) == [0, 10, 20]
    assert {d["status"] for d in docs} == {"Completed"}
    # One at a time, also after the restart: the committed steps' spans never overlap.
    spans = sorted((s["started_at"], s["ended_at"]) for d in docs for s in d["steps"]
                   if s["status"] == "Completed")
    assert len(spans) == 3
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
