"""User code fails its own run, never the server (SPEC 8, README "Safety"): SystemExit and
friends wherever they are raised (an exception's `__str__`, encoding a result, a task or
callback the code put on the loop), a CancelledError the code raised itself, an attempt that
ends the process (`os._exit`), runaway sync code and a tree of runs that fans out without end."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.model.limits import MAX_RESTARTS
from devserver.runtime.local import LocalExecutor
from devserver.testing import LoopThread

from .helpers import (
    MakeServer,
    eventually,
    get_json,
    idle,
    run_doc,
    runs_of_function,
    send,
    the_run,
)
from .procs import RUN_TIMEOUT, Spawn


class Exiting(Exception):
    """An exception whose message can't be read: its `__str__` exits."""

    def __str__(self) -> str:
        raise SystemExit("from __str__")


class ExitingDict(dict[str, Any]):
    """A result whose JSON encoding raises SystemExit (the encoder asks a subclass for items)."""

    def items(self) -> Any:
        raise SystemExit("from encoding")


@pytest.mark.asyncio
async def test_exits_in_str_or_encoding_and_cancelled_errors_fail_only_their_run(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("odd")

    @app.function(trigger="odd/str", retries=0)
    async def bad_str(ctx: devserver.Context) -> None:
        raise Exiting

    @app.function(trigger="odd/output", retries=0)
    async def bad_output(ctx: devserver.Context) -> Any:
        return ExitingDict(a=1)

    @app.function(trigger="odd/sync-output", retries=0)
    def bad_sync_output(ctx: devserver.SyncContext) -> Any:
        return [ExitingDict(a=1)]

    @app.function(trigger="odd/step-output", retries=0)
    async def bad_step_output(ctx: devserver.Context) -> None:
        await ctx.step.run("make", lambda: ExitingDict(a=1))

    @app.function(trigger="odd/cancelled", retries=0)
    async def cancelled(ctx: devserver.Context) -> None:
        raise asyncio.CancelledError

    @app.function(trigger="odd/step-cancelled", retries=0)
    async def step_cancelled(ctx: devserver.Context) -> None:
        async def body() -> None:
            raise asyncio.CancelledError
        await ctx.step.run("body", body)

    @app.function(trigger="odd/ok")
    async def ok(ctx: devserver.Context) -> str:
        return "fine"

    server = await make_server(app)
    names = ["odd/str", "odd/output", "odd/sync-output", "odd/step-output", "odd/cancelled",
             "odd/step-cancelled"]
    ids = {name: await send(http, server, name) for name in names}
    await idle(server)
    runs = {name: await the_run(http, server, ids[name]) for name in names}
    for run in runs.values():
        assert run["status"] == "Failed", run
    assert runs["odd/str"]["error"]["name"] == "Exiting"
    assert "str() failed" in runs["odd/str"]["error"]["message"]
    for name in ("odd/output", "odd/sync-output"):
        error = runs[name]["error"]
        assert error["name"] == "NonRetriableError", error
        assert "encoding it raised SystemExit: from encoding" in error["message"], error
    step = runs["odd/step-output"]["steps"][0]
    assert step["step_id"] == "make"
    assert "raised SystemExit: from encoding" in step["error"]["message"], step
    assert runs["odd/cancelled"]["error"]["name"] == "CancelledError"
    assert runs["odd/step-cancelled"]["steps"][0]["error"]["name"] == "CancelledError"
    assert (await the_run(http, server, await send(http, server, "odd/ok")))["output"] == "fine"
    await idle(server)
    assert (await get_json(http, server, "/health"))[0] == 200


def test_the_fixture_loop_survives_an_exit_from_a_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The loop thread that the pytest fixture's servers share keeps running when user code
    schedules `sys.exit` or a task raising KeyboardInterrupt on it."""
    loop = LoopThread()
    try:
        async def interrupting() -> None:
            raise KeyboardInterrupt

        async def schedule() -> None:
            asyncio.get_running_loop().call_soon(sys.exit, 3)
            asyncio.get_running_loop().create_task(interrupting())

        loop.call(schedule(), timeout=5)

        async def later() -> str:
            await asyncio.sleep(0.01)
            return "still running"

        assert loop.call(later(), timeout=5) == "still running"
        messages = [r.getMessage() for r in caplog.records]
        assert any("user code raised SystemExit outside any run" in m for m in messages)
        assert any("user code raised KeyboardInterrupt outside any run" in m for m in messages)
    finally:
        loop.close()


LOOP_APP = textwrap.dedent(
    """
    import asyncio
    import sys

    import devserver

    app = devserver.App("loop")


    async def leave():
        raise SystemExit(4)


    @app.function(trigger="loop/task", retries=0)
    async def task(ctx):
        asyncio.create_task(leave())
        return "spawned"


    @app.function(trigger="loop/soon", retries=0)
    async def soon(ctx):
        asyncio.get_running_loop().call_soon(sys.exit)
        return "scheduled"


    @app.function(trigger="loop/sync-soon", retries=0)
    def sync_soon(ctx):
        ctx.step.run("first", lambda: 1)
        return "ok"


    @app.function(trigger="loop/ok")
    async def ok(ctx):
        return "fine"
    """
)


@pytest.mark.slow
def test_an_exit_from_a_task_or_callback_of_user_code_does_not_stop_the_server(
    spawn: Spawn, tmp_path: Path
) -> None:
    (tmp_path / "loop_app.py").write_text(LOOP_APP)
    child = spawn("--port", "0", "--db", str(tmp_path / "loop.sqlite3"), "--app",
                  str(tmp_path / "loop_app.py"), "--no-reload")
    child.wait_banner()
    for value, name in (("1", "loop/task"), ("2", "loop/soon")):
        child.send({"name": name, "sessions": {"s": value}})
        run = child.wait_session_settled("s", value, 1)["runs"][0]
        assert run["status"] == "Completed", run
    # The server still serves: new runs complete, and SIGTERM still stops it cleanly.
    child.send({"name": "loop/ok", "sessions": {"s": "3"}})
    assert child.wait_session_settled("s", "3", 1)["runs"][0]["status"] == "Completed"
    assert child.get("/health")
    assert child.stop(signal.SIGTERM) == 0
    err = child.stderr()
    # One line names the first; the same line again within seconds is rate-limited.
    assert "user code raised SystemExit(4) outside any run" in err, err


KILLER_APP = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import devserver

    app = devserver.App("killer")
    MARKS = Path.cwd() / "marks"


    @app.function(trigger="kill/always", retries=0)
    def always(ctx):
        ctx.step.run("die", lambda: os._exit(1))


    def die_once(name):
        mark = MARKS / name
        if not mark.exists():
            mark.touch()
            os._exit(1)
        return name


    @app.function(trigger="kill/progress", retries=0)
    def progress(ctx):
        for i in range(5):
            ctx.step.run(f"s{i}", die_once, f"s{i}")
        return "survived"
    """
)


