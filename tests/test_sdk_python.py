"""A real Inngest Python SDK app (inngest 0.5.19, served by Flask on 127.0.0.1) against a real
devserver: syncing, steps, sleeps, waits, invokes, retries to failure, on_failure, events sent
with the SDK, sessions and the dashboard figures.

The Python SDK drops an event's `meta`, so its events can't carry sessions: the tests send
session-carrying events through the event API (as an app would with a plain HTTP client) and
check that SDK runs are counted per session exactly like local ones.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import flask
import pytest
import pytest_asyncio

import devserver
from devserver.clock import VirtualClock
from devserver.ids import ulid_time_ms
from devserver.model.records import COMPLETED
from devserver.web.server import Server

from .helpers import (
    ServedFlask,
    attempts,
    close_sdk_client,
    eventually,
    free_port,
    get,
    idle,
    post,
    run_doc,
    runs_of_event,
    runs_of_function,
    sdk_server,
    send,
    the_run,
    waiting_step,
)

with warnings.catch_warnings():
    # inngest 0.5.19 declares pydantic models with v1-style `class Config` (deprecated).
    warnings.simplefilter("ignore", DeprecationWarning)
    import inngest
    import inngest.flask

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]  # real SDK apps over HTTP
APP = "shop"


# ---------------------------------------------------------------------------------------------
# The app under test


def build_functions(client: inngest.Inngest, state: dict[str, Any]) -> list[inngest.Function[Any]]:
    """The SDK functions every test serves."""

    @client.create_function(fn_id="checkout", retries=2,
                            trigger=inngest.TriggerEvent(event="shop/order.placed"))
    def checkout(ctx: inngest.ContextSync) -> dict[str, Any]:
        items: list[int] = ctx.event.data["items"]  # type: ignore[assignment]
        total = ctx.step.run("price", lambda: sum(items))
        doubled = ctx.step.run("price", lambda: total * 2)  # a repeated step id
        ctx.step.sleep("cool-off", dt.timedelta(hours=1))
        ctx.step.send_event("receipt", inngest.Event(name="shop/receipt.sent",
                                                     data={"total": total}))
        return {"total": total, "doubled": doubled}

    @client.create_function(fn_id="charge", retries=2,
                            trigger=inngest.TriggerEvent(event="shop/charge"))
    def charge(ctx: inngest.ContextSync) -> str:
        def attempt() -> str:
            state["charges"] += 1
            if state["charges"] < 3:
                raise ValueError(f"card declined ({state['charges']})")
            return "charged"
        return ctx.step.run("charge-card", attempt)

    def handle_failure(ctx: inngest.ContextSync) -> dict[str, Any]:
        error: dict[str, Any] = ctx.event.data["error"]  # type: ignore[assignment]
        return {"handled": error["message"]}

    @client.create_function(fn_id="ship", retries=1, on_failure=handle_failure,
                            trigger=inngest.TriggerEvent(event="shop/ship"))
    def ship(ctx: inngest.ContextSync) -> None:
        def call_carrier() -> None:
            raise RuntimeError("carrier API is down")
        ctx.step.run("call-carrier", call_carrier)

    @client.create_function(fn_id="strict", retries=3,
                            trigger=inngest.TriggerEvent(event="shop/strict"))
    def strict(ctx: inngest.ContextSync) -> None:
        raise inngest.NonRetriableError("this order can never be processed")

    @client.create_function(fn_id="later", retries=2,
                            trigger=inngest.TriggerEvent(event="shop/later"))
    def later(ctx: inngest.ContextSync) -> int:
        if ctx.attempt == 0:
            raise inngest.RetryAfterError("rate limited", dt.timedelta(hours=2))
        return ctx.attempt

    @client.create_function(fn_id="refund", trigger=inngest.TriggerEvent(event="shop/refund"))
    def refund(ctx: inngest.ContextSync) -> int:
        amount: int = ctx.event.data["amount"]  # type: ignore[assignment]
        return amount * 100

    @client.create_function(
        fn_id="refund-request",
        trigger=inngest.TriggerEvent(event="shop/refund.requested",
                                     expression="event.data.amount > 0"))
    def refund_request(ctx: inngest.ContextSync) -> dict[str, Any]:
        approval = ctx.step.wait_for_event(
            "approval", event="shop/refund.approved", timeout=dt.timedelta(hours=1),
            if_exp="async.data.refund_id == event.data.refund_id")
        if approval is None:
            return {"approved": False}
        cents = ctx.step.invoke("refund", function=refund, data={"amount": approval.data["amount"]})
        return {"approved": True, "cents": cents}

    return [checkout, charge, ship, strict, later, refund, refund_request]


class FlaskApp:
    """A Flask app serving SDK functions on 127.0.0.1 from a thread (werkzeug's server)."""

    def __init__(self, base_url: str | None, *, port: int = 0, app_id: str = APP) -> None:
        """`base_url` None: the SDK finds the server the usual way (`INNGEST_DEV=<url>`)."""
        self.state: dict[str, Any] = {"charges": 0}
        if base_url is None:
            self.client = inngest.Inngest(app_id=app_id)
        else:
            self.client = inngest.Inngest(app_id=app_id, is_production=False,
                                          api_base_url=base_url, event_api_base_url=base_url)
        self.flask = flask.Flask(app_id)
        inngest.flask.serve(self.flask, self.client, build_functions(self.client, self.state))
        self._served = ServedFlask(self.flask, "flask-sdk-app", port)

    @property
    def url(self) -> str:
        return self._served.url

    async def close(self) -> None:
        self._served.stop()
        await close_sdk_client(self.client)


@pytest_asyncio.fixture
async def apps() -> AsyncIterator[list[FlaskApp]]:
    """Flask apps a test starts, shut down after it."""
    started: list[FlaskApp] = []
    yield started
    for app in started:
        await app.close()


async def synced_app(server: Server, apps: list[FlaskApp]) -> FlaskApp:
    app = FlaskApp(server.url)
    apps.append(app)
    result = await server.sdk.sync(app.url)
    assert result.ok, result
    return app


# ---------------------------------------------------------------------------------------------
# Syncing


async def test_synced_at_start_beside_local_functions_and_listed_everywhere(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    port = free_port()  # the app must know the server's URL before the server starts
    app = FlaskApp(f"http://127.0.0.1:{port}")
    apps.append(app)
    local = devserver.App("local")

    @local.function(trigger="shop/order.placed")
    async def audit(ctx: devserver.Context) -> str:
        return "audited"

    async with sdk_server(tmp_path, sdk_urls=[app.url], functions=local.functions,
                          port=port) as server:
        await server.sdk.wait_synced()
        functions = {fn["id"]: fn for fn in (await get(http, server, "/api/functions"))
                     ["functions"]}
        assert functions["local-audit"]["sdk_url"] is None
        assert functions["shop-checkout"]["sdk_url"].startswith(app.url + "?fnId=shop-checkout")
        assert functions["shop-checkout"]["retries"] == 2
        assert functions["shop-refund-request"]["triggers"] == [
            {"event": "shop/refund.requested", "expression": "event.data.amount > 0"}]
        assert functions["shop-ship-failure"]["triggers"] == [
            {"event": "inngest/function.failed",
             "expression": "event.data.function_id == 'shop-ship'"}]

        listed = await get(http, server, "/api/apps")
        assert [(a["id"], a["sdk"], a["framework"]) for a in listed["apps"]] == [
            ("shop", "py:v0.5.19", "flask")]
        assert listed["urls"][0]["ok"] is True
        info = await get(http, server, "/dev")
        assert {fn["id"] for fn in info["functions"]} >= {"shop-checkout", "shop-ship-failure"}
        assert info["handlers"][0]["url"] == app.url
        assert info["handlers"][0]["sdk"]["language"] == "py"

        # Syncing again with nothing changed is a no-op; on demand through the API too.
        status, body = await post(http, server, "/api/apps/sync", {})
        assert status == 200
        assert [(r["ok"], r["modified"]) for r in body["results"]] == [(True, False)]

        # One event runs the local and the SDK function side by side.
        event_id = (await app.client.send(inngest.Event(name="shop/order.placed",
                                                        data={"items": [1, 2]})))[0]
        await idle(server)
        runs = {r["function_id"]: r for r in await runs_of_event(http, server, event_id)}
        assert runs["local-audit"]["output"] == "audited"
        assert runs["shop-checkout"]["output"] == {"total": 3, "doubled": 6}

        # A hot reload swaps the local functions only; the SDK app's stay.
        reloaded = devserver.App("local")

        @reloaded.function(trigger="shop/other")
        async def other(ctx: devserver.Context) -> None:
            return None

        await server.runner.replace(reloaded.functions)
        ids = {fn.id for fn in server.runner.functions}
        assert "local-other" in ids
        assert "local-audit" not in ids
        assert "shop-checkout" in ids


async def test_sync_errors_say_what_is_wrong(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        nobody = f"http://127.0.0.1:{free_port()}/api/inngest"
        result = await server.sdk.sync(nobody)
        assert not result.ok
        assert result.error is not None
        assert "could not reach" in result.error

        elsewhere = FlaskApp(f"http://127.0.0.1:{free_port()}")  # registers with another server
        apps.append(elsewhere)
        status, body = await post(http, server, "/api/apps/sync", {"url": elsewhere.url})
        assert status == 200
        [outcome] = body["results"]
        assert outcome["ok"] is False
        assert "never registered with this server" in outcome["error"]
        assert server.url in outcome["error"]
        assert (await get(http, server, "/api/functions"))["functions"] == []


async def test_an_app_pointed_here_by_inngest_dev_syncs_and_its_events_land(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with sdk_server(tmp_path) as server:
        monkeypatch.setenv("INNGEST_DEV", server.url)
        for name in ("INNGEST_BASE_URL", "INNGEST_API_BASE_URL", "INNGEST_EVENT_API_BASE_URL",
                     "INNGEST_EVENT_KEY", "INNGEST_SIGNING_KEY"):
            monkeypatch.delenv(name, raising=False)
        app = FlaskApp(None)
        apps.append(app)
        assert (await server.sdk.sync(app.url)).ok
        [event_id] = await asyncio.to_thread(
            app.client.send_sync, inngest.Event(name="shop/refund", data={"amount": 2}))
        await idle(server)
        assert (await the_run(http, server, event_id))["output"] == 200


async def test_discovery_finds_an_app_on_a_dev_port_and_remove_forgets_it(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        app = FlaskApp(server.url)
        apps.append(app)
        port = int(app.url.split(":")[2].split("/")[0])
        server.sdk.discovery_ports = (free_port(), port)  # nothing listens on the first
        assert await server.sdk.discover_apps() == [app.url]
        assert await server.sdk.discover_apps() == []  # known now: synced, not rediscovered
        assert "shop-checkout" in {
            fn["id"] for fn in (await get(http, server, "/api/functions"))["functions"]}

        async with http.delete(f"{server.url}/fn/remove", params={"url": app.url}) as resp:
            assert resp.status == 200
            assert (await resp.json())["removed"] == ["shop"]
        assert (await get(http, server, "/api/functions"))["functions"] == []
        assert (await get(http, server, "/api/apps"))["apps"] == []


# ---------------------------------------------------------------------------------------------
# Runs


async def test_steps_sleep_and_send_event_are_recorded_like_local_steps(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    clock = VirtualClock()
    async with sdk_server(tmp_path, clock=clock) as server:
        app = await synced_app(server, apps)
        start = clock.now_ms()
        [event_id] = await app.client.send(inngest.Event(name="shop/order.placed",
                                                         data={"items": [5, 7]}))
        await idle(server)
        run = await the_run(http, server, event_id)
        assert run["status"] == "Completed", run
        assert run["output"] == {"total": 12, "doubled": 24}
        assert [(s["step_id"], s["kind"], s["status"]) for s in run["steps"]] == [
            ("price", "run", "Completed"), ("price:1", "run", "Completed"),
            ("cool-off", "sleep", "Completed"), ("receipt", "run", "Completed")]
        assert [s["output"] for s in run["steps"][:2]] == [12, 24]
        sleep = run["steps"][2]
        assert 3_600_000 - 5_000 <= sleep["duration_ms"] <= 3_600_000 + 5_000
        assert clock.now_ms() - start >= 3_600_000 - 5_000  # an hour, on the virtual clock

        # The event the step sent landed through the SDK's own send, with its id.
        [receipt_id] = run["steps"][3]["output"]
        receipt = (await get(http, server, f"/v1/events/{receipt_id}"))["data"]
        assert (receipt["name"], receipt["data"]) == ("shop/receipt.sent", {"total": 12})

        inngest_doc = (await get(http, server, f"/v1/runs/{run['run_id']}"))["data"]
        assert (inngest_doc["status"], inngest_doc["output"]) == (
            "Completed", {"total": 12, "doubled": 24})


async def test_retries_to_success_to_failure_on_failure_and_session_figures(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        await synced_app(server, apps)
        session = {"customer": "c_42"}
        charge_event = await send(http, server, "shop/charge", sessions=session)
        ship_event = await send(http, server, "shop/ship", sessions=session)
        await idle(server)

        charge = await the_run(http, server, charge_event)
        assert (charge["status"], charge["output"]) == ("Completed", "charged")
        assert attempts(charge, "charge-card") == [(0, "Failed"), (1, "Failed"),
                                                   (2, "Completed")]
        assert charge["steps"][0]["error"]["name"] == "ValueError"
        assert charge["steps"][0]["error"]["message"] == "card declined (1)"

        ship = await the_run(http, server, ship_event)
        assert ship["status"] == "Failed"
        assert attempts(ship, "call-carrier") == [(0, "Failed"), (1, "Failed")]
        assert ship["error"]["message"] == "carrier API is down"
        assert "Traceback" in ship["steps"][0]["error"]["stack"]
        v1 = (await get(http, server, f"/v1/runs/{ship['run_id']}"))["data"]
        assert v1["status"] == "Failed"
        assert v1["output"]["message"] == "carrier API is down"

        [handler] = await runs_of_function(http, server, "shop-ship-failure")
        assert handler["status"] == "Completed"
        assert (await run_doc(http, server, handler["run_id"]))["output"] == {
            "handled": "carrier API is down"}

        # The session counts the SDK runs like local ones (the failure handler's run too,
        # as its event carries the failed run's sessions).
        doc = await get(http, server, "/api/session", identifier="customer", value="c_42")
        stats = doc["stats"]
        assert (stats["runs"], stats["failed_runs"]) == (3, 1)
        assert stats["failure_rate"] == pytest.approx(1 / 3)
        assert stats["functions"] == ["shop-charge", "shop-ship", "shop-ship-failure"]
        assert {r["status"] for r in doc["runs"]} == {"Completed", "Failed"}


async def test_non_retriable_fails_at_once_and_retry_after_is_honoured(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    clock = VirtualClock()
    async with sdk_server(tmp_path, clock=clock) as server:
        app = await synced_app(server, apps)
        [strict_event, later_event] = await app.client.send([
            inngest.Event(name="shop/strict"), inngest.Event(name="shop/later")])
        await idle(server)

        strict = await the_run(http, server, strict_event)
        assert strict["status"] == "Failed"
        assert attempts(strict, None) == [(0, "Failed")]  # 3 retries configured, none used
        assert strict["error"]["message"] == "this order can never be processed"

        later = await the_run(http, server, later_event)
        assert (later["status"], later["output"]) == ("Completed", 1)
        [first] = [s for s in later["steps"] if s["step_id"] is None]
        assert first["error"]["name"] == "RetryAfterError"
        waited = (dt.datetime.fromisoformat(later["ended_at"])
                  - dt.datetime.fromisoformat(first["ended_at"]))
        assert dt.timedelta(hours=2) - dt.timedelta(seconds=5) <= waited


async def test_wait_for_event_then_invoke_and_a_wait_that_times_out(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        app = await synced_app(server, apps)
        [approved, ignored, unanswered] = await app.client.send([
            inngest.Event(name="shop/refund.requested", data={"refund_id": "r1", "amount": 3}),
            inngest.Event(name="shop/refund.requested", data={"refund_id": "r0", "amount": 0}),
            inngest.Event(name="shop/refund.requested", data={"refund_id": "r2", "amount": 4}),
        ])
        assert await runs_of_event(http, server, ignored) == []  # the trigger's expression

        first = (await runs_of_event(http, server, approved))[0]["run_id"]
        await waiting_step(http, server, first, "approval")
        second = (await runs_of_event(http, server, unanswered))[0]["run_id"]
        await waiting_step(http, server, second, "approval")
        # send_sync blocks, so it runs in a thread (the server shares this event loop).
        await asyncio.to_thread(app.client.send_sync, [
            inngest.Event(name="shop/refund.approved", data={"refund_id": "zz", "amount": 9}),
            inngest.Event(name="shop/refund.approved", data={"refund_id": "r1", "amount": 3}),
        ])

        async def done() -> bool:
            return (await run_doc(http, server, first))["status"] == COMPLETED
        await eventually(done, "the approved refund to complete")
        run = await run_doc(http, server, first)
        assert run["output"] == {"approved": True, "cents": 300}
        wait = next(s for s in run["steps"] if s["step_id"] == "approval")
        assert wait["output"]["data"] == {"refund_id": "r1", "amount": 3}
        invoke = next(s for s in run["steps"] if s["step_id"] == "refund")
        assert (invoke["kind"], invoke["output"]) == ("invoke", 300)
        [child] = await runs_of_function(http, server, "shop-refund")
        assert (child["event_name"], child["status"]) == ("inngest/function.invoked",
                                                          "Completed")

        await idle(server)  # nobody approves r2: its hour passes on the virtual clock
        assert (await run_doc(http, server, second))["output"] == {"approved": False}


# ---------------------------------------------------------------------------------------------
# Events


async def test_an_sdk_send_retried_with_the_same_seed_starts_nothing_twice(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        await synced_app(server, apps)
        millis = 1_800_000_000_123
        seed = f"{millis},{base64.b64encode(bytes(range(10))).decode()}"
        events = [{"name": "shop/charge", "data": {}}, {"name": "shop/strict", "data": {}}]
        headers = {"x-inngest-event-id-seed": seed}
        first = await post(http, server, "/e/NO_EVENT_KEY_SET", events, headers)
        again = await post(http, server, "/e/NO_EVENT_KEY_SET", events, headers)
        assert first == again
        status, body = first
        assert status == 200
        assert body["status"] == 200
        ids = body["ids"]
        assert len(set(ids)) == 2
        assert {ulid_time_ms(i) for i in ids} == {millis}
        await idle(server)
        assert [len(await runs_of_event(http, server, i)) for i in ids] == [1, 1]
        assert len(await runs_of_function(http, server, "shop-charge")) == 1
