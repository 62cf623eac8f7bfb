"""Flow control of functions served by a real Inngest Python SDK app (inngest 0.5.19 on
Flask): the options arrive in its registration and act as they do on Inngest. Debounce,
batching (the SDK gets the batch as the call's `events`), singleton, rate limit, idempotency,
throttle and timeouts, on the server's virtual time."""

from __future__ import annotations

import datetime as dt
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import flask
import pytest
import pytest_asyncio

from devserver.clock import WallClock
from devserver.web.server import Server

from .helpers import (
    ServedFlask,
    close_sdk_client,
    eventually,
    get,
    idle,
    run_doc,
    runs_of_function,
    sdk_server,
    send,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import inngest
    import inngest.flask

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]  # a real SDK app over HTTP
APP = "flow"


def build(client: inngest.Inngest) -> list[inngest.Function[Any]]:
    @client.create_function(
        fn_id="debounced", trigger=inngest.TriggerEvent(event="flow/debounce"),
        debounce=inngest.Debounce(period=dt.timedelta(hours=1), key="event.data.user"))
    def debounced(ctx: inngest.ContextSync) -> Any:
        return {"n": ctx.event.data["n"], "events": len(ctx.events)}

    @client.create_function(
        fn_id="batched", trigger=inngest.TriggerEvent(event="flow/batch"),
        batch_events=inngest.Batch(max_size=3, timeout=dt.timedelta(minutes=10)))
    def batched(ctx: inngest.ContextSync) -> Any:
        numbers = ctx.step.run("numbers", lambda: [e.data["n"] for e in ctx.events])
        return {"first": ctx.event.data["n"], "numbers": numbers}

    @client.create_function(
        fn_id="single", trigger=inngest.TriggerEvent(event="flow/single"),
        singleton=inngest.Singleton(key="event.data.user", mode="skip"))
    def single(ctx: inngest.ContextSync) -> Any:
        ctx.step.sleep("slow", dt.timedelta(hours=1))
        return ctx.event.data["n"]

    @client.create_function(
        fn_id="replaced", trigger=inngest.TriggerEvent(event="flow/replace"),
        singleton=inngest.Singleton(mode="cancel"))
    def replaced(ctx: inngest.ContextSync) -> Any:
        ctx.step.sleep("slow", dt.timedelta(hours=1))
        return ctx.event.data["n"]

    @client.create_function(
        fn_id="limited", trigger=inngest.TriggerEvent(event="flow/rate"),
        rate_limit=inngest.RateLimit(limit=1, period=dt.timedelta(hours=1)))
    def limited(ctx: inngest.ContextSync) -> Any:
        return ctx.event.data["n"]

    @client.create_function(
        fn_id="once", trigger=inngest.TriggerEvent(event="flow/once"),
        idempotency="event.data.order")
    def once(ctx: inngest.ContextSync) -> Any:
        return ctx.event.data["n"]

    @client.create_function(
        fn_id="paced", trigger=inngest.TriggerEvent(event="flow/throttle"),
        throttle=inngest.Throttle(limit=1, period=dt.timedelta(minutes=1), burst=1))
    def paced(ctx: inngest.ContextSync) -> Any:
        return ctx.event.data["n"]

    @client.create_function(
        fn_id="bounded", trigger=inngest.TriggerEvent(event="flow/timeout"),
        timeouts=inngest.Timeouts(finish=dt.timedelta(minutes=10)))
    def bounded(ctx: inngest.ContextSync) -> Any:
        ctx.step.sleep("slow", dt.timedelta(hours=1))
        return "woke"

    @client.create_function(
        fn_id="big", trigger=inngest.TriggerEvent(event="flow/big"), retries=0,
        batch_events=inngest.Batch(max_size=8, timeout=dt.timedelta(seconds=10)))
    def big(ctx: inngest.ContextSync) -> Any:
        return [len(e.data["msg"]) for e in ctx.events]

    return [debounced, batched, single, replaced, limited, once, paced, bounded, big]


class FlowApp:
    """The SDK app on Flask, served from a thread on 127.0.0.1."""

    def __init__(
        self, base_url: str, *,
        functions: Callable[[inngest.Inngest], list[inngest.Function[Any]]] = build,
        app_id: str = APP,
    ) -> None:
        self.client = inngest.Inngest(app_id=app_id, is_production=False,
                                      api_base_url=base_url, event_api_base_url=base_url)
        self.flask = flask.Flask(app_id)
        inngest.flask.serve(self.flask, self.client, functions(self.client))
        self._served = ServedFlask(self.flask, "flask-flow-app", 0)

    @property
    def url(self) -> str:
        return self._served.url

    async def close(self) -> None:
        self._served.stop()
        await close_sdk_client(self.client)


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Server]:
    async with sdk_server(tmp_path) as server:
        app = FlowApp(server.url)
        try:
            result = await server.sdk.sync(app.url)
            assert result.ok, result
            yield server
        finally:
            await app.close()


async def outputs(http: aiohttp.ClientSession, server: Server, fn: str, *,
                  app_id: str = APP) -> list[Any]:
    docs = [await run_doc(http, server, r["run_id"])
            for r in reversed(await runs_of_function(http, server, f"{app_id}-{fn}"))]
    return [(d["status"], d["output"]) for d in docs]


async def actions(http: aiohttp.ClientSession, server: Server, event_id: str) -> list[str]:
    return [o["action"] for o in (await get(http, server, f"/api/events/{event_id}"))["flow"]]


