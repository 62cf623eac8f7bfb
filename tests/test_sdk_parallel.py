"""Parallel steps of a real Inngest Python SDK app (inngest 0.5.19 on Flask, 127.0.0.1) as
Inngest runs them: planned steps called at once, each with the memo of its planning; the
discovery after a group allowed to run steps immediately again; race mode; a planned step
committed mid-group surviving a devserver restart. And a memo of over 10 MiB reaching the app
(Flask limited to 8 MiB bodies) through `use_api`.

The steps synchronise on barriers with timeouts, never on sleeps: a step that waits for its
siblings can only pass if they run at the same time.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import flask
import pytest
import pytest_asyncio

from devserver.web.server import Server

from .helpers import (
    ServedFlask,
    close_sdk_client,
    eventually,
    free_port,
    idle,
    run_doc,
    runs_of_event,
    sdk_server,
    the_run,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pydantic v1-style models
    import inngest
    import inngest.flask

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
BARRIER_TIMEOUT = 20.0
BIG_STEP = int(3.5 * 1024 * 1024)
"""Three steps of this many bytes make a memo of over 10 MiB."""
BODY_LIMIT = 8 * 1024 * 1024
"""What the app accepts (Flask's MAX_CONTENT_LENGTH), as a framework's body limit would."""


def _hash(step_id: str) -> str:
    return hashlib.sha1(step_id.encode()).hexdigest()


class ParallelApp:
    """A Flask app serving the parallel functions; `calls` is what each call carried."""

    def __init__(self, base_url: str) -> None:
        self.calls: list[dict[str, Any]] = []
        self.parts = threading.Barrier(3, timeout=BARRIER_TIMEOUT)
        self.a2_started = threading.Event()
        self.release = threading.Event()
        self.ran = {"quick": 0, "held": 0}
        self.client = inngest.Inngest(app_id="par", is_production=False,
                                      api_base_url=base_url, event_api_base_url=base_url)
        self.flask = flask.Flask("par")
        self.flask.config["MAX_CONTENT_LENGTH"] = BODY_LIMIT
        self.flask.before_request(self._record)
        inngest.flask.serve(self.flask, self.client, self._functions())
        self._served = ServedFlask(self.flask, "flask-parallel-app", 0)

    @property
    def url(self) -> str:
        return self._served.url

    def _record(self) -> None:
        if flask.request.method != "POST":
            return
        body = flask.request.get_json(silent=True) or {}
        self.calls.append({
            "fn": flask.request.args.get("fnId"), "step": flask.request.args.get("stepId"),
            "disable": body.get("ctx", {}).get("disable_immediate_execution"),
            "steps": sorted(body.get("steps") or {}), "use_api": body.get("use_api")})

    def _functions(self) -> list[inngest.Function[Any]]:
        client = self.client

        def part(name: str) -> Any:
            def run() -> str:
                self.parts.wait()  # passes only when all three parts run at once
                return name
            return run

        @client.create_function(fn_id="fan-out", retries=0,
                                trigger=inngest.TriggerEvent(event="par/fan-out"))
        def fan_out(ctx: inngest.ContextSync) -> dict[str, Any]:
            parts = ctx.group.parallel(tuple(
                (lambda name=name: ctx.step.run(f"part-{name}", part(name))) for name in "abc"))
            joined = ctx.step.run("join", lambda: "".join(parts))
            return {"parts": list(parts), "joined": joined}

        def a2() -> str:
            self.a2_started.set()
            return "a2"

        def b1() -> str:
            # Passes only if "a2" (after "a1", in the other branch) runs while "b1" still does.
            if not self.a2_started.wait(BARRIER_TIMEOUT):
                raise RuntimeError("a2 never started while b1 ran")
            return "b1"

        @client.create_function(fn_id="racer", retries=0,
                                trigger=inngest.TriggerEvent(event="par/race"))
        def racer(ctx: inngest.ContextSync) -> list[Any]:
            def branch_a() -> str:
                ctx.step.run("a1", lambda: "a1")
                return ctx.step.run("a2", a2)
            out = ctx.group.parallel((branch_a, lambda: ctx.step.run("b1", b1)),
                                     parallel_mode=inngest.ParallelMode.RACE)
            return list(out)

        @client.create_function(fn_id="big", retries=0,
                                trigger=inngest.TriggerEvent(event="par/big"))
        def big(ctx: inngest.ContextSync) -> list[str]:
            chunks = [ctx.step.run(name, lambda name=name: name[0] * BIG_STEP)
                      for name in ("one", "two", "three")]
            return ctx.step.run("sizes", lambda: [f"{c[0]}:{len(c)}" for c in chunks])

        def quick() -> str:
            self.ran["quick"] += 1
            return "quick"

        def held() -> str:
            self.ran["held"] += 1
            if not self.release.wait(BARRIER_TIMEOUT):
                raise RuntimeError("never released")
            return "held"

        @client.create_function(fn_id="held-group", retries=0,
                                trigger=inngest.TriggerEvent(event="par/held"))
        def held_group(ctx: inngest.ContextSync) -> list[str]:
            return list(ctx.group.parallel((lambda: ctx.step.run("quick", quick),
                                            lambda: ctx.step.run("held", held))))

        return [fan_out, racer, big, held_group]

    async def close(self) -> None:
        self.parts.abort()
        self.a2_started.set()
        self.release.set()
        self._served.stop()
        await close_sdk_client(self.client)


@pytest_asyncio.fixture
async def server_and_app(tmp_path: Any) -> AsyncIterator[tuple[Server, ParallelApp]]:
    async with sdk_server(tmp_path) as server:
        app = ParallelApp(server.url)
        try:
            result = await server.sdk.sync(app.url)
            assert result.ok, result
            yield server, app
        finally:
            await app.close()


async def test_planned_steps_run_at_once_each_with_the_memo_of_their_planning(
    server_and_app: tuple[Server, ParallelApp], http: aiohttp.ClientSession,
) -> None:
    server, app = server_and_app
    [event_id] = await app.client.send(inngest.Event(name="par/fan-out"))
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Completed", run
    assert run["output"] == {"parts": ["a", "b", "c"], "joined": "abc"}
    assert sorted(s["step_id"] for s in run["steps"][:3]) == ["part-a", "part-b", "part-c"]
    assert run["steps"][3]["step_id"] == "join"

    parts = [_hash(f"part-{p}") for p in "abc"]
    discovery, *planned, after, last = app.calls
    assert (discovery["step"], discovery["disable"], discovery["steps"]) == ("step", False, [])
    assert sorted(c["step"] for c in planned) == sorted(parts)
    assert all(c["disable"] is True and c["steps"] == [] for c in planned)
    # The discovery after the group may run a step at once again: it runs "join" itself.
    assert (after["step"], after["disable"], after["steps"]) == ("step", False, sorted(parts))
    assert last["step"] == "step"
    assert last["steps"] == sorted([*parts, _hash("join")])
    assert all(c["use_api"] is False for c in app.calls)


async def test_race_mode_lets_a_branch_go_on_while_its_sibling_runs(
    server_and_app: tuple[Server, ParallelApp], http: aiohttp.ClientSession,
) -> None:
    server, app = server_and_app
    [event_id] = await app.client.send(inngest.Event(name="par/race"))
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Completed", run
    assert run["output"] == ["a2", "b1"]
    done = {s["step_id"]: s for s in run["steps"]}
    assert {k: v["status"] for k, v in done.items()} == {
        "a1": "Completed", "a2": "Completed", "b1": "Completed"}
    assert done["b1"]["ended_at"] >= done["a2"]["started_at"]


async def test_a_memo_over_10_mib_reaches_an_app_with_an_8_mib_body_limit_through_the_api(
    server_and_app: tuple[Server, ParallelApp], http: aiohttp.ClientSession,
) -> None:
    server, app = server_and_app
    [event_id] = await app.client.send(inngest.Event(name="par/big"))
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Completed", run["error"]
    assert run["output"] == [f"o:{BIG_STEP}", f"t:{BIG_STEP}", f"t:{BIG_STEP}"]
    # Once the memo passes 4 MiB the calls leave it out, say use_api, and the SDK fetches it
    # from /v0/runs/{id}/actions (and the events from /batch).
    assert [c["use_api"] for c in app.calls] == [False, False, True, True, True]
    assert app.calls[-1]["steps"] == []


async def test_a_finished_planned_step_survives_a_devserver_restart_mid_group(
    tmp_path: Any, http: aiohttp.ClientSession,
) -> None:
    port = free_port()  # the same URL for both servers: the app knows only that one
    app = ParallelApp(f"http://127.0.0.1:{port}")
    try:
        async with sdk_server(tmp_path, port=port) as server:
            assert (await server.sdk.sync(app.url)).ok
            [event_id] = await app.client.send(inngest.Event(name="par/held"))
            [listed] = await runs_of_event(http, server, event_id)

            async def quick_committed() -> bool:
                steps = (await run_doc(http, server, listed["run_id"]))["steps"]
                return any(s["step_id"] == "quick" and s["status"] == "Completed"
                           for s in steps)
            # Committed as its call answered, while "held", planned beside it, still runs.
            await eventually(quick_committed, "quick to commit while held runs")
        app.release.set()
        async with sdk_server(tmp_path, port=port, sdk_urls=[app.url]) as server:
            await server.sdk.wait_synced()

            async def finished() -> dict[str, Any] | None:
                run = await run_doc(http, server, listed["run_id"])
                return run if run["status"] != "Running" else None
            run = await eventually(finished, "the resumed run to finish")
        assert (run["status"], run["output"]) == ("Completed", ["quick", "held"]), run
        assert app.ran == {"quick": 1, "held": 2}  # only the unfinished step ran again
    finally:
        await app.close()
