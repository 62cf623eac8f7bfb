"""Durable runs on a real server: every step kind, filters, cancellation, lifecycle events, cron,
and the virtual clock that runs hours of sleeps and backoff in milliseconds."""

from __future__ import annotations

import datetime as dt
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.clock import VirtualClock

from .helpers import (
    MakeServer,
    eventually,
    get_json,
    idle,
    run_doc,
    runs_of_event,
    send,
    session_doc,
    the_run,
)

pytestmark = pytest.mark.asyncio
HOUR_MS = 3_600_000


async def test_an_hour_of_sleep_and_inngest_backoff_take_no_wall_time(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("slow")
    calls = {"n": 0}

    @app.function(trigger="app/go")  # default: 4 retries with Inngest's backoff
    async def fn(ctx: devserver.Context) -> int:
        await ctx.step.sleep("nap", "1h")
        calls["n"] += 1
        if calls["n"] < 5:
            raise RuntimeError(f"attempt {ctx.attempt}")
        return ctx.attempt

    clock = VirtualClock(start_ms=1_800_000_000_000)
    server = await make_server(app, retry_interval=None, clock=clock)
    run = await the_run(http, server, await send(http, server, "app/go"))
    await idle(server)
    run = await run_doc(http, server, run["run_id"])
    assert run["status"] == "Completed"
    assert run["output"] == 4
    # 1 h of sleep, then 15 s + 30 s + 1 min + 2 min of backoff, each with up to 30 s jitter.
    elapsed = clock.now_ms() - 1_800_000_000_000
    assert HOUR_MS + 225_000 <= elapsed <= HOUR_MS + 225_000 + 4 * 30_000
    nap = [s for s in run["steps"] if s["step_id"] == "nap"]
    assert [(s["kind"], s["status"]) for s in nap] == [("sleep", "Completed")]
    assert nap[0]["duration_ms"] == HOUR_MS


async def test_sleep_until_and_sync_sleep(make_server: MakeServer, http: aiohttp.ClientSession
                                          ) -> None:
    app = devserver.App("until")
    start = 1_800_000_000_000
    wake = dt.datetime.fromtimestamp(start / 1000 + 86400, tz=dt.UTC)

    @app.function(trigger="app/until")
    async def until(ctx: devserver.Context) -> int:
        await ctx.step.sleep_until("tomorrow", wake)
        return 1

    @app.function(trigger="app/sync")
    def sync_sleeper(ctx: devserver.Context) -> int:
        ctx.step.sleep("short", dt.timedelta(minutes=5))
        return 2

    clock = VirtualClock(start_ms=start)
    server = await make_server(app, clock=clock)
    first = await send(http, server, "app/until")
    second = await send(http, server, "app/sync")
    await idle(server)
    assert (await the_run(http, server, first))["output"] == 1
    assert (await the_run(http, server, second))["output"] == 2
    assert clock.now_ms() == start + 86_400_000


async def test_bad_durations_fail_the_run_clearly(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("bad")

    @app.function(trigger="app/go", retries=0)
    async def fn(ctx: devserver.Context) -> None:
        await ctx.step.sleep("nap", "soon")

    server = await make_server(app, clock=VirtualClock())
    event_id = await send(http, server, "app/go")
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Failed"
    assert "not a duration: 'soon'" in run["error"]["message"]


async def test_send_event_inherits_sessions_and_runs_exactly_once(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("chain")
    sent: list[list[str]] = []
    children: list[dict[str, str]] = []

    @app.function(trigger="app/parent", retries=2)
    async def parent(ctx: devserver.Context) -> list[str]:
        ids = await ctx.step.send_event("notify", [
            {"name": "app/child", "data": {"n": 1}},
            {"name": "app/child", "data": {"n": 2}, "sessions": {"other": "x"}},
        ])
        sent.append(ids)
        if ctx.attempt == 0:
            raise RuntimeError("retry after sending")  # the send must not repeat
        return ids

    @app.function(trigger="app/child")
    async def child(ctx: devserver.Context) -> int:
        children.append(ctx.sessions)
        return int(ctx.event.data["n"])

    server = await make_server(app)
    run = await the_run(http, server, await send(http, server, "app/parent",
                                                 sessions={"conversation_id": "c1"}))
    await idle(server)
    run = await run_doc(http, server, run["run_id"])
    assert run["status"] == "Completed"
    assert sent[0] == sent[1] == run["output"]
    assert len(run["output"]) == 2
    assert sorted(children, key=repr) == [{"conversation_id": "c1"}, {"other": "x"}]
    figures = await session_doc(http, server, "conversation_id", "c1")
    assert figures["stats"]["runs"] == 2
    assert figures["stats"]["functions"] == ["chain-child", "chain-parent"]
    for event_id in run["output"]:
        status, body = await get_json(http, server, f"/v1/events/{event_id}")
        assert status == 200
        assert body["data"]["name"] == "app/child"


async def test_send_event_with_an_invalid_event_fails_the_step(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("badsend")

    @app.function(trigger="app/go", retries=3)
    async def fn(ctx: devserver.Context) -> None:
        await ctx.step.send_event("oops", {"name": "inngest/nope"})

    server = await make_server(app)
    event_id = await send(http, server, "app/go")
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Failed"
    assert "reserved" in run["error"]["message"]
    assert len([s for s in run["steps"] if s["step_id"] == "oops"]) == 1


async def test_wait_for_event_matches_later_events_by_condition(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("waiter")

    @app.function(trigger="app/order.created")
    async def fn(ctx: devserver.Context) -> Any:
        paid = await ctx.step.wait_for_event(
            "paid", event="app/order.paid", timeout="1d",
            if_="async.data.order == event.data.order")
        return None if paid is None else paid.data

    server = await make_server(app, clock=VirtualClock())
    early = await send(http, server, "app/order.paid", {"order": 1, "early": True})
    assert early
    event_id = await send(http, server, "app/order.created", {"order": 1})

    async def waiting() -> bool:
        runs = await runs_of_event(http, server, event_id)
        run = await run_doc(http, server, runs[0]["run_id"])
        return any(s["status"] == "Waiting" for s in run["steps"])

    await eventually(waiting, "the run to wait for app/order.paid")
    await send(http, server, "app/order.paid", {"order": 2})  # another order: no match
    await send(http, server, "app/order.paid", {"order": 1, "amount": 5})
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Completed"
    assert run["output"] == {"order": 1, "amount": 5}
    (paid,) = [s for s in run["steps"] if s["step_id"] == "paid"]
    assert paid["kind"] == "wait_for_event"
    assert paid["output"]["name"] == "app/order.paid"


async def test_wait_for_event_times_out_with_none(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("timeout")

    @app.function(trigger="app/go")
    def fn(ctx: devserver.Context) -> str:
        got = ctx.step.wait_for_event("reply", event="app/reply", timeout="2h", match="data.id")
        return "timed out" if got is None else "got it"

    clock = VirtualClock(start_ms=1_800_000_000_000)
    server = await make_server(app, clock=clock)
    event_id = await send(http, server, "app/go", {"id": 1})
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["output"] == "timed out"
    assert clock.now_ms() == 1_800_000_000_000 + 2 * HOUR_MS


async def test_invoke_returns_the_child_output_or_raises_its_error(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("inv")

    @app.function(trigger="app/never")
    async def double(ctx: devserver.Context) -> int:
        assert ctx.event.name == "inngest/function.invoked"
        return int(ctx.event.data["x"]) * 2

    @app.function(trigger="app/never", retries=0)
    async def broken(ctx: devserver.Context) -> None:
        raise ValueError("child broke")

    @app.function(trigger="app/parent")
    async def parent(ctx: devserver.Context) -> dict[str, Any]:
        doubled = await ctx.step.invoke("double", function=double, data={"x": 21})
        try:
            await ctx.step.invoke("broken", function="inv-broken")
        except devserver.StepError as exc:
            return {"doubled": doubled, "error": exc.name, "message": exc.message}
        return {"doubled": doubled}

    server = await make_server(app)
    event_id = await send(http, server, "app/parent", sessions={"user": "u1"})
    await idle(server)
    run = await the_run(http, server, event_id)
    assert run["status"] == "Completed"
    assert run["output"] == {"doubled": 42, "error": "ValueError", "message": "child broke"}
    figures = await session_doc(http, server, "user", "u1")
    assert figures["stats"]["runs"] == 3
    assert figures["stats"]["failed_runs"] == 1
    assert figures["stats"]["functions"] == ["inv-broken", "inv-double", "inv-parent"]


async def test_trigger_filter_expressions(make_server: MakeServer, http: aiohttp.ClientSession
                                          ) -> None:
    app = devserver.App("filter")

    @app.function(trigger=devserver.TriggerEvent("app/paid", expression="event.data.amount > 10"))
    async def big(ctx: devserver.Context) -> None:
        return None

    server = await make_server(app)
    ids = [await send(http, server, "app/paid", {"amount": amount}) for amount in (5, 50)]
    ids.append(await send(http, server, "app/paid", {}))  # missing field: no match, no error
    await idle(server)
    assert [len(await runs_of_event(http, server, i)) for i in ids] == [0, 1, 0]


async def test_cancel_on_and_cancel_through_the_api(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("cancel")

    @app.function(trigger="app/job.started",
                  cancel_on=devserver.Cancel("app/job.stopped", "async.data.job == event.data.job"))
    async def job(ctx: devserver.Context) -> str:
        await ctx.step.sleep("wait", "1h")
        return "done"

    server = await make_server(app, clock=VirtualClock())
    one = await send(http, server, "app/job.started", {"job": 1}, sessions={"team": "t"})
    two = await send(http, server, "app/job.started", {"job": 2}, sessions={"team": "t"})
    three = await send(http, server, "app/job.started", {"job": 3}, sessions={"team": "t"})

    async def all_sleeping() -> bool:
        for event_id in (one, two, three):
            run = await the_run(http, server, event_id)
            if not any(s["status"] == "Waiting" for s in run["steps"]):
                return False
        return True

    await eventually(all_sleeping, "three sleeping runs")
    await send(http, server, "app/job.stopped", {"job": 1})
    run_two = (await runs_of_event(http, server, two))[0]["run_id"]
    async with http.delete(f"{server.url}/v1/runs/{run_two}") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"]["status"] == "Cancelled"
    async with http.delete(f"{server.url}/v1/runs/01ZZZZZZZZZZZZZZZZZZZZZZZZ") as resp:
        assert resp.status == 404
    await idle(server)
    statuses = [(await the_run(http, server, e))["status"] for e in (one, two, three)]
    assert statuses == ["Cancelled", "Cancelled", "Completed"]
    cancelled = await the_run(http, server, one)
    assert [s["status"] for s in cancelled["steps"]] == ["Cancelled"]
    figures = await session_doc(http, server, "team", "t")
    assert figures["stats"]["runs"] == 3
    assert figures["stats"]["failed_runs"] == 0


async def test_on_failure_and_lifecycle_events_carry_the_sessions(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("life")
    seen: list[dict[str, Any]] = []

    async def report(ctx: devserver.Context) -> str:
        seen.append({"name": ctx.event.name, "sessions": ctx.sessions,
                     "error": ctx.event.data["error"]["message"],
                     "original": ctx.event.data["event"]["name"]})
        return "reported"

    @app.function(trigger="app/go", retries=1, on_failure=report)
    async def flaky(ctx: devserver.Context) -> None:
        raise ValueError("always")

    @app.function(trigger="inngest/function.finished")
    async def audit(ctx: devserver.Context) -> str:
        return f"{ctx.event.data['function_id']} finished"

    server = await make_server(app)
    event_id = await send(http, server, "app/go", sessions={"conversation_id": "c9"})
    await idle(server)
    assert (await the_run(http, server, event_id))["status"] == "Failed"
    assert seen == [{"name": "inngest/function.failed", "sessions": {"conversation_id": "c9"},
                     "error": "always", "original": "app/go"}]
    figures = await session_doc(http, server, "conversation_id", "c9")
    # the failing run, its on_failure handler, and audit runs for both (never for itself)
    assert figures["stats"]["functions"] == ["life-audit", "life-flaky", "life-flaky-failure"]
    assert figures["stats"]["runs"] == 4
    assert figures["stats"]["failed_runs"] == 1


async def test_cron_functions_fire_on_the_clock(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("cron")

    @app.function(trigger=devserver.TriggerCron("*/5 * * * *"))
    async def tick(ctx: devserver.Context) -> str:
        return str(ctx.event.data["cron"])

    start = int(dt.datetime(2030, 1, 1, 0, 1, tzinfo=dt.UTC).timestamp() * 1000)
    clock = VirtualClock(start_ms=start)
    server = await make_server(app, clock=clock)
    clock.advance(12 * 60_000)  # 00:05 and 00:10

    async def two_runs() -> bool:
        status, body = await get_json(http, server, "/api/runs", function_id="cron-tick",
                                      status="Completed")
        return status == 200 and len(body["runs"]) == 2

    await eventually(two_runs, "two cron runs")
    _, body = await get_json(http, server, "/api/runs", function_id="cron-tick")
    assert len(body["runs"]) == 2
    stamps = []
    for run in reversed(body["runs"]):
        assert run["event_name"] == "inngest/scheduled.timer"
        assert (await run_doc(http, server, run["run_id"]))["output"] == "*/5 * * * *"
        _, event = await get_json(http, server, f"/v1/events/{run['event_id']}")
        stamps.append(event["data"]["ts"])
    assert stamps == [start + 4 * 60_000, start + 9 * 60_000]
