"""Flow control of local functions (SPEC 3.3), on virtual time: debounce, batching, singleton,
rate limit, idempotency, throttle, concurrency, priority and timeouts, what each says on the
event and run documents, and pending debounces and batches across a restart.

Each test starts a real server on port 0 with its own SQLite file and drives it over HTTP.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.cli import main as cli
from devserver.clock import VirtualClock
from devserver.testing import DevServer
from devserver.web.server import Server

from .helpers import (
    MakeServer,
    eventually,
    get,
    idle,
    run_doc,
    runs_of_event,
    runs_of_function,
    send,
)

T0 = 1_700_000_000_000


async def event_flow(http: aiohttp.ClientSession, server: Server,
                     event_id: str) -> list[dict[str, Any]]:
    return list((await get(http, server, f"/api/events/{event_id}"))["flow"])


async def runs(http: aiohttp.ClientSession, server: Server, fn: str) -> list[dict[str, Any]]:
    """Full run documents of a function, oldest first."""
    return [await run_doc(http, server, r["run_id"])
            for r in reversed(await runs_of_function(http, server, fn))]


# ---------------------------------------------------------------------------------------------
# Debounce


@pytest.mark.asyncio
async def test_debounce_runs_once_with_the_last_event_per_key(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")
    seen: list[tuple[str, int]] = []

    @app.function(trigger="cart/updated",
                  debounce=devserver.Debounce(period=dt.timedelta(hours=1),
                                              key="event.data.user"))
    async def save(ctx: devserver.Context) -> int:
        seen.append((ctx.event.data["user"], ctx.event.data["n"]))
        return len(ctx.events)

    clock = VirtualClock(T0)
    server = await make_server(app, clock=clock)
    ids = []
    for n in range(3):
        ids.append(await send(http, server, "cart/updated", {"user": "u1", "n": n}))
        clock.advance(10 * 60_000)  # 10 minutes apart: each one resets the period
    other = await send(http, server, "cart/updated", {"user": "u2", "n": 9})
    await idle(server)
    assert sorted(seen) == [("u1", 2), ("u2", 9)]
    done = await runs(http, server, "shop-save")
    by_user = {r["events"][0]["data"]["user"]: r for r in done}
    assert by_user["u1"]["output"] == 1
    assert by_user["u1"]["flow"]["started"].startswith("debounced")
    assert by_user["u1"]["status"] == "Completed"
    # The last event of u1 arrived at T0 + 20 min: the run waited a full hour after it.
    assert by_user["u1"]["queued_at"] == dt.datetime.fromtimestamp(
        (T0 + 80 * 60_000) / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
    for event_id in ids:
        (outcome,) = await event_flow(http, server, event_id)
        assert outcome["action"] == "debounced"
        assert outcome["run_id"] == by_user["u1"]["run_id"]
    assert (await event_flow(http, server, other))[0]["run_id"] == by_user["u2"]["run_id"]


@pytest.mark.asyncio
async def test_debounce_timeout_caps_the_wait(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")

    @app.function(trigger="cart/updated",
                  debounce=devserver.Debounce(period="1h", timeout="2h"))
    async def save(ctx: devserver.Context) -> Any:
        return ctx.event.data["n"]

    clock = VirtualClock(T0)
    server = await make_server(app, clock=clock)
    for n in range(6):  # every 30 min for 2.5 h: the period never passes, the timeout does
        await send(http, server, "cart/updated", {"n": n})
        clock.advance(30 * 60_000)
        await asyncio.sleep(0)
        await server.runner.wait_idle(skip_time=False)
    await idle(server)
    done = await runs(http, server, "shop-save")
    # Fired 2 h after the first event with the last one by then (1 h 30), then once more
    # for the events after it.
    assert [r["output"] for r in done] == [3, 5]
    fired = dt.datetime.fromtimestamp((T0 + 2 * 3_600_000) / 1000, tz=dt.UTC)
    assert done[0]["queued_at"].startswith(fired.strftime("%Y-%m-%dT%H:%M"))


# ---------------------------------------------------------------------------------------------
# Batching


@pytest.mark.asyncio
async def test_batch_runs_full_batches_at_once_and_the_rest_at_the_timeout(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")
    seen: list[tuple[list[int], dict[str, str]]] = []

    @app.function(trigger="order/placed",
                  batch_events=devserver.Batch(max_size=3, timeout="10m"))
    async def ship(ctx: devserver.Context) -> list[int]:
        numbers = [e.data["n"] for e in ctx.events]
        seen.append((numbers, dict(ctx.sessions)))
        assert ctx.event.data["n"] == numbers[0]
        return numbers

    clock = VirtualClock(T0)
    server = await make_server(app, clock=clock)
    ids = []
    for n in range(7):
        ids.append(await send(http, server, "order/placed", {"n": n},
                              sessions={"shop": "s1", "user": f"u{n % 2}"}))
    await server.runner.wait_idle(skip_time=False)
    assert sorted(x for x, _ in seen) == [[0, 1, 2], [3, 4, 5]]  # no time has passed
    await idle(server)  # the 10 minute timeout passes at once
    assert sorted(x for x, _ in seen) == [[0, 1, 2], [3, 4, 5], [6]]
    # ctx.sessions: what all of a batch's events agree on.
    assert dict((tuple(x), s) for x, s in seen)[(0, 1, 2)] == {"shop": "s1"}
    assert dict((tuple(x), s) for x, s in seen)[(6,)] == {"shop": "s1", "user": "u0"}
    done = await runs(http, server, "shop-ship")
    assert [len(r["events"]) for r in done] == [3, 3, 1]
    assert "the batch was full" in done[0]["flow"]["started"]
    assert "timeout" in done[2]["flow"]["started"]
    first = done[0]
    assert [e["internal_id"] for e in first["events"]] == ids[:3]
    for event_id in ids[:3]:
        (outcome,) = await event_flow(http, server, event_id)
        assert (outcome["action"], outcome["run_id"]) == ("batched", first["run_id"])
        # Every event of a batch lists the run among those it started.
        assert [r["run_id"] for r in await runs_of_event(http, server, event_id)] == [
            first["run_id"]]
    # The events list and GraphQL's stream too (one read for a page of events).
    listed = {e["internal_id"]: [r["run_id"] for r in e["runs"]]
              for e in (await get(http, server, "/api/events"))["events"]}
    async with http.post(f"{server.url}/v0/gql", json={
            "query": "{ stream(query: {limit: 20}) { id runs { id } } }"}) as resp:
        stream = {i["id"]: [r["id"] for r in i["runs"]]
                  for i in (await resp.json())["data"]["stream"]}
    for event_id in ids[:3]:
        assert listed[event_id] == stream[event_id] == [first["run_id"]]
    # A batched run counts once in each session any of its events carries.
    figures = {}
    for ident, value in [("shop", "s1"), ("user", "u0"), ("user", "u1")]:
        doc = await get(http, server, "/api/session", identifier=ident, value=value)
        figures[value] = (doc["stats"]["runs"], len(doc["runs"]))
    assert figures == {"s1": (3, 3), "u0": (3, 3), "u1": (2, 2)}


@pytest.mark.asyncio
async def test_batch_key_and_if(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    app = devserver.App("shop")
    seen: list[list[int]] = []

    @app.function(trigger="order/placed", batch_events=devserver.Batch(
        max_size=10, timeout="1m", key="event.data.user", if_="event.data.n < 100"))
    async def ship(ctx: devserver.Context) -> None:
        seen.append(sorted(e.data["n"] for e in ctx.events))

    server = await make_server(app, clock=VirtualClock(T0))
    for n, user in [(1, "a"), (2, "b"), (3, "a"), (500, "a"), (4, "b")]:
        await send(http, server, "order/placed", {"n": n, "user": user})
    await idle(server)
    assert sorted(seen) == [[1, 3], [2, 4], [500]]


# ---------------------------------------------------------------------------------------------
# Singleton, rate limit, idempotency


@pytest.mark.asyncio
async def test_singleton_skip_drops_events_while_a_run_is_live(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")

    @app.function(trigger="report/asked", singleton=devserver.Singleton(
        key="event.data.user", mode="skip"))
    async def report(ctx: devserver.Context) -> Any:
        await ctx.step.sleep("slow", "1h")
        return ctx.event.data["n"]

    clock = VirtualClock(T0)
    server = await make_server(app, clock=clock)
    first = await send(http, server, "report/asked", {"user": "a", "n": 1})
    await server.runner.wait_idle(skip_time=False)  # the run sleeps
    skipped = await send(http, server, "report/asked", {"user": "a", "n": 2})
    other = await send(http, server, "report/asked", {"user": "b", "n": 3})
    await idle(server)
    later = await send(http, server, "report/asked", {"user": "a", "n": 4})
    await idle(server)
    assert sorted(r["output"] for r in await runs(http, server, "shop-report")) == [1, 3, 4]
    (outcome,) = await event_flow(http, server, skipped)
    first_run = (await event_flow(http, server, first))[0]["run_id"]
    assert outcome["action"] == "singleton_skipped"
    assert outcome["run_id"] == first_run
    assert first_run in outcome["detail"]
    for event_id in (other, later):
        assert (await event_flow(http, server, event_id))[0]["action"] == "started"


@pytest.mark.asyncio
async def test_singleton_cancel_replaces_the_live_run(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")

    @app.function(trigger="report/asked", singleton=devserver.Singleton(mode="cancel"))
    async def report(ctx: devserver.Context) -> Any:
        await ctx.step.sleep("slow", "1h")
        return ctx.event.data["n"]

    server = await make_server(app, clock=VirtualClock(T0))
    first = await send(http, server, "report/asked", {"n": 1})
    await server.runner.wait_idle(skip_time=False)
    second = await send(http, server, "report/asked", {"n": 2})
    await idle(server)
    first_run = (await event_flow(http, server, first))[0]["run_id"]
    (outcome,) = await event_flow(http, server, second)
    assert outcome["action"] == "singleton_cancelled"
    cancelled, replaced = await run_doc(http, server, first_run), await run_doc(
        http, server, outcome["run_id"])
    assert (cancelled["status"], replaced["status"], replaced["output"]) == (
        "Cancelled", "Completed", 2)
    assert "singleton" in cancelled["flow"]["cancelled"]
    assert outcome["run_id"] in cancelled["flow"]["cancelled"]
    async with http.get(f"{server.url}/runs/{first_run}") as resp:  # the run page says so
        page = await resp.text()
    assert resp.status == 200
    assert "Flow control" in page
    assert f"cancelled by singleton: run {outcome['run_id']} replaced it" in page


@pytest.mark.asyncio
async def test_rate_limit_drops_events_over_the_limit_per_key(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")

    @app.function(trigger="mail/send", rate_limit=devserver.RateLimit(
        limit=2, period=dt.timedelta(hours=1), key="event.data.to"))
    async def mail(ctx: devserver.Context) -> Any:
        return ctx.event.data["n"]

    clock = VirtualClock(T0)
    server = await make_server(app, clock=clock)
    sent = [await send(http, server, "mail/send", {"to": "a", "n": n}) for n in range(3)]
    await send(http, server, "mail/send", {"to": "b", "n": 10})
    clock.advance(3_600_001)  # the window has passed
    await send(http, server, "mail/send", {"to": "a", "n": 20})
    await idle(server)
    assert sorted(r["output"] for r in await runs(http, server, "shop-mail")) == [0, 1, 10, 20]
    (outcome,) = await event_flow(http, server, sent[2])
    assert outcome["action"] == "rate_limited"
    assert outcome["run_id"] is None
    assert "rate limit of 2 per 3600 s" in outcome["detail"]


@pytest.mark.asyncio
async def test_idempotency_key_drops_repeats_within_24h(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")

    @app.function(trigger="order/paid", idempotency="event.data.order")
    async def receipt(ctx: devserver.Context) -> Any:
        return ctx.event.data["n"]

    clock = VirtualClock(T0)
    server = await make_server(app, clock=clock)
    first = await send(http, server, "order/paid", {"order": "o1", "n": 1})
    repeat = await send(http, server, "order/paid", {"order": "o1", "n": 2})
    await send(http, server, "order/paid", {"order": "o2", "n": 3})
    for n in (5, 6):  # no key: nothing to drop
        await send(http, server, "order/paid", {"n": n})
    clock.advance(24 * 3_600_000 + 1)
    await send(http, server, "order/paid", {"order": "o1", "n": 4})
    await idle(server)
    assert sorted(r["output"] for r in await runs(http, server, "shop-receipt")) == [
        1, 3, 4, 5, 6]
    (outcome,) = await event_flow(http, server, repeat)
    assert outcome["action"] == "idempotency_duplicate"
    assert outcome["run_id"] == (await event_flow(http, server, first))[0]["run_id"]


# ---------------------------------------------------------------------------------------------
# Throttle, concurrency, priority, timeouts


@pytest.mark.asyncio
async def test_throttle_queues_runs_over_the_limit(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")
    started: list[tuple[int, int]] = []
    clock = VirtualClock(T0)

    @app.function(trigger="api/call", throttle=devserver.Throttle(
        limit=2, period=dt.timedelta(seconds=6), burst=1))
    async def call(ctx: devserver.Context) -> None:
        started.append((ctx.event.data["n"], clock.now_ms() - T0))

    server = await make_server(app, clock=clock)
    ids = [await send(http, server, "api/call", {"n": n}) for n in range(6)]
    await server.runner.wait_idle(skip_time=False)
    queued = await runs(http, server, "shop-call")
    waiting = [r for r in queued if r["status"] == "Queued"]
    assert len(waiting) == 3
    assert all("throttled" in r["flow"]["queued"] for r in waiting)
    await idle(server)
    # As Inngest documents it: limit + burst start at once, then one every period / limit.
    assert sorted(started) == [(0, 0), (1, 0), (2, 0), (3, 3000), (4, 6000), (5, 9000)]
    assert [o["action"] for i in ids for o in await event_flow(http, server, i)] == [
        "started"] * 3 + ["throttled"] * 3


@pytest.mark.asyncio
async def test_concurrency_queues_runs_and_says_why(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")
    gate = asyncio.Event()
    executing: set[int] = set()
    most = 0
    order: list[int] = []

    @app.function(trigger="job/run", concurrency=[devserver.Concurrency(
        limit=1, key="event.data.account")],
        priority=devserver.Priority(run="event.data.n == 3 ? 300 : 0"))
    async def job(ctx: devserver.Context) -> None:
        nonlocal most
        n = ctx.event.data["n"]
        executing.add(n)
        most = max(most, len(executing))
        order.append(n)
        if n == 0:
            await gate.wait()
        executing.discard(n)

    server = await make_server(app, clock=VirtualClock(T0))
    await send(http, server, "job/run", {"n": 0, "account": "a"})
    for n in (1, 2, 3):
        await send(http, server, "job/run", {"n": n, "account": "a"})
    await send(http, server, "job/run", {"n": 9, "account": "b"})  # another key: not held up

    async def queued() -> list[dict[str, Any]]:
        return [r for r in await runs(http, server, "shop-job") if r["status"] == "Queued"]

    async def three_queued() -> list[dict[str, Any]] | None:
        found = await queued()
        return found if len(found) == 3 and 9 in order else None

    waiting = await eventually(three_queued, "three runs of key 'a' queued")
    assert len(waiting) == 3
    assert order == [0, 9]
    assert all("waiting for concurrency" in r["flow"]["queued"] for r in waiting)
    gate.set()
    await idle(server)
    assert order == [0, 9, 3, 1, 2]  # priority moves 3 ahead of the others
    assert most == 2  # 0 and 9: one per key


@pytest.mark.asyncio
async def test_timeouts_cancel_runs_that_start_or_finish_too_late(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("shop")

    @app.function(trigger="slow/job", timeouts=devserver.Timeouts(finish="10m"))
    async def slow(ctx: devserver.Context) -> str:
        await ctx.step.sleep("nap", "1h")
        return "woke"

    @app.function(trigger="late/job", timeouts=devserver.Timeouts(start="1m"),
                  throttle=devserver.Throttle(limit=1, period="10m"))
    async def late(ctx: devserver.Context) -> Any:
        return ctx.event.data["n"]

    @app.function(trigger="quick/job", timeouts=devserver.Timeouts(start="1m", finish="1h"))
    async def quick(ctx: devserver.Context) -> str:
        await ctx.step.sleep("nap", "1m")
        return "done"

    server = await make_server(app, clock=VirtualClock(T0))
    await send(http, server, "slow/job")
    late_ids = [await send(http, server, "late/job", {"n": n}) for n in range(3)]
    await send(http, server, "quick/job")
    await idle(server)
    (slow_run,) = await runs(http, server, "shop-slow")
    assert slow_run["status"] == "Cancelled"
    assert "timeouts.finish" in slow_run["flow"]["cancelled"]
    late_runs = await runs(http, server, "shop-late")
    assert [r["status"] for r in late_runs] == ["Completed", "Completed", "Cancelled"]
    assert "timeouts.start" in late_runs[2]["flow"]["cancelled"]
    assert len(late_ids) == 3
    (quick_run,) = await runs(http, server, "shop-quick")
    assert (quick_run["status"], quick_run["output"]) == ("Completed", "done")


# ---------------------------------------------------------------------------------------------
# The pytest fixture and `replay --app`: virtual time passes pending work at once

FIXTURE_APP = devserver.App("fx")


@FIXTURE_APP.function(trigger="fx/typed",
                      debounce=devserver.Debounce(period="1h", key="event.data.doc"))
def autosave(ctx: devserver.SyncContext) -> Any:
    return ctx.event.data["text"]


@FIXTURE_APP.function(trigger="fx/typed", batch_events=devserver.Batch(max_size=50,
                                                                       timeout="10m"))
def index(ctx: devserver.SyncContext) -> int:
    return len(ctx.events)


@pytest.mark.devserver(apps=[FIXTURE_APP])
def test_the_fixtures_wait_idle_waits_for_debounces_and_batches(devserver: DevServer) -> None:
    for text in ("h", "he", "hel"):
        devserver.send({"name": "fx/typed", "data": {"doc": "d1", "text": text},
                        "sessions": {"doc": "d1"}})
    devserver.wait_idle()
    assert [r.output for r in devserver.runs(function="fx-autosave")] == ["hel"]
    assert [r.output for r in devserver.runs(function="fx-index")] == [3]
    assert devserver.session("doc", "d1").runs == 2


def test_replay_app_runs_debounces_and_batches_on_virtual_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app_file = tmp_path / "typing_app.py"
    app_file.write_text(
        "import devserver\n"
        "app = devserver.App('fx')\n"
        "@app.function(trigger='fx/typed', debounce=devserver.Debounce(period='1h'))\n"
        "async def autosave(ctx):\n"
        "    return ctx.event.data['text']\n"
        "@app.function(trigger='fx/typed', batch_events=devserver.Batch(max_size=50, "
        "timeout='10m'))\n"
        "async def index(ctx):\n"
        "    return len(ctx.events)\n")
    fixture = tmp_path / "typing.jsonl"
    fixture.write_text("".join(
        json.dumps({"name": "fx/typed", "data": {"text": t}, "sessions": {"doc": "d1"}}) + "\n"
        for t in ("h", "he", "hel")))
    began = time.monotonic()
    code = cli.main(["replay", str(fixture), "--app", str(app_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert time.monotonic() - began < 30  # an hour of debounce passed on virtual time
    (row,) = [line for line in out.splitlines() if "d1" in line]
    assert row.split()[:3] == ["doc", "d1", "2"], out  # one debounced run, one batched run


@pytest.mark.asyncio
async def test_a_singleton_cron_does_not_overlap_itself(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = devserver.App("jobs")

    @app.function(trigger=devserver.TriggerCron("* * * * *"),
                  singleton=devserver.Singleton(mode="skip"))
    async def sweep(ctx: devserver.Context) -> str:
        await ctx.step.sleep("long", "150s")  # longer than a minute: the next fires overlap
        return "swept"

    clock = VirtualClock(T0 - T0 % 60_000)
    server = await make_server(app, clock=clock)
    for _ in range(12):  # six minutes, 30 s at a time, letting what is due finish
        clock.advance(30_000)
        await asyncio.sleep(0)  # a turn of the loop: the timers due fire
        await server.runner.wait_idle(skip_time=False)
    runs = list(reversed(await runs_of_function(http, server, "jobs-sweep")))
    # Fires at minutes 1..6: the run of 1 lasts until 3:30, so 2 and 3 are skipped; 4 starts
    # one that lasts past 6, so 5 and 6 are skipped.
    assert len(runs) == 2
    assert runs[0]["status"] == "Completed"

    async def sleeping() -> bool:  # its start is written just after it starts
        doc = await run_doc(http, server, runs[1]["run_id"])
        return doc["status"] == "Running" and doc["steps"][0]["status"] == "Waiting"

    await eventually(sleeping, "the second run to be sleeping")
    skipped = [o for e in await server.store.recent_events(20)
               for o in await server.store.flow_outcomes(e.internal_id)
               if o["action"] == "singleton_skipped"]
    assert len(skipped) == 4
