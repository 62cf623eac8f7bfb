"""The dashboard as a tool (SPEC 5): every button (Rerun, Cancel, rerun failed runs, Send,
edit-and-resend, Invoke, cron Trigger, Sync) in a real browser and as the JSON endpoint it
calls; the run page's wake and retry times, parent link and logs; the session timeline at
200 runs, live; the banners for reload, sync and database errors.

Real server on port 0 with its own SQLite file, real headless Chromium (Playwright), virtual
time where hours must pass. Synchronisation is Playwright's auto-waiting `expect` and
`eventually`, never a sleep.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.sync_api import Page, expect

import devserver
from devserver.clock import VirtualClock
from devserver.web import api, dashboard
from devserver.web.server import Config, Server

from .helpers import (
    Browser,
    MakeServer,
    eventually,
    get,
    idle,
    post,
    post_events,
    sdk_server,
    send,
    waiting_step,
)
from .test_dashboard_pages import ops_app

START = 1_736_935_200_000
EVIL = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}


@pytest.fixture(autouse=True)
def strict_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dashboard.STRICT_ENV_VAR, "1")


def gated_app(gate: threading.Event) -> devserver.App:
    app = ops_app()

    @app.function(trigger="ops/slow", retries=0)
    def slow(ctx: devserver.Context) -> str:
        ctx.logger.info("slow run waiting for the gate")  # from a worker thread
        if not gate.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        return "released"

    return app


async def run_count(http: aiohttp.ClientSession, server: Server) -> int:
    return len((await get(http, server, "/api/runs", limit="500"))["runs"])


# ---------------------------------------------------------------------------------------------
# The endpoints


@pytest.mark.asyncio
async def test_action_endpoints_answer_json_and_refuse_other_origins(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(ops_app())
    failed_event = await send(http, server, "ops/job", {"n": 2, "fail": True},
                              sessions={"conv": "c1"})
    await idle(server)
    (failed,) = (await get(http, server, "/api/runs", status="Failed"))["runs"]
    before = await run_count(http, server)
    bodies: list[tuple[str, Any]] = [(f"/api/runs/{failed['run_id']}/rerun", None),
                       ("/api/session/rerun-failed?identifier=conv&value=c1", None),
                       ("/api/functions/ops-job/invoke", {"data": {"n": 1}}),
                       ("/api/functions/ops-nightly/trigger", None)]
    for path, body in bodies:
        status, answer = await post(http, server, path, body, headers=EVIL)
        assert status == 403, (path, answer)
        assert "another web page" in answer["error"], (path, answer)
    assert await run_count(http, server) == before  # nothing stored

    status, answer = await post(http, server, f"/api/runs/{failed['run_id']}/rerun", None)
    assert status == 200, answer
    assert answer["rerun_of"] == failed["run_id"], answer
    rerun_id = answer["run"]["run_id"]
    await idle(server)
    rerun = await get(http, server, f"/api/runs/{rerun_id}")
    assert (rerun["rerun_of"], rerun["event_id"], rerun["status"]) == (
        failed["run_id"], failed_event, "Failed")
    assert (await get(http, server, f"/api/runs/{failed['run_id']}"))["reruns"] == [rerun_id]
    session = await get(http, server, "/api/session", identifier="conv", value="c1")
    assert (session["stats"]["runs"], session["stats"]["failed_runs"]) == (2, 2)

    # Rerun failed runs: those not rerun yet (the first was), each once.
    status, answer = await post(http, server, "/api/session/rerun-failed?identifier=conv&value=c1",
                                None)
    assert status == 200, answer
    assert [r["rerun_of"] for r in answer["reruns"]] == [rerun_id], answer
    await idle(server)

    status, answer = await post(http, server, "/api/functions/ops-job/invoke",
                                {"data": {"n": 5}, "sessions": {"conv": "c-inv"}})
    assert status == 200, answer
    await idle(server)
    invoked = await get(http, server, f"/api/runs/{answer['run_ids'][0]}")
    assert (invoked["function_id"], invoked["event_name"], invoked["output"],
            invoked["sessions"]) == ("ops-job", "inngest/function.invoked", {"n": 5},
                                     {"conv": "c-inv"})
    status, answer = await post(http, server, "/api/functions/ops-nightly/trigger", None)
    assert status == 200, answer
    await idle(server)
    cron = await get(http, server, f"/api/runs/{answer['run_ids'][0]}")
    assert (cron["output"], cron["event_name"], cron["trigger_source"]) == (
        "nightly", "inngest/scheduled.timer", "cron")

    # The identifier's figures (counters kept by ingest, ends and reruns) are its sessions' sums.
    (ident,) = (await get(http, server, "/api/sessions"))["identifiers"]
    sessions = (await get(http, server, "/api/sessions", identifier="conv"))["sessions"]
    assert (ident["runs"], ident["failed_runs"], ident["failing_sessions"]) == (
        sum(s["runs"] for s in sessions), sum(s["failed_runs"] for s in sessions),
        sum(1 for s in sessions if s["failed_runs"])) == (4, 3, 1)

    before = await run_count(http, server)
    refused: list[tuple[str, Any, int, str]] = [
            ("/api/runs/nope/rerun", None, 404, "no run"),
            ("/api/functions/nope/invoke", {}, 404, "no function"),
            ("/api/functions/ops-job/invoke", {"data": [1]}, 400, "data"),
            ("/api/functions/ops-job/invoke", {"date": {}}, 400, "unknown field"),
            ("/api/functions/ops-job/invoke", [1], 400, "JSON object"),
            ("/api/functions/ops-job/trigger", None, 400, "no cron trigger"),
            ("/api/session/rerun-failed?identifier=conv&value=zz", None, 404, "no session")]
    for path, body, code, message in refused:
        status, answer = await post(http, server, path, body)
        assert status == code, (path, answer)
        assert message in answer["error"], (path, answer)
    assert await run_count(http, server) == before

    await server.runner.replace([])  # as a hot reload that drops every function would
    status, answer = await post(http, server, f"/api/runs/{failed['run_id']}/rerun", None)
    assert status == 400, answer
    assert "not registered" in answer["error"]
    assert await run_count(http, server) == before


# ---------------------------------------------------------------------------------------------
# The buttons


@pytest.mark.slow
@pytest.mark.asyncio
async def test_every_button_in_the_browser(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = threading.Event()
    server = await make_server(gated_app(gate))
    await send(http, server, "ops/job", {"n": 2, "fail": True}, sessions={"conv": "c1"})
    await send(http, server, "ops/job", {"n": 3, "fail": True}, sessions={"conv": "c1"})
    slow_event = await send(http, server, "ops/slow", sessions={"conv": "c1"})
    failed = (await get(http, server, "/api/runs", status="Failed"))["runs"]
    assert len(failed) == 2
    (slow,) = (await get(http, server, "/api/runs", function="ops-slow"))["runs"]

    def check(page: Page) -> None:
        # Cancel a live run; the page then shows it Cancelled.
        page.goto(server.url + f"/runs/{slow['run_id']}")
        expect(page.locator("#run-status")).to_have_text("Running")
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#run-status")).to_have_text("Cancelled")
        expect(page.get_by_role("button", name="Cancel")).to_have_count(0)

        # Rerun: a new run, linked both ways.
        page.goto(server.url + f"/runs/{failed[0]['run_id']}")
        page.get_by_role("button", name="Rerun").click()
        page.wait_for_url(re.compile(r"/runs/(?!" + failed[0]["run_id"] + ")"))
        expect(page.locator("a.rerun-of")).to_have_text(failed[0]["run_id"])
        expect(page.locator("#run-status")).to_have_text("Failed")
        rerun_id = page.locator("#run-id").text_content()
        page.locator("a.rerun-of").click()
        expect(page.locator("a.rerun-link")).to_have_text(rerun_id or "")

        # Rerun failed runs: each failed run not rerun yet (the second original, and the
        # rerun above, which failed too), once.
        page.goto(server.url + "/session?identifier=conv&value=c1")
        expect(page.locator("#figure-runs")).to_have_text("4")
        page.get_by_role("button", name="Rerun failed runs").click()
        expect(page.locator("#figure-runs")).to_have_text("6")
        expect(page.locator("#figure-failed")).to_have_text("5")

        # Send, from the Events page.
        page.goto(server.url + "/events")
        page.locator("#send-event summary").click()
        page.locator("#send-body").fill(json.dumps(
            {"name": "ops/job", "data": {"n": 7}, "sessions": {"conv": "c7"}}))
        page.get_by_role("button", name="Send event").click()
        page.wait_for_url(re.compile(r"/events/\w+$"))
        expect(page.locator("#event-name")).to_have_text("ops/job")
        expect(page.locator("#event-runs .run-status")).to_have_text("Completed")
        sent_url = page.url

        # Edit and resend, from the Events list: the editor holds the event; change it, send
        # it again.
        page.goto(server.url + "/events")
        page.locator("tr.event-row").first.get_by_role("link", name="Edit and resend").click()
        page.wait_for_url(sent_url + "#send-event")
        expect(page.locator("#send-body")).to_be_visible()
        body = json.loads(page.locator("#send-body").input_value())
        assert body == {"name": "ops/job", "data": {"n": 7}, "sessions": {"conv": "c7"}}
        body["data"]["n"] = 8
        page.locator("#send-body").fill(json.dumps(body))
        page.get_by_role("button", name="Send event").click()
        page.wait_for_url(lambda u: u != sent_url)
        expect(page.locator("pre.json").first).to_contain_text('"n": 8')
        expect(page.locator("#event-runs .run-status")).to_have_text("Completed")

        # Bad input is said, nothing sent.
        page.locator("#send-event summary").click()
        page.locator("#send-body").fill("{not json")
        page.get_by_role("button", name="Send event").click()
        expect(page.locator("#send-event .action-result")).to_contain_text("Not valid JSON")
        page.locator("#send-body").fill(json.dumps({"data": {}}))
        page.get_by_role("button", name="Send event").click()
        expect(page.locator("#send-event .action-result")).to_contain_text("name")

        # Invoke with a payload; Trigger a cron function.
        page.goto(server.url + "/functions")
        card = page.locator("article[data-function-id='ops-job']")
        card.locator("textarea").fill(json.dumps({"data": {"n": 9}}))
        card.get_by_role("button", name="Invoke").click()
        page.wait_for_url(re.compile(r"/runs/"))
        expect(page.locator("#run-status")).to_have_text("Completed")
        expect(page.locator("section.result pre")).to_contain_text('"n": 9')
        page.goto(server.url + "/functions")
        page.locator("article[data-function-id='ops-nightly']").get_by_role(
            "button", name="Trigger cron now").click()
        page.wait_for_url(re.compile(r"/runs/"))
        expect(page.locator("#run-status")).to_have_text("Completed")
        expect(page.locator("#run-parent")).to_contain_text("cron schedule")

        # Sync an app that isn't there: the error shows, and a banner on every page.
        page.goto(server.url + "/apps")
        page.locator("#sync-body").fill(json.dumps({"url": "http://127.0.0.1:9/api/inngest"}))
        page.get_by_role("button", name="Sync", exact=True).click()
        expect(page.locator("tr.sync-row")).to_have_count(1)
        expect(page.locator("tr.sync-row .status")).to_have_text("Failed")
        page.goto(server.url + "/runs")
        expect(page.locator(".banner-sync")).to_contain_text("127.0.0.1:9")
        expect(page.locator("#live-status")).to_have_attribute("data-state", "problem")
        expect(page.get_by_role("button", name="Sync all")).to_have_count(0)  # only on /apps
        page.goto(server.url + "/apps")
        with page.expect_navigation():
            page.get_by_role("button", name="Sync all").click()
        expect(page.locator("tr.sync-row .status")).to_have_text("Failed")
        expect(page.locator(".banner-sync")).to_have_count(1)

    try:
        await browser.check(check, ignore=("status of 400",))
    finally:
        gate.set()
    await idle(server)
    assert (await get(http, server, f"/api/runs/{slow['run_id']}"))["status"] == "Cancelled"
    assert slow_event


# ---------------------------------------------------------------------------------------------
# The run page


@pytest.mark.slow
@pytest.mark.asyncio
async def test_run_page_shows_wake_and_retry_times_parent_links_and_logs(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    clock = VirtualClock(START)
    app = devserver.App("times")
    tries: list[int] = []

    @app.function(trigger="t/nap", retries=0)
    async def nap(ctx: devserver.Context) -> str:
        ctx.logger.info("about to nap for %s", "1h")
        ctx.logger.warning("a warning line")
        await ctx.step.sleep("nap", "1h")
        return "rested"

    @app.function(trigger="t/retry", retries=2)
    async def retry(ctx: devserver.Context) -> str:
        def flaky() -> str:
            tries.append(1)
            if len(tries) == 1:
                raise ConnectionError("upstream hiccup")
            return "ok"
        return str(await ctx.step.run("flaky", flaky))

    @app.function(trigger="t/parent", retries=0)
    async def parent(ctx: devserver.Context) -> None:
        await ctx.step.send_event("kick", {"name": "t/child", "data": {}})

    @app.function(trigger="t/child", retries=0)
    async def child(ctx: devserver.Context) -> str:
        return "child"

    server = await make_server(app, clock=clock, retry_interval=60)
    nap_run = (await get(http, server, "/v1/events/" + await send(http, server, "t/nap")
                         + "/runs"))["data"][0]["run_id"]
    step = await waiting_step(http, server, nap_run, "nap")
    retry_run = (await get(http, server, "/v1/events/" + await send(http, server, "t/retry")
                           + "/runs"))["data"][0]["run_id"]

    async def retrying() -> dict[str, Any] | None:
        doc = await get(http, server, f"/api/runs/{retry_run}")
        return doc if doc["retry_at"] else None
    retry_doc = await eventually(retrying, "the retry to be scheduled")
    await send(http, server, "t/parent")
    await server.runner.wait_idle(skip_time=False)
    (child_run,) = (await get(http, server, "/api/runs", function="times-child"))["runs"]
    child_doc = await get(http, server, f"/api/runs/{child_run['run_id']}")
    assert child_doc["parent_run_id"] is not None
    nap_doc = await get(http, server, f"/api/runs/{nap_run}")
    assert [(line["level"], line["message"]) for line in nap_doc["logs"]] == [
        ("INFO", "about to nap for 1h"), ("WARNING", "a warning line")]

    def check(page: Page) -> None:
        page.goto(server.url + f"/runs/{nap_run}")
        wakes = page.locator("ol.steps .wakes time")
        expect(wakes).to_have_attribute("datetime", step["wait_until"])
        expect(page.locator("ol.steps .wakes")).to_contain_text("wakes at 2025-01-15 11:00:00")
        expect(page.locator(".log-line")).to_have_count(2)
        expect(page.locator(".log-line").first).to_contain_text("about to nap for 1h")

        page.goto(server.url + f"/runs/{retry_run}")
        expect(page.locator("#run-retry-at time")).to_have_attribute(
            "datetime", retry_doc["retry_at"])
        expect(page.locator("ol.steps .will-retry")).to_contain_text(
            "will retry at 2025-01-15 10:01:00")
        expect(page.locator("ol.steps .step-meta").first).to_contain_text("attempt 1")
        expect(page.locator("#run-attempt")).to_have_text("2")  # the retry to come

        page.goto(server.url + f"/runs/{child_run['run_id']}")
        page.locator("a.parent-link").click()
        expect(page.locator("#run-id")).to_have_text(child_doc["parent_run_id"])
        expect(page.locator("a.child-link")).to_have_text("times-child")

    await browser.check(check)
    await idle(server)  # the hour passes on the virtual clock
    assert (await get(http, server, f"/api/runs/{nap_run}"))["status"] == "Completed"
    assert (await get(http, server, f"/api/runs/{retry_run}"))["retry_at"] is None


# ---------------------------------------------------------------------------------------------
# The timeline


@pytest.mark.slow
@pytest.mark.asyncio
async def test_session_timeline_draws_200_runs_with_links_and_goes_live(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = threading.Event()
    server = await make_server(gated_app(gate))
    events: list[dict[str, Any]] = [
        {"name": "ops/job", "data": {"n": i, "child": i % 20 == 0, "fail": i % 25 == 1},
         "sessions": {"conv": "big"}} for i in range(190)]
    status, body = await post_events(http, server, events)
    assert status == 200, body
    await idle(server)
    status, body = await post_events(
        http, server, [{"name": "ops/slow", "data": {}, "sessions": {"conv": "big"}}] * 3)
    assert status == 200, body
    doc = await get(http, server, "/api/session", identifier="conv", value="big")
    timeline = doc["timeline"]
    assert doc["stats"]["runs"] == 190 + 10 + 3 == len(timeline["runs"]) == 203
    assert timeline["live"] is True
    assert all(0 <= r["x"] <= 1000 and r["x"] + r["width"] <= 1000.5 for r in timeline["runs"])
    by_id = {r["run_id"]: r for r in timeline["runs"]}
    children = [r for r in timeline["runs"] if r["parent_run_id"]]
    assert len(children) == 10
    assert all(c["run_id"] in by_id[c["parent_run_id"]]["child_runs"] for c in children)

    def check(page: Page) -> None:
        page.goto(server.url + "/session?identifier=conv&value=big")
        rows = page.locator("li.tl-run")
        expect(rows).to_have_count(203)
        assert [r.get_attribute("data-run-id") for r in rows.all()] == list(by_id)
        expect(page.locator("li.tl-run.tl-running")).to_have_count(3)
        expect(page.locator("li.tl-run.tl-failed")).to_have_count(8)
        assert page.locator("li.tl-run rect.tl-step").count() >= 190
        assert page.locator(".tl-events rect.tl-event").count() == 203
        # Each row is readable: a line of its own, not squeezed.
        heights = rows.evaluate_all("rs => rs.map(r => r.getBoundingClientRect().height)")
        assert min(heights) >= 14, min(heights)
        # Cause and effect: a child's "←" link leads to its parent's row, which links back.
        child = page.locator("li.tl-run a.tl-parent").first
        target = child.get_attribute("href") or ""
        child.click()
        expect(page.locator(target)).to_be_in_viewport()
        assert page.locator(target + " a.tl-child").count() == 1
        page.evaluate("window.__stayed = true")
        gate.set()  # the slow runs finish: the timeline follows without a reload
        expect(page.locator("li.tl-run.tl-running")).to_have_count(0, timeout=15_000)
        expect(page.locator("li.tl-run.tl-completed")).to_have_count(203 - 8)
        expect(page.locator(".tl-live")).to_have_count(0)
        assert page.evaluate("window.__stayed") is True

    try:
        await browser.check(check)
    finally:
        gate.set()
    await idle(server)


# ---------------------------------------------------------------------------------------------
# Banners


@pytest.mark.slow
@pytest.mark.asyncio
async def test_banners_for_a_failed_reload_and_a_database_problem(
    tmp_path: Path, http: aiohttp.ClientSession, browser: Browser
) -> None:
    module = tmp_path / "myapp.py"
    module.write_text("import devserver\napp = devserver.App('mine')\n\n"
                      "@app.function(trigger='x/y', retries=0)\n"
                      "async def f(ctx):\n    return 1\n")
    db = tmp_path / "db.sqlite3"
    config = Config(db=str(db), app_specs=[f"{module}:app"], reload=True)
    from devserver.runtime.loader import load_app
    config.functions = load_app(f"{module}:app")
    server = Server(config, port=0)
    await server.start()
    try:
        module.write_text("import devserver\napp = devserver.App('mine')\nthis is not python\n")
        assert await server.app[api.RELOADER].reload() is False

        def reload_banner(page: Page) -> None:
            for path in ("/sessions", "/runs", "/functions"):
                page.goto(server.url + path)
                expect(page.locator(".banner-reload")).to_contain_text("Hot reload failed")
                expect(page.locator(".banner-reload")).to_contain_text("NameError")
                expect(page.locator("#live-status")).to_have_attribute("data-state", "problem")

        await browser.check(reload_banner)
        module.write_text("import devserver\napp = devserver.App('mine')\n")
        assert await server.app[api.RELOADER].reload() is True

        db.unlink()  # the database goes away under the server
        status, _ = await post_events(http, server, {"name": "x/y", "data": {}})
        assert status == 503

        def database_banner(page: Page) -> None:
            page.goto(server.url + "/events")
            expect(page.locator(".banner-reload")).to_have_count(0)
            expect(page.locator(".banner-database")).to_contain_text("deleted or replaced")
            expect(page.locator("#live-status")).to_have_attribute("data-state", "problem")

        await browser.check(database_banner)
    finally:
        await server.stop()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_apps_page_syncs_a_real_sdk_app_and_lists_its_functions(
    tmp_path: Path, browser: Browser
) -> None:
    from .test_sdk_python import FlaskApp

    async with sdk_server(tmp_path) as server:
        app = FlaskApp(server.url)
        try:
            def check(page: Page) -> None:
                page.goto(server.url + "/apps")
                expect(page.locator("#apps p.empty")).to_contain_text("No SDK apps yet")
                page.locator("#sync-body").fill(json.dumps({"url": app.url}))
                page.get_by_role("button", name="Sync", exact=True).click()
                expect(page.locator("tr.app-row")).to_have_count(1)
                expect(page.locator("tr.sync-row .status")).to_have_text("Synced")
                expect(page.locator(".banner")).to_have_count(0)
                doc = page.request.get(server.url + "/api/apps").json()
                expect(page.locator("tr.app-row .app-id")).to_have_text(doc["apps"][0]["id"])
                expect(page.locator("tr.app-row .app-functions .fn")).to_have_text(
                    doc["apps"][0]["functions"])
                with page.expect_navigation():  # the page reloads once the sync is done
                    page.get_by_role("button", name="Sync all").click()
                expect(page.locator("tr.sync-row .status")).to_have_text("Synced")
                page.goto(server.url + "/functions")
                sdk_cards = page.locator("article.function",
                                         has=page.locator(".fn", has_text="SDK"))
                expect(sdk_cards).to_have_count(len(doc["apps"][0]["functions"]))

            await browser.check(check)
        finally:
            await app.close()


@pytest.mark.asyncio
async def test_logger_lines_are_kept_per_run_from_threads_too_and_bounded(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    from devserver.store.listing import MAX_LOG_CHARS, MAX_LOG_LINES

    app = devserver.App("logs")

    @app.function(trigger="l/chatty", retries=0)
    async def chatty(ctx: devserver.Context) -> None:
        for i in range(MAX_LOG_LINES + 20):
            ctx.logger.debug("line %d", i)  # any level, whatever the terminal shows
        ctx.logger.error("x" * (MAX_LOG_CHARS + 10))

    @app.function(trigger="l/sync", retries=0)
    def in_thread(ctx: devserver.SyncContext) -> None:
        ctx.logger.info("from %s", "a worker thread")
        ctx.step.run("step", lambda: ctx.logger.warning("inside a step") or 1)
        ctx.logger.info("y" * (MAX_LOG_CHARS + 10))

    server = await make_server(app)
    chatty_event = await send(http, server, "l/chatty")
    sync_event = await send(http, server, "l/sync")
    await idle(server)
    (run,) = (await get(http, server, f"/v1/events/{chatty_event}/runs"))["data"]
    logs = (await get(http, server, f"/api/runs/{run['run_id']}"))["logs"]
    assert len(logs) == MAX_LOG_LINES
    assert [line["message"] for line in logs[:2]] == ["line 0", "line 1"]
    assert {line["level"] for line in logs} == {"DEBUG"}  # the later ones were not kept
    (run,) = (await get(http, server, f"/v1/events/{sync_event}/runs"))["data"]
    logs = (await get(http, server, f"/api/runs/{run['run_id']}"))["logs"]
    assert [(line["level"], line["message"]) for line in logs] == [
        ("INFO", "from a worker thread"), ("WARNING", "inside a step"),
        ("INFO", "y" * MAX_LOG_CHARS + " … (10 more chars)")]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_flow_control_shows_on_event_function_and_run_pages_and_counts_in_figures(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    app = devserver.App("flow")

    @app.function(trigger="f/batch", retries=0, batch_events=devserver.Batch(max_size=2,
                                                                             timeout="10m"))
    async def batched(ctx: devserver.Context) -> int:
        return len(ctx.events)

    server = await make_server(app, clock=VirtualClock(START))
    first = await send(http, server, "f/batch", {"n": 1}, sessions={"conv": "a"})
    await send(http, server, "f/batch", {"n": 2}, sessions={"conv": "b"})
    await idle(server)
    (run,) = (await get(http, server, "/api/runs"))["runs"]
    assert run["status"] == "Completed"
    # A batched run counts toward both sessions, and so twice toward their identifier.
    (ident,) = (await get(http, server, "/api/sessions"))["identifiers"]
    assert (ident["runs"], ident["sessions"]) == (2, 2)
    event = await get(http, server, f"/api/events/{first}")
    assert [f["function_id"] for f in event["flow"]] == ["flow-batched"]

    def check(page: Page) -> None:
        page.goto(server.url + f"/events/{first}")
        expect(page.locator("li.flow-outcome")).to_have_count(1)
        expect(page.locator("li.flow-outcome")).to_contain_text(event["flow"][0]["action"])
        page.goto(server.url + "/functions")
        expect(page.locator(".fn-flow")).to_contain_text("batchEvents")
        page.goto(server.url + f"/runs/{run['run_id']}")
        expect(page.locator("#run-flow")).to_contain_text("a batch of 2 events")
        page.goto(server.url + "/sessions")
        expect(page.locator("tr.identifier-row td.runs")).to_have_text("2")

    await browser.check(check)
