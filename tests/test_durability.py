"""Durability and the development loop, with real processes: SIGKILL mid-run then resume, and
hot reload of an app file while the server runs."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from .procs import RUN_TIMEOUT, Devserver, Spawn

DURABLE_APP = textwrap.dedent(
    """
    import os
    import devserver

    app = devserver.App("dur")


    def effect(name):
        with open(os.environ["SIDE_EFFECTS"], "a") as log:
            log.write(name + "\\n")
        return name


    @app.function(trigger="app/start", retries=0)
    async def parent(ctx):
        first = await ctx.step.run("first", effect, "first")
        await ctx.step.sleep("pause", "1500ms")
        second = await ctx.step.run("second", effect, "second")
        await ctx.step.send_event("ask", {"name": "app/question",
                                          "data": {"job": ctx.event.data["job"]}})
        reply = await ctx.step.wait_for_event("reply", event="app/answer", timeout="30s",
                                              match="data.job")
        return [first, second, reply and reply.data["answer"]]


    @app.function(trigger="app/question", retries=0)
    async def child(ctx):
        answer = await ctx.step.run("think", effect, "child")
        await ctx.step.send_event("answer", {"name": "app/answer",
                                             "data": {"job": ctx.event.data["job"],
                                                      "answer": answer}})
    """
)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """Poll `predicate()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # poll interval, not a synchronisation point


def start(spawn: Spawn, tmp_path: Path, *args: str) -> Devserver:
    child = spawn("--port", "0", "--db", str(tmp_path / "db.sqlite3"), *args)
    child.wait_banner()
    return child


def test_sigkill_between_steps_then_restart_resumes_exactly_once(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    effects = tmp_path / "effects.log"
    monkeypatch.setenv("SIDE_EFFECTS", str(effects))
    app = tmp_path / "durable_app.py"
    app.write_text(DURABLE_APP)
    args = ("--app", str(app), "--no-reload")
    server = start(spawn, tmp_path, *args)
    (event_id,) = server.send({"name": "app/start", "data": {"job": "j1"},
                               "sessions": {"conversation_id": "conv_9"}})
    wait_for(lambda: effects.exists() and "first" in effects.read_text(), RUN_TIMEOUT,
             "the first step to commit its side effect")
    server.stop(signal.SIGKILL)

    restarted = start(spawn, tmp_path, *args)
    run_id = restarted.get(f"/v1/events/{event_id}/runs")["data"][0]["run_id"]

    def finished() -> Any:
        run = restarted.get(f"/api/runs/{run_id}")
        return run if run["status"] in ("Completed", "Failed", "Cancelled") else None

    run = wait_for(finished, 3 * RUN_TIMEOUT, "the resumed run to finish")
    assert run["status"] == "Completed", run
    assert run["output"] == ["first", "second", "child"]
    assert sorted(effects.read_text().split()) == ["child", "first", "second"]
    pauses = [s for s in run["steps"] if s["step_id"] == "pause"]
    assert len(pauses) == 1  # one sleep, with the wake time it was given before the kill
    assert pauses[0]["status"] == "Completed"
    assert pauses[0]["duration_ms"] >= 1500

    figures = restarted.get("/api/session", identifier="conversation_id", value="conv_9")
    assert figures["stats"]["runs"] == 2
    assert figures["stats"]["failed_runs"] == 0
    assert figures["stats"]["functions"] == ["dur-child", "dur-parent"]
    assert all(r["status"] == "Completed" for r in figures["runs"])
    assert restarted.get("/api/runs", status="Running")["runs"] == []


RELOAD_APP = textwrap.dedent(
    """
    import devserver

    app = devserver.App("hot")


    @app.function(trigger="app/ping", retries=0)
    async def ping(ctx):
        return "VERSION"
    """
)


def test_editing_the_app_reloads_it_and_a_broken_edit_keeps_the_last_good_code(
    spawn: Spawn, tmp_path: Path
) -> None:
    app = tmp_path / "hot_app.py"
    app.write_text(RELOAD_APP.replace("VERSION", "v1"))
    server = start(spawn, tmp_path, "--app", str(app))  # reload is on by default with --app
    assert any("reload" in line and "on" in line for line in server.banner)

    def answer() -> Any:
        (event_id,) = server.send({"name": "app/ping"})

        def output() -> Any:
            runs = server.get(f"/v1/events/{event_id}/runs")["data"]
            return runs and runs[0]["status"] == "Completed" and runs[0]["output"]

        return wait_for(output, RUN_TIMEOUT, "the ping run")

    assert answer() == "v1"
    app.write_text(RELOAD_APP.replace("VERSION", "v2"))
    wait_for(lambda: answer() == "v2", RUN_TIMEOUT, "new runs to use the edited code")

    app.write_text(RELOAD_APP.replace("VERSION", "v3") + "\nthis is not python(\n")
    status = wait_for(lambda: (s := server.get("/api/status")["reload"]) and not s["ok"] and s,
                      RUN_TIMEOUT, "the broken edit to be reported")
    assert "SyntaxError" in status["error"]
    assert "hot_app.py" in status["error"]
    assert answer() == "v2"  # the last good code still runs

    app.write_text(RELOAD_APP.replace("VERSION", "v4"))
    wait_for(lambda: server.get("/api/status")["reload"]["ok"], RUN_TIMEOUT, "the fix")
    assert answer() == "v4"
    assert server.proc.poll() is None
