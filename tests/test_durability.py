"""Durability and the development loop, with real processes: SIGKILL mid-run then resume, and
hot reload of an app file while the server runs."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .helpers import eventually_sync
from .procs import RUN_TIMEOUT, Devserver, Spawn

pytestmark = pytest.mark.slow  # devserver children: SIGKILL, restart, hot reload

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
    # The kill must come after the first step is committed, not merely after its side effect
    # (the step's result is written after the effect): then it must never run again.
    run_id = eventually_sync(lambda: server.get(f"/v1/events/{event_id}/runs")["data"],
                             "the run to start", RUN_TIMEOUT)[0]["run_id"]

    def first_committed() -> bool:
        steps = server.get(f"/api/runs/{run_id}")["steps"]
        return any(s["step_id"] == "first" and s["status"] == "Completed" for s in steps)

    eventually_sync(first_committed, "the first step to be committed", RUN_TIMEOUT)
    server.stop(signal.SIGKILL)
    assert effects.read_text().split() == ["first"]

    restarted = start(spawn, tmp_path, *args)
    assert [r["run_id"] for r in restarted.get(f"/v1/events/{event_id}/runs")["data"]] == [run_id]

    def finished() -> Any:
        run = restarted.get(f"/api/runs/{run_id}")
        return run if run["status"] in ("Completed", "Failed", "Cancelled") else None

    run = eventually_sync(finished, "the resumed run to finish", 3 * RUN_TIMEOUT)
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

        return eventually_sync(output, "the ping run", RUN_TIMEOUT)

    assert answer() == "v1"
    app.write_text(RELOAD_APP.replace("VERSION", "v2"))
    eventually_sync(lambda: answer() == "v2", "new runs to use the edited code", RUN_TIMEOUT)

    app.write_text(RELOAD_APP.replace("VERSION", "v3") + "\nthis is not python(\n")
    status = eventually_sync(
        lambda: (s := server.get("/api/status")["reload"]) and not s["ok"] and s,
        "the broken edit to be reported", RUN_TIMEOUT)
    assert "SyntaxError" in status["error"]
    assert "hot_app.py" in status["error"]
    assert answer() == "v2"  # the last good code still runs

    app.write_text(RELOAD_APP.replace("VERSION", "v4"))
    eventually_sync(lambda: server.get("/api/status")["reload"]["ok"], "the fix", RUN_TIMEOUT)
    assert answer() == "v4"
    assert server.proc.poll() is None
