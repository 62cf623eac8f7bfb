"""Parallel steps of local functions: `ctx.step.parallel(...)` (async and sync functions) and
`asyncio.gather` over steps run at once, each step committed as soon as it is done and counting
its own attempts, and a run killed (-9) mid-group re-runs only the steps that had not finished.

The steps synchronise on barriers with timeouts, never on sleeps: a step that waits for its
siblings can only pass if they run at the same time.
"""

from __future__ import annotations

import asyncio
import signal
import textwrap
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver

from .helpers import (
    MakeServer,
    attempts,
    eventually,
    eventually_sync,
    idle,
    run_doc,
    runs_of_event,
    send,
    the_run,
)
from .procs import RUN_TIMEOUT, Devserver, Spawn

BARRIER_TIMEOUT = 20.0


async def _meet(barrier: asyncio.Barrier, name: str) -> str:
    async with asyncio.timeout(BARRIER_TIMEOUT):
        await barrier.wait()
    return name


@pytest.mark.asyncio
async def test_parallel_steps_of_an_async_function_run_at_once_and_return_in_order(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    app = devserver.App("par")
    meet = asyncio.Barrier(3)
    threads = threading.Barrier(2, timeout=BARRIER_TIMEOUT)

    def in_thread(name: str) -> str:
        threads.wait()  # sync step bodies: each in a worker thread, at the same time
        return name

    async def two_in_a_row(ctx: devserver.Context) -> str:
        first = await ctx.step.run("c1", _meet, meet, "c1")
        return first + await ctx.step.run("c2", lambda: "+c2")

    @app.function(trigger="par/go", retries=0)
    async def fan_out(ctx: devserver.Context) -> Any:
        together = await ctx.step.parallel(
            lambda: ctx.step.run("a", _meet, meet, "a"),
            ctx.step.run("b", _meet, meet, "b"),  # an awaitable does as well as a callable
            lambda: two_in_a_row(ctx))
        threaded = await ctx.step.parallel(lambda: ctx.step.run("t1", in_thread, "t1"),
                                           lambda: ctx.step.run("t2", in_thread, "t2"))
        gathered = await asyncio.gather(ctx.step.run("g1", _meet, gather, "g1"),
                                        ctx.step.run("g2", _meet, gather, "g2"))
        return [list(together), list(threaded), gathered]

    gather = asyncio.Barrier(2)
    server = await make_server(app)
    event_id = await send(http, server, "par/go")
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Completed", run
    assert run["output"] == [["a", "b", "c1+c2"], ["t1", "t2"], ["g1", "g2"]]
    assert {s["step_id"] for s in run["steps"]} == {"a", "b", "c1", "c2", "t1", "t2", "g1",
                                                     "g2"}
    assert all(s["status"] == "Completed" and s["attempt"] == 1 for s in run["steps"])


@pytest.mark.asyncio
async def test_parallel_steps_of_a_sync_function_run_in_threads_at_once(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    app = devserver.App("par")
    meet = threading.Barrier(3, timeout=BARRIER_TIMEOUT)

    def part(name: str) -> str:
        meet.wait()
        return name

    @app.function(trigger="par/sync", retries=0)
    def fan_out(ctx: devserver.SyncContext) -> Any:
        parts = ctx.step.parallel(*(
            (lambda name=name: ctx.step.run(f"part-{name}", part, name)) for name in "xyz"))
        return ctx.step.run("join", lambda: "".join(parts))

    server = await make_server(app)
    event_id = await send(http, server, "par/sync")
    await idle(server)
    run = await the_run(http, server, event_id)
    assert (run["status"], run["output"]) == ("Completed", "xyz"), run
    assert [s["step_id"] for s in run["steps"]][-1] == "join"


@pytest.mark.asyncio
async def test_a_failing_branch_is_retried_alone_with_attempts_of_its_own(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    app = devserver.App("par")
    calls = {"flaky": 0, "steady": 0, "bad": 0, "good": 0}

    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("first try fails")
        return "flaky"

    def count(name: str) -> str:
        calls[name] += 1
        return name

    def bad() -> None:
        calls["bad"] += 1
        raise RuntimeError(f"bad {calls['bad']}")

    @app.function(trigger="par/flaky", retries=2)
    async def recovers(ctx: devserver.Context) -> Any:
        return list(await ctx.step.parallel(lambda: ctx.step.run("flaky", flaky),
                                            lambda: ctx.step.run("steady", count, "steady")))

    @app.function(trigger="par/bad", retries=2)
    async def gives_up(ctx: devserver.Context) -> Any:
        # The sibling's success, committed after each failure, must not reset bad's count.
        return list(await ctx.step.parallel(lambda: ctx.step.run("bad", bad),
                                            lambda: ctx.step.run("good", count, "good")))

    server = await make_server(app)
    flaky_id = await send(http, server, "par/flaky")
    await idle(server)
    run = await the_run(http, server, flaky_id)
    assert (run["status"], run["output"]) == ("Completed", ["flaky", "steady"]), run
    assert attempts(run, "flaky") == [(0, "Failed"), (1, "Completed")]
    assert attempts(run, "steady") == [(0, "Completed")]
    assert calls["steady"] == 1  # replayed from the memo on the retry, not run again

    bad_id = await send(http, server, "par/bad")
    await idle(server)
    run = await the_run(http, server, bad_id)
    assert run["status"] == "Failed", run
    assert attempts(run, "bad") == [(0, "Failed"), (1, "Failed"), (2, "Failed")]
    assert attempts(run, "good") == [(0, "Completed")]
    assert (calls["bad"], calls["good"]) == (3, 1)
    assert run["error"]["message"] == "bad 3"


@pytest.mark.asyncio
async def test_gather_unwinds_early_but_the_run_waits_for_the_steps_still_running(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    app = devserver.App("par")
    calls = {"a": 0, "b": 0}
    release_b = threading.Event()

    def a() -> str:
        calls["a"] += 1
        if calls["a"] == 1:
            raise RuntimeError("a fails once")
        return "a"

    def b() -> str:  # a sync body, in a worker thread: held until the test lets it go
        calls["b"] += 1
        if not release_b.wait(BARRIER_TIMEOUT):
            raise RuntimeError("never released")
        return "b"

    @app.function(trigger="par/gather", retries=1)
    async def gathered(ctx: devserver.Context) -> Any:
        return await asyncio.gather(ctx.step.run("a", a), ctx.step.run("b", b))

    server = await make_server(app)  # retries at once: a retry beside a running b would show
    event_id = await send(http, server, "par/gather")
    [listed] = await runs_of_event(http, server, event_id)

    async def a_failed() -> bool:
        return attempts(await run_doc(http, server, listed["run_id"]), "a")[:1] == [
            (0, "Failed")]
    await eventually(a_failed, "a to fail while b runs")
    release_b.set()
    await idle(server)
    run = await the_run(http, server, event_id)
    assert (run["status"], run["output"]) == ("Completed", ["a", "b"]), run
    assert calls == {"a": 2, "b": 1}  # b committed before the retry, which replayed it
    assert attempts(run, "a") == [(0, "Failed"), (1, "Completed")]
    assert attempts(run, "b") == [(0, "Completed")]
    steps = {(s["step_id"], s["attempt"]): s for s in run["steps"]}
    assert steps[("a", 2)]["started_at"] >= steps[("b", 1)]["ended_at"]


@pytest.mark.asyncio
async def test_parallel_needs_callables_and_says_so(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    app = devserver.App("par")

    @app.function(trigger="par/wrong", retries=0)
    def wrong(ctx: devserver.SyncContext) -> Any:
        return ctx.step.parallel(ctx.step.run("a", lambda: 1))

    server = await make_server(app)
    event_id = await send(http, server, "par/wrong")
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Failed", run
    assert "parallel branch 0 must be a callable" in run["error"]["message"]


CRASH_APP = textwrap.dedent(
    """
    import os
    import time
    import devserver

    app = devserver.App("pk")


    def effect(name):
        with open(os.environ["SIDE_EFFECTS"], "a") as log:
            log.write(name + "\\n")
        return name


    def held(name):
        effect("start-" + name)
        release = os.environ["RELEASE"]
        while not os.path.exists(release):  # held until the test releases it
            time.sleep(0.01)
        return effect("done-" + name)


    @app.function(trigger="pk/go", retries=0)
    async def group(ctx):
        parts = await ctx.step.parallel(
            lambda: ctx.step.run("quick", effect, "quick"),
            lambda: ctx.step.run("held-b", held, "b"),
            lambda: ctx.step.run("held-c", held, "c"))
        return list(parts)
    """
)


@pytest.mark.slow
def test_a_kill_mid_group_reruns_only_the_unfinished_steps(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    effects = tmp_path / "effects.log"
    release = tmp_path / "release"
    monkeypatch.setenv("SIDE_EFFECTS", str(effects))
    monkeypatch.setenv("RELEASE", str(release))
    app = tmp_path / "pk_app.py"
    app.write_text(CRASH_APP)
    args = ("--port", "0", "--db", str(tmp_path / "db.sqlite3"), "--app", str(app),
            "--no-reload")

    def start() -> Devserver:
        child = spawn(*args)
        child.wait_banner()
        return child

    server = start()
    (event_id,) = server.send({"name": "pk/go"})
    run_id = eventually_sync(lambda: server.get(f"/v1/events/{event_id}/runs")["data"],
                             "the run to start", RUN_TIMEOUT)[0]["run_id"]

    def quick_committed_and_both_held() -> bool:
        steps = server.get(f"/api/runs/{run_id}")["steps"]
        done = any(s["step_id"] == "quick" and s["status"] == "Completed" for s in steps)
        lines = effects.read_text().split() if effects.exists() else []
        return done and {"start-b", "start-c"} <= set(lines)

    # All three run at once: "quick" commits while the two others are held.
    eventually_sync(quick_committed_and_both_held, "quick to commit beside b and c",
                    RUN_TIMEOUT)
    server.stop(signal.SIGKILL)
    release.write_text("go")

    restarted = start()

    def finished() -> Any:
        run = restarted.get(f"/api/runs/{run_id}")
        return run if run["status"] in ("Completed", "Failed", "Cancelled") else None

    run = eventually_sync(finished, "the resumed run to finish", 3 * RUN_TIMEOUT)
    assert run["status"] == "Completed", run
    assert run["output"] == ["quick", "done-b", "done-c"]
    lines = effects.read_text().split()
    assert lines.count("quick") == 1  # committed before the kill: never run again
    assert lines.count("start-b") == lines.count("start-c") == 2  # re-run after the kill
    assert lines.count("done-b") == lines.count("done-c") == 1
    assert [s["step_id"] for s in run["steps"] if s["status"] == "Completed"].count(
        "quick") == 1
