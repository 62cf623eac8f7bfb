"""Local Python functions end to end: triggers, steps, retries, errors, resume after restart.

Each test starts a real server on port 0 with its own SQLite file and drives it over HTTP.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.web.server import Server

from .helpers import MakeServer, get_json, idle, runs_of_event, send, the_run

pytestmark = pytest.mark.asyncio


def _parse(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


async def only_run(http: aiohttp.ClientSession, server: Server, event_id: str) -> Any:
    await idle(server)
    return await the_run(http, server, event_id)


async def test_async_function_runs_memoized_step_and_records_output(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("bot")
    seen: dict[str, Any] = {}

    @app.function(trigger="app/message.created")
    async def summarize(ctx: devserver.Context) -> dict[str, Any]:
        msg = await ctx.step.run("load", lambda: {"id": ctx.event.data["messageId"]})
        seen.update(run_id=ctx.run_id, attempt=ctx.attempt, sessions=ctx.sessions,
                    names=[e.name for e in ctx.events], fn=ctx.function_id)
        ctx.logger.info("summarized %s", msg["id"])
        return {"ok": True, "msg": msg}

    server = await make_server(app)
    event_id = await send(http, server, "app/message.created", {"messageId": 7},
                          sessions={"conversation_id": "conv_1"})
    run = await only_run(http, server, event_id)
    assert run["status"] == "Completed"
    assert run["function_id"] == "bot-summarize"
    assert run["output"] == {"ok": True, "msg": {"id": 7}}
    assert run["sessions"] == {"conversation_id": "conv_1"}
    assert [s["step_id"] for s in run["steps"]] == ["load"]
    assert run["steps"][0]["output"] == {"id": 7}
    assert seen == {"run_id": run["run_id"], "attempt": 0,
                    "sessions": {"conversation_id": "conv_1"},
                    "names": ["app/message.created"], "fn": "bot-summarize"}
    status, v1 = await get_json(http, server, f"/v1/runs/{run['run_id']}")
    assert status == 200
    assert v1["data"]["status"] == "Completed"
    assert v1["data"]["output"] == {"ok": True, "msg": {"id": 7}}


async def test_sync_function_runs_in_a_worker_thread_with_sync_steps(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("sync")
    threads: list[str] = []

    @app.function(trigger="app/sync")
    def work(ctx: devserver.Context) -> int:
        threads.append(threading.current_thread().name)
        a = ctx.step.run("a", lambda: 20)
        b = ctx.step.run("b", lambda x: x + 1, a)
        return int(a + b)

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/sync"))
    assert run["status"] == "Completed"
    assert run["output"] == 41
    assert threads
    assert threads[0] != threading.current_thread().name
    assert [s["output"] for s in run["steps"]] == [20, 21]


async def test_wildcard_and_multiple_triggers(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("t")

    @app.function(trigger="app/*")
    async def everything(ctx: devserver.Context) -> str:
        return ctx.event.name

    @app.function(trigger="app/user.*")
    async def users(ctx: devserver.Context) -> str:
        return ctx.event.name

    @app.function(trigger=["billing/paid", "billing/refunded"])
    async def billing(ctx: devserver.Context) -> str:
        return ctx.event.name

    server = await make_server(app)
    cases = {
        "app/user.created": {"t-everything", "t-users"},
        "app/order.created": {"t-everything"},
        "app/user": {"t-everything"},
        "billing/paid": {"t-billing"},
        "billing/refunded": {"t-billing"},
        "billing/other": set(),
        "apps/x": set(),
    }
    ids = {name: await send(http, server, name) for name in cases}
    await idle(server)
    for name, expected in cases.items():
        runs = await runs_of_event(http, server, ids[name])
        assert {r["function_id"] for r in runs} == expected, name
        assert all(r["status"] == "Completed" and r["output"] == name for r in runs)


async def test_step_retries_then_succeeds_without_rerunning_earlier_steps(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("retry")
    calls = {"first": 0, "flaky": 0}
    attempts: list[int] = []

    def first() -> str:
        calls["first"] += 1
        return "done"

    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionError(f"try {calls['flaky']}")
        return "ok"

    @app.function(trigger="app/go", retries=2)
    async def fn(ctx: devserver.Context) -> str:
        await ctx.step.run("first", first)
        attempts.append(ctx.attempt)
        return str(await ctx.step.run("flaky", flaky))

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/go"))
    assert run["status"] == "Completed"
    assert run["output"] == "ok"
    assert calls == {"first": 1, "flaky": 3}
    assert attempts == [0, 1, 2]
    flaky_attempts = [s for s in run["steps"] if s["step_id"] == "flaky"]
    assert [(s["attempt"], s["status"], s["final"]) for s in flaky_attempts] == [
        (1, "Failed", False), (2, "Failed", False), (3, "Completed", True)]
    assert flaky_attempts[0]["error"]["name"] == "ConnectionError"
    assert flaky_attempts[0]["error"]["message"] == "try 1"


async def test_step_that_spends_its_attempts_raises_step_error_into_the_function(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("se")
    calls = {"n": 0, "fn": 0}

    def broken() -> None:
        calls["n"] += 1
        raise KeyError("missing")

    @app.function(trigger="app/caught", retries=1)
    async def caught(ctx: devserver.Context) -> dict[str, str]:
        try:
            await ctx.step.run("broken", broken)
        except devserver.StepError as exc:
            return {"step": exc.step_id, "name": exc.name}
        return {}

    @app.function(trigger="app/uncaught", retries=3)
    async def uncaught(ctx: devserver.Context) -> None:
        calls["fn"] += 1
        await ctx.step.run("broken", broken)

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/caught"))
    assert run["status"] == "Completed"
    assert run["output"] == {"step": "broken", "name": "KeyError"}
    assert calls["n"] == 2

    calls["n"] = 0
    run = await only_run(http, server, await send(http, server, "app/uncaught"))
    assert run["status"] == "Failed"
    assert calls["n"] == 4  # the step's own attempts, and no function retry on top
    assert run["error"]["name"] == "KeyError"
    assert run["error"]["step_id"] == "broken"
    assert "broken" in run["error"]["stack"]


async def test_function_error_retries_the_function_and_keeps_memoized_steps(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("fe")
    calls = {"step": 0, "fn": 0}

    def step_body() -> int:
        calls["step"] += 1
        return 1

    @app.function(trigger="app/go", retries=4)
    async def fn(ctx: devserver.Context) -> int:
        calls["fn"] += 1
        await ctx.step.run("once", step_body)
        if ctx.attempt < 2:
            raise RuntimeError(f"attempt {ctx.attempt}")
        return ctx.attempt

    @app.function(trigger="app/always", retries=2)
    async def always(ctx: devserver.Context) -> None:
        raise ValueError("nope")

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/go"))
    assert run["status"] == "Completed"
    assert run["output"] == 2
    assert calls == {"step": 1, "fn": 3}
    fn_attempts = [s for s in run["steps"] if s["kind"] == "function"]
    assert [(s["attempt"], s["error"]["message"]) for s in fn_attempts] == [
        (1, "attempt 0"), (2, "attempt 1")]  # JSON numbers from 1; ctx.attempt from 0

    run = await only_run(http, server, await send(http, server, "app/always"))
    assert run["status"] == "Failed"
    assert [s["attempt"] for s in run["steps"]] == [1, 2, 3]
    assert run["steps"][-1]["final"] is True
    assert run["error"]["name"] == "ValueError"
    assert run["error"]["message"] == "nope"
    assert 'raise ValueError("nope")' in run["error"]["stack"]


async def test_default_retries_is_four(make_server: MakeServer, http: aiohttp.ClientSession
                                       ) -> None:
    app = devserver.App("d")
    calls = {"n": 0}

    @app.function(trigger="app/go")
    async def fn(ctx: devserver.Context) -> None:
        calls["n"] += 1
        raise ValueError("x")

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/go"))
    assert run["status"] == "Failed"
    assert calls["n"] == 5


async def test_non_retriable_error_fails_at_once(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("nr")
    calls = {"fn": 0, "step": 0}

    def step_body() -> None:
        calls["step"] += 1
        raise devserver.NonRetriableError("bad input")

    @app.function(trigger="app/fn", retries=4)
    async def fn(ctx: devserver.Context) -> None:
        calls["fn"] += 1
        raise devserver.NonRetriableError("no way")

    @app.function(trigger="app/step", retries=4)
    async def in_step(ctx: devserver.Context) -> None:
        await ctx.step.run("s", step_body)

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/fn"))
    assert (run["status"], calls["fn"]) == ("Failed", 1)
    assert run["error"]["name"] == "NonRetriableError"
    run = await only_run(http, server, await send(http, server, "app/step"))
    assert (run["status"], calls["step"]) == ("Failed", 1)
    assert run["error"]["message"] == "bad input"


async def test_retry_after_error_sets_the_next_attempt_time(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("ra")
    calls = {"n": 0}

    @app.function(trigger="app/go", retries=1)
    async def fn(ctx: devserver.Context) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise devserver.RetryAfterError("rate limited", 0.2)
        return "ok"

    # The default (Inngest) backoff would wait 15 s or more: only RetryAfterError's delay applies.
    server = await make_server(app, retry_interval=None)
    run = await only_run(http, server, await send(http, server, "app/go"))
    assert run["status"] == "Completed"
    first = run["steps"][0]
    assert first["error"]["name"] == "RetryAfterError"
    retried_after = _parse(run["ended_at"]) - _parse(first["ended_at"])
    assert retried_after >= dt.timedelta(milliseconds=190)  # the delay, not 15 s of backoff


async def test_repeated_step_ids_get_suffixes(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("rep")

    @app.function(trigger="app/go")
    async def fn(ctx: devserver.Context) -> list[int]:
        return [await ctx.step.run("item", lambda i=i: i) for i in range(3)]

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/go"))
    assert run["output"] == [0, 1, 2]
    assert [s["step_id"] for s in run["steps"]] == ["item", "item:1", "item:2"]


async def test_unserializable_results_fail_clearly(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("ser")

    @app.function(trigger="app/ret", retries=3)
    async def ret(ctx: devserver.Context) -> object:
        return object()

    @app.function(trigger="app/step", retries=3)
    async def step(ctx: devserver.Context) -> None:
        await ctx.step.run("s", lambda: {1, 2})

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/ret"))
    assert run["status"] == "Failed"
    assert "not JSON-serializable" in run["error"]["message"]
    assert len(run["steps"]) == 1
    run = await only_run(http, server, await send(http, server, "app/step"))
    assert run["status"] == "Failed"
    assert "step 's'" in run["error"]["message"]


async def test_system_exit_in_user_code_fails_only_its_run(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("exit")

    @app.function(trigger="app/exit", retries=0)
    def bye(ctx: devserver.Context) -> None:
        raise SystemExit(3)

    @app.function(trigger="app/ok")
    async def ok(ctx: devserver.Context) -> str:
        return "still here"

    server = await make_server(app)
    run = await only_run(http, server, await send(http, server, "app/exit"))
    assert run["status"] == "Failed"
    assert run["error"]["name"] == "SystemExit"
    run = await only_run(http, server, await send(http, server, "app/ok"))
    assert run["output"] == "still here"


async def test_unfinished_run_resumes_after_restart_from_its_last_committed_step(
    make_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    calls = {"one": 0, "two": 0}
    reached_two = asyncio.Event()

    def one() -> str:
        calls["one"] += 1
        return "one"

    first = devserver.App("dur")

    @first.function(trigger="app/go")
    async def job(ctx: devserver.Context) -> list[str]:
        a = await ctx.step.run("one", one)
        reached_two.set()
        await asyncio.Event().wait()  # the process "dies" here
        return [a]

    db = tmp_path / "resume.sqlite3"
    server = await make_server(first, db=db)
    event_id = await send(http, server, "app/go", sessions={"job": "j1"})
    await asyncio.wait_for(reached_two.wait(), 10)
    await server.stop()

    second = devserver.App("dur")

    @second.function(trigger="app/go", id="job")
    async def job2(ctx: devserver.Context) -> list[str]:
        a = await ctx.step.run("one", one)
        b = await ctx.step.run("two", lambda: "two")
        return [a, b]

    restarted = await make_server(second, db=db)
    run = await only_run(http, restarted, event_id)
    assert run["status"] == "Completed"
    assert run["output"] == ["one", "two"]
    assert calls["one"] == 1
    status, body = await get_json(http, restarted, "/api/session", identifier="job", value="j1")
    assert status == 200
    assert body["stats"]["runs"] == 1
    assert body["stats"]["failed_runs"] == 0


async def test_a_function_past_its_timeout_fails_alone(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("slowpoke")
    release = threading.Event()

    @app.function(trigger="app/hang", timeout=0.2)
    async def hang(ctx: devserver.Context) -> None:
        await asyncio.Event().wait()

    @app.function(trigger="app/block", timeout="200ms", retries=3)
    def block(ctx: devserver.Context) -> str:
        release.wait(10)  # a sync function stuck in a call
        return "too late"

    @app.function(trigger="app/own-timeout", retries=0)
    async def own(ctx: devserver.Context) -> None:
        raise TimeoutError("the user's own timeout")

    @app.function(trigger="app/ok")
    async def ok(ctx: devserver.Context) -> str:
        return "fine"

    server = await make_server(app)
    try:
        hung = await only_run(http, server, await send(http, server, "app/hang"))
        blocked = await only_run(http, server, await send(http, server, "app/block"))
    finally:
        release.set()
    for run, limit in ((hung, "0.2 s"), (blocked, "0.2 s")):
        assert run["status"] == "Failed"
        assert run["error"]["name"] == "FunctionTimeoutError"
        assert f"more than its {limit} timeout" in run["error"]["message"]
        assert len(run["steps"]) == 1  # no retries: another attempt would hang the same way
    mine = await only_run(http, server, await send(http, server, "app/own-timeout"))
    assert mine["error"]["name"] == "TimeoutError"
    assert mine["error"]["message"] == "the user's own timeout"
    assert (await only_run(http, server, await send(http, server, "app/ok")))["output"] == "fine"


@pytest.mark.slow
async def test_the_watchdog_names_a_run_that_blocks_the_event_loop(
    make_server: MakeServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    app = devserver.App("blocker")

    @app.function(trigger="app/block")
    async def blocks(ctx: devserver.Context) -> str:
        time.sleep(1.0)  # noqa: ASYNC251 - the mistake the watchdog is there to report
        return "done"

    server = await make_server(app, watchdog_threshold=0.3)
    with caplog.at_level(logging.WARNING, logger="devserver.runtime.watchdog"):
        run = await only_run(http, server, await send(http, server, "app/block"))
    assert run["output"] == "done"
    warnings = [r.getMessage() for r in caplog.records if r.name == "devserver.runtime.watchdog"]
    assert warnings, "the watchdog said nothing"
    assert f"run {run['run_id']} of blocker-blocks" in warnings[0]
    assert "blocking code" in warnings[0]