def _start_until_it_survives(spawn: Spawn, args: list[str], value: str,
                             max_starts: int) -> tuple[Any, int, dict[str, Any]]:
    """Start the child again until a start outlives its runs and session s=`value` settles;
    (that child, how many starts ended with exit code 1, the session)."""
    for crashes in range(max_starts):
        child = spawn(*args)
        doc = _settle_or_end(child, value)
        if doc is not None:
            return child, crashes, doc
        assert child.proc.returncode == 1, child.stderr()
    raise AssertionError(f"the server died at each of {max_starts} starts")


def _settle_or_end(child: Any, value: str) -> dict[str, Any] | None:
    """The session once its runs have all ended, or None when the child ends first."""
    try:
        child.wait_banner()
    except BaseException:  # pytest's failure: the child ended before its banner
        if child.proc.poll() is None:
            raise
        return None
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            return None
        try:
            status, doc = child.request("GET", f"/api/session?identifier=s&value={value}")
        except OSError:  # the child is ending
            continue
        if status == 200 and doc["runs"] and all(
                run["status"] in ("Completed", "Failed") for run in doc["runs"]):
            return dict(doc)
        time.sleep(0.02)  # poll interval
    raise AssertionError(f"session s={value} did not settle: {child.stderr()}")


@pytest.mark.slow
def test_a_run_that_kills_the_process_fails_after_a_bounded_number_of_restarts(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Decided: MAX_RESTARTS (3) ends of the process while a run executes without progress,
    then the next start fails it instead; a run that commits steps in between is not failed."""
    (tmp_path / "killer_app.py").write_text(KILLER_APP)
    (tmp_path / "marks").mkdir()
    args = ["--port", "0", "--db", str(tmp_path / "killer.sqlite3"), "--app",
            str(tmp_path / "killer_app.py"), "--no-reload"]
    child = spawn(*args)
    child.wait_banner()
    status, _ = child.request("POST", "/e/key", [{"name": "kill/always",
                                                 "sessions": {"s": "1"}}])
    assert status == 200
    assert child.proc.wait(timeout=RUN_TIMEOUT) == 1  # the first end of the process
    survivor, crashes, doc = _start_until_it_survives(spawn, args, "1", MAX_RESTARTS + 2)
    assert crashes == MAX_RESTARTS - 1  # 1 + 2 ends, then the start that fails it
    run = survivor.get(f"/api/runs/{doc['runs'][0]['run_id']}")
    assert run["status"] == "Failed"
    assert run["error"]["name"] == "ProcessEndedError"
    assert (f"the server process ended {MAX_RESTARTS} times while this run was executing"
            in run["error"]["message"])
    assert survivor.stop() == 0
    # A run that commits a step between the ends of the process is not failed for them.
    survivor = spawn(*args)
    survivor.wait_banner()
    status, _ = survivor.request("POST", "/e/key", [{"name": "kill/progress",
                                                    "sessions": {"s": "2"}}])
    assert status == 200
    assert survivor.proc.wait(timeout=RUN_TIMEOUT) == 1
    survivor, crashes, doc = _start_until_it_survives(spawn, args, "2", 8)
    assert crashes == 4  # s1..s4 each end one start, after the step before was committed
    run = survivor.get(f"/api/runs/{doc['runs'][0]['run_id']}")
    assert (run["status"], run["output"]) == ("Completed", "survived"), run
    assert survivor.stop() == 0


@pytest.mark.asyncio
async def test_a_tree_of_runs_that_fans_out_without_end_is_stopped_at_its_bound(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("tree")

    @app.function(trigger="tree/go")
    async def go(ctx: devserver.Context) -> str:
        await ctx.step.send_event("again", [{"name": "tree/go"}, {"name": "tree/go"}])
        return "sent"

    @app.function(trigger="tree/caller")
    async def caller(ctx: devserver.Context) -> Any:
        return await ctx.step.invoke("child", function=go)

    server = await make_server(app)
    server.runner.max_tree_runs = 30
    await send(http, server, "tree/go")
    await idle(server)
    runs = await runs_of_function(http, server, "tree-go")
    assert len(runs) == 31  # the first run and the 30 its tree may hold
    statuses = sorted(run["status"] for run in runs)
    assert statuses.count("Completed") == 15, statuses
    assert statuses.count("Failed") == 16, statuses
    failed = [await run_doc(http, server, run["run_id"]) for run in runs
              if run["status"] == "Failed"]
    for run in failed:
        assert run["error"]["name"] == "NonRetriableError", run["error"]
        assert "at most 30 are allowed" in run["error"]["message"]
        assert 'README "Safety"' in run["error"]["message"]
    # Another tree (a new event from outside) has its own count; an invoke counts too.
    server.runner.max_tree_runs = 0
    run = await the_run(http, server, await send(http, server, "tree/caller"))
    assert run["status"] == "Failed", run
    assert run["steps"][0]["step_id"] == "child"
    assert "at most 0 are allowed" in run["steps"][0]["error"]["message"]


@pytest.mark.asyncio
async def test_functions_triggered_by_each_others_ends_are_stopped_at_the_bound(
    make_server: MakeServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    """Three functions each triggered by every other's `inngest/function.finished`: every end
    starts two runs. Their tree is bounded like one grown by send_event."""
    app = devserver.App("echo")
    for name in ("a", "b", "c"):
        @app.function(id=name, trigger=["echo/start", "inngest/function.finished"])
        async def echo(ctx: devserver.Context) -> str:
            return "ok"

    server = await make_server(app)
    server.runner.max_tree_runs = 40
    caplog.set_level(logging.WARNING)
    await send(http, server, "echo/start")
    await idle(server)
    runs = [run for name in ("a", "b", "c")
            for run in await runs_of_function(http, server, f"echo-{name}")]
    # 3 roots, each its own tree: at most 3 x (1 + 40) runs, and all of them ended well
    assert 3 < len(runs) <= 3 * 41, len(runs)
    assert {run["status"] for run in runs} == {"Completed"}
    warnings = [r.getMessage() for r in caplog.records if "lifecycle events" in r.getMessage()]
    assert warnings
    assert "past the bound of 40" in warnings[0]
    assert 'README "Safety"' in warnings[0]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_spinning_sync_functions_are_stopped_and_cannot_starve_the_others(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """Decided: a sync function's timeout counts from when its body starts; at most 8 bodies
    run at once; a body past its timeout is interrupted and its thread replaced."""
    app = devserver.App("spin")

    @app.function(trigger="spin/forever", timeout=0.5, retries=0)
    def forever(ctx: devserver.SyncContext) -> None:
        while True:
            pass

    # It waits for two waves of spinners (at least 1 s), longer than its own timeout: it can
    # only complete if the timeout counts from when its body starts. The 0.9 s leave its body
    # time to get the GIL from spinners still being interrupted on a busy machine (0.5 s did
    # not, once in CI).
    @app.function(trigger="spin/quick", timeout=0.9, retries=0)
    def quick(ctx: devserver.SyncContext) -> str:
        return "quick"

    server = await make_server(app)
    for _ in range(16):
        await send(http, server, "spin/forever")
    quick_id = await send(http, server, "spin/quick")
    slowest = 0.0

    async def all_ended() -> bool:
        nonlocal slowest
        began = time.monotonic()
        status, _ = await get_json(http, server, "/health")
        slowest = max(slowest, time.monotonic() - began)
        assert status == 200
        runs = await runs_of_function(http, server, "spin-forever")
        return len(runs) == 16 and all(run["status"] == "Failed" for run in runs)

    await eventually(all_ended, "the spinning runs to fail", timeout=20)
    await idle(server)
    quick_run = await the_run(http, server, quick_id)
    assert (quick_run["status"], quick_run["output"]) == ("Completed", "quick"), quick_run
    for run in await runs_of_function(http, server, "spin-forever"):
        error = (await run_doc(http, server, run["run_id"]))["error"]
        assert error["name"] == "FunctionTimeoutError", error
    assert slowest < 2.0, slowest
    local = server.runner.local
    assert isinstance(local, LocalExecutor)

    async def freed() -> bool:
        return local.abandoned == 0

    await eventually(freed, "the interrupted threads to end", timeout=5)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_spinning_sync_step_of_an_async_function_is_stopped_at_its_timeout(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("spinstep")
    stopped: list[str] = []

    def spin() -> None:
        try:
            while True:
                pass
        except BaseException as exc:
            stopped.append(type(exc).__name__)
            raise

    @app.function(trigger="spinstep/go", timeout=0.3, retries=0)
    async def go(ctx: devserver.Context) -> None:
        await ctx.step.run("spin", spin)

    server = await make_server(app)
    event_id = await send(http, server, "spinstep/go")
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Failed"
    assert run["error"]["name"] == "FunctionTimeoutError"
    local = server.runner.local
    assert isinstance(local, LocalExecutor)

    async def freed() -> bool:
        return local.abandoned == 0 and stopped == ["ThreadAbandoned"]

    await eventually(freed, lambda: f"the step's thread to stop; stopped: {stopped}", timeout=5)