async def test_nothing_is_listed_as_ignored(served: Server, http: aiohttp.ClientSession) -> None:
    (app,) = (await get(http, served, "/api/apps"))["apps"]
    assert app["ignored_options"] == {}
    functions = {f["id"]: f for f in (await get(http, served, "/api/functions"))["functions"]}
    assert functions["flow-batched"]["flow"]["batchEvents"]["maxSize"] == 3
    assert functions["flow-debounced"]["flow"]["debounce"]["period_ms"] == 3_600_000


async def test_debounce_and_batch(served: Server, http: aiohttp.ClientSession) -> None:
    for n in range(3):
        await send(http, served, "flow/debounce", {"user": "a", "n": n})
    ids = [await send(http, served, "flow/batch", {"n": n}) for n in range(4)]
    await idle(served)
    assert await outputs(http, served, "debounced") == [("Completed", {"n": 2, "events": 1})]
    assert await outputs(http, served, "batched") == [
        ("Completed", {"first": 0, "numbers": [0, 1, 2]}),
        ("Completed", {"first": 3, "numbers": [3]})]
    assert await actions(http, served, ids[0]) == ["batched"]


async def test_singleton_rate_limit_idempotency(
    served: Server, http: aiohttp.ClientSession
) -> None:
    await send(http, served, "flow/single", {"user": "a", "n": 1})
    await served.runner.wait_idle(skip_time=False)
    skipped = await send(http, served, "flow/single", {"user": "a", "n": 2})
    await send(http, served, "flow/replace", {"n": 1})
    await served.runner.wait_idle(skip_time=False)
    await send(http, served, "flow/replace", {"n": 2})
    limited = [await send(http, served, "flow/rate", {"n": n}) for n in range(2)]
    repeat = [await send(http, served, "flow/once", {"order": "o1", "n": n}) for n in range(2)]
    await idle(served)
    assert await outputs(http, served, "single") == [("Completed", 1)]
    assert await actions(http, served, skipped) == ["singleton_skipped"]
    assert await outputs(http, served, "replaced") == [("Cancelled", None), ("Completed", 2)]
    assert await outputs(http, served, "limited") == [("Completed", 0)]
    assert await actions(http, served, limited[1]) == ["rate_limited"]
    assert await outputs(http, served, "once") == [("Completed", 0)]
    assert await actions(http, served, repeat[1]) == ["idempotency_duplicate"]


async def test_throttle_and_timeouts(served: Server, http: aiohttp.ClientSession) -> None:
    for n in range(3):
        await send(http, served, "flow/throttle", {"n": n})
    await send(http, served, "flow/timeout")
    await idle(served)
    docs = [await run_doc(http, served, r["run_id"])
            for r in reversed(await runs_of_function(http, served, f"{APP}-paced"))]
    starts = [dt.datetime.fromisoformat(d["started_at"].replace("Z", "+00:00")) for d in docs]
    assert [(s - starts[0]).total_seconds() for s in starts] == [0, 0, 60]
    assert [d["output"] for d in docs] == [0, 1, 2]
    ((status, _),) = await outputs(http, served, "bounded")
    assert status == "Cancelled"
    (bounded,) = await runs_of_function(http, served, f"{APP}-bounded")
    assert "timeouts.finish" in (await run_doc(http, served, bounded["run_id"]))["flow"][
        "cancelled"]


async def test_a_batch_of_eight_one_mib_events(served: Server, http: aiohttp.ClientSession) -> None:
    """As the SDK's own suite sends it: 8 MiB in one batch, all of it reaching the function."""
    app_client = inngest.Inngest(app_id=APP, is_production=False, api_base_url=served.url,
                                 event_api_base_url=served.url)
    try:
        await app_client.send([inngest.Event(name="flow/big", data={"msg": "a" * 1024 * 1024})
                               for _ in range(8)])
    finally:
        await app_client._http_client._http_client.aclose()
        app_client._http_client._http_client_sync.close()
    await idle(served)
    assert await outputs(http, served, "big") == [("Completed", [1024 * 1024] * 8)]


def wall_functions(client: inngest.Inngest) -> list[inngest.Function[Any]]:
    @client.create_function(fn_id="debounced", trigger=inngest.TriggerEvent(event="wall/d"),
                            debounce=inngest.Debounce(period=dt.timedelta(seconds=1)))
    def debounced(ctx: inngest.ContextSync) -> Any:
        return ctx.event.data["n"]

    @client.create_function(fn_id="batched", trigger=inngest.TriggerEvent(event="wall/b"),
                            batch_events=inngest.Batch(max_size=2,
                                                       timeout=dt.timedelta(minutes=1)))
    def batched(ctx: inngest.ContextSync) -> Any:
        return [e.data["n"] for e in ctx.events]

    return [debounced, batched]


async def test_on_the_wall_clock_as_the_sdks_own_suites_run(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The SDK suites run against a dev server in real time: a 1 s debounce fires about a
    second after the last event, once; a full batch runs at once."""
    async with sdk_server(tmp_path, clock=WallClock()) as server:
        app = FlowApp(server.url, functions=wall_functions, app_id="wall")
        try:
            assert (await server.sdk.sync(app.url)).ok
            began = time.monotonic()
            for n in range(2):
                await send(http, server, "wall/d", {"n": n})
                await send(http, server, "wall/b", {"n": n})

            async def done(fn: str) -> list[Any] | None:
                found = await outputs(http, server, fn, app_id="wall")
                return found if found and all(s == "Completed" for s, _ in found) else None

            assert await eventually(lambda: done("batched"), "the full batch to run") == [
                ("Completed", [0, 1])]
            assert await eventually(lambda: done("debounced"), "the debounce to fire") == [
                ("Completed", 1)]
            assert time.monotonic() - began >= 1.0  # not before the period passed
            await idle(server)
            assert len(await outputs(http, server, "debounced", app_id="wall")) == 1
        finally:
            await app.close()
