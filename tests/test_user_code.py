"""User code can't take the server down: BaseExceptions, huge or over-deep outputs and floods
of log lines each fail (or merely slow) their own run, with a clear error, while other runs
and requests carry on. (Timeouts, blocking calls and the watchdog: tests/test_runs.py.)"""

from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.cli.logs import MAX_LOG_CHARS
from devserver.model.failures import MAX_ERROR_CHARS
from devserver.runtime.invocation import MAX_OUTPUT_BYTES

from .helpers import MakeServer, get_json, idle, post_events, send, the_run
from .procs import RUN_TIMEOUT, Http, Spawn


class Boom(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


async def run_of(http: aiohttp.ClientSession, server: Any, name: str) -> dict[str, Any]:
    """Send event `name` (in session case=name) and return its one run once the server idles."""
    event_id = await send(http, server, name, sessions={"case": name})
    await idle(server)
    return await the_run(http, server, event_id)


@pytest.mark.asyncio
async def test_base_exceptions_in_functions_and_steps_fail_only_their_run(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("base")

    @app.function(trigger="base/async-interrupt", retries=0)
    async def async_interrupt(ctx: devserver.Context) -> None:
        raise KeyboardInterrupt

    @app.function(trigger="base/sync-interrupt", retries=0)
    def sync_interrupt(ctx: devserver.SyncContext) -> None:
        raise KeyboardInterrupt

    @app.function(trigger="base/async-step-exit", retries=0)
    async def async_step_exit(ctx: devserver.Context) -> None:
        def leave() -> None:
            raise SystemExit("bye")
        await ctx.step.run("leave", leave)

    @app.function(trigger="base/sync-step-boom", retries=0)
    def sync_step_boom(ctx: devserver.SyncContext) -> None:
        async def boom() -> None:
            raise Boom("custom")
        ctx.step.run("boom", boom)

    @app.function(trigger="base/generator-exit", retries=0)
    async def generator_exit(ctx: devserver.Context) -> None:
        raise GeneratorExit

    @app.function(trigger="base/ok")
    async def ok(ctx: devserver.Context) -> str:
        return "fine"

    server = await make_server(app)
    for name, error in (("base/async-interrupt", "KeyboardInterrupt"),
                        ("base/sync-interrupt", "KeyboardInterrupt"),
                        ("base/generator-exit", "GeneratorExit")):
        run = await run_of(http, server, name)
        assert run["status"] == "Failed", run
        assert run["error"]["name"] == error
    for name, step, error in (("base/async-step-exit", "leave", "SystemExit"),
                              ("base/sync-step-boom", "boom", "Boom")):
        run = await run_of(http, server, name)
        assert run["status"] == "Failed", run
        assert run["steps"][0]["step_id"] == step
        assert run["steps"][0]["error"]["name"] == error
    assert (await run_of(http, server, "base/ok"))["output"] == "fine"
    status, doc = await get_json(http, server, "/api/session", identifier="case",
                                 value="base/sync-interrupt")
    assert (status, doc["stats"]["failed_runs"]) == (200, 1)


@pytest.mark.asyncio
async def test_outputs_over_the_limit_or_too_deep_fail_clearly_and_the_server_stays_up(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("big")
    calls = {"huge-step": 0}

    @app.function(trigger="big/huge-step", retries=3)
    async def huge_step(ctx: devserver.Context) -> str:
        def fifty_mb() -> str:
            calls["huge-step"] += 1
            return "x" * (50 * 1024 * 1024)
        try:
            await ctx.step.run("load", fifty_mb)
        except devserver.StepError as exc:
            return f"caught: {exc.message}"
        return "unreachable"

    @app.function(trigger="big/huge-return", retries=3)
    def huge_return(ctx: devserver.SyncContext) -> list[str]:
        return ["y" * 1024 * 1024] * 5

    @app.function(trigger="big/just-under")
    async def just_under(ctx: devserver.Context) -> str:
        return await ctx.step.run("fits", lambda: "z" * (MAX_OUTPUT_BYTES - 1000))

    @app.function(trigger="big/deep", retries=3)
    async def deep(ctx: devserver.Context) -> Any:
        value: Any = "bottom"
        for _ in range(300):
            value = [value]
        return value

    server = await make_server(app)
    run = await run_of(http, server, "big/huge-step")
    assert run["status"] == "Completed"  # the step failed; the function caught StepError
    assert calls["huge-step"] == 1  # no retries: the same value would be as large
    step = run["steps"][0]
    assert step["status"] == "Failed"
    assert "52,428,802 bytes as JSON; at most 4,194,304 (4 MiB)" in step["error"]["message"]
    assert run["output"].startswith("caught: the value returned by step 'load' is 52,428,802")

    run = await run_of(http, server, "big/huge-return")
    assert run["status"] == "Failed"
    assert len(run["steps"]) == 1  # not retried
    assert run["error"]["name"] == "NonRetriableError"
    assert run["error"]["message"].startswith("the value returned by the function is 5,242,")

    run = await run_of(http, server, "big/deep")
    assert run["status"] == "Failed"
    assert "nested more than 100 levels deep" in run["error"]["message"]

    run = await run_of(http, server, "big/just-under")
    assert run["status"] == "Completed"
    assert len(run["output"]) == MAX_OUTPUT_BYTES - 1000
    async with http.get(f"{server.url}/runs/{run['run_id']}") as resp:
        assert resp.status == 200
        assert len(await resp.read()) > MAX_OUTPUT_BYTES - 1000
    assert (await get_json(http, server, "/health"))[0] == 200


LOUD_APP = textwrap.dedent(
    """
    import logging

    import devserver

    app = devserver.App("loud")
    plain = logging.getLogger("loud.library")


    @app.function(trigger="loud/async")
    async def shout(ctx):
        ctx.logger.info("huge: %s", "A" * 8_000_000)
        for i in range(2000):
            plain.warning("line %d %s", i, "b" * 1000)
        return "done"


    @app.function(trigger="loud/sync")
    def shout_sync(ctx):
        ctx.logger.info("huge sync: " + "C" * 8_000_000)
        return "done"


    @app.function(trigger="loud/quiet")
    async def quiet(ctx):
        return "quiet"
    """
)


@pytest.mark.slow
def test_a_function_that_logs_megabytes_gets_its_lines_cut_and_the_server_keeps_answering(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Decided: one log message is cut to MAX_LOG_CHARS characters with a note saying how much
    was left out; ordinary lines, however many, are written as they are."""
    (tmp_path / "loud_app.py").write_text(LOUD_APP)
    child = spawn("--port", "0", "--db", str(tmp_path / "loud.sqlite3"), "--app",
                  str(tmp_path / "loud_app.py"), "--no-reload")
    child.wait_banner()
    ids = child.send({"name": "loud/async", "sessions": {"s": "1"}},
                     {"name": "loud/sync", "sessions": {"s": "1"}},
                     {"name": "loud/quiet", "sessions": {"s": "1"}})
    http = Http(child.url)
    slowest = 0.0
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        began = time.monotonic()
        assert http.get_json("/health")[0] == 200
        slowest = max(slowest, time.monotonic() - began)
        doc = http.get_json("/api/session", identifier="s", value="1")[1]
        if doc.get("runs") and len(doc["runs"]) == 3 and all(
                run["status"] == "Completed" for run in doc["runs"]):
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.02)  # poll interval
    http.close()
    assert slowest < 5.0
    assert len(ids) == 3
    assert child.stop() == 0
    err = child.stderr()
    assert err.count("[log line cut: ") == 2
    prefix = len("run ") + 26 + len(": ")  # ctx.logger lines start with the run id
    assert f"{prefix + 8_000_006 - MAX_LOG_CHARS:,} more characters]" in err  # "huge: " + 8M
    assert err.count(" b" + "b" * 999) == 2000  # ordinary lines are untouched
    assert len(err) < 2000 * 1100 + 2 * (MAX_LOG_CHARS + 500) + 20_000


@pytest.mark.asyncio
async def test_many_misbehaving_runs_at_once_leave_the_others_alone(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("mixed")

    @app.function(trigger="mixed/bad", retries=0, timeout=0.3)
    async def bad(ctx: devserver.Context) -> Any:
        kind = ctx.event.data["kind"]
        if kind == "exit":
            raise SystemExit(1)
        if kind == "hang":
            await asyncio.Event().wait()
        if kind == "unserializable":
            return {1, 2}
        raise KeyboardInterrupt

    @app.function(trigger="mixed/good")
    async def good(ctx: devserver.Context) -> int:
        return int(await ctx.step.run("n", lambda: ctx.event.data["n"]))

    server = await make_server(app)
    kinds = ["exit", "hang", "unserializable", "interrupt"] * 5
    body = [{"name": "mixed/bad", "data": {"kind": k}, "sessions": {"mix": "bad"}}
            for k in kinds]
    body += [{"name": "mixed/good", "data": {"n": n}, "sessions": {"mix": "good"}}
             for n in range(40)]
    status, sent = await post_events(http, server, body)
    assert status == 200, sent
    await idle(server)
    _, bad_doc = await get_json(http, server, "/api/session", identifier="mix", value="bad")
    _, good_doc = await get_json(http, server, "/api/session", identifier="mix", value="good")
    assert bad_doc["stats"]["runs"] == bad_doc["stats"]["failed_runs"] == len(kinds)
    assert good_doc["stats"]["runs"] == 40
    assert good_doc["stats"]["failed_runs"] == 0


@pytest.mark.asyncio
async def test_odd_text_and_huge_errors_from_user_code_are_stored_and_shown(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """Lone surrogates can't be UTF-8: a value holding one is stored escaped and shown as
    `\\ud800`; an error's text is cut to MAX_ERROR_CHARS; an exception whose str() fails
    still fails its run. None of them leaves a run stuck or a page failing."""
    app = devserver.App("odd")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    @app.function(trigger="odd/surrogate-step", retries=0)
    async def surrogate_step(ctx: devserver.Context) -> Any:
        return await ctx.step.run("lone", lambda: {"k\udcff": "\ud800"})

    @app.function(trigger="odd/surrogate-error", retries=0)
    async def surrogate_error(ctx: devserver.Context) -> None:
        raise ValueError("bad \ud800 text")

    @app.function(trigger="odd/huge-error", retries=0)
    def huge_error(ctx: devserver.SyncContext) -> None:
        raise ValueError("E" * 10_000_000)

    @app.function(trigger="odd/unprintable", retries=0)
    async def unprintable(ctx: devserver.Context) -> None:
        raise Unprintable

    server = await make_server(app)
    run = await run_of(http, server, "odd/surrogate-step")
    assert run["status"] == "Completed"
    assert run["output"] == {"k\udcff": "\ud800"}
    run = await run_of(http, server, "odd/surrogate-error")
    assert run["error"]["message"] == "bad \\ud800 text"
    run = await run_of(http, server, "odd/huge-error")
    assert run["status"] == "Failed"
    assert len(run["error"]["message"]) < MAX_ERROR_CHARS + 100
    assert "characters cut" in run["error"]["message"]
    assert len(run["error"]["stack"]) < MAX_ERROR_CHARS + 100
    run = await run_of(http, server, "odd/unprintable")
    assert run["error"] == {**run["error"], "name": "Unprintable",
                            "message": "<Unprintable: str() failed>"}
    status, doc = await get_json(http, server, "/api/runs", limit="10")
    assert status == 200
    for summary in doc["runs"]:
        async with http.get(f"{server.url}/runs/{summary['run_id']}") as resp:
            assert resp.status == 200
            page = await resp.text()
        if summary["function_id"] == "odd-surrogate-step":
            assert "\\ud800" in page
