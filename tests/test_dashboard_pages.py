"""The dashboard's pages beyond one session (SPEC 5): `/runs`, `/events`, `/events/{id}`,
`/functions`, `/apps`, and the failure figures of `/sessions`; each page against its JSON twin
in a real browser, the filters over plain HTTP, and every page at phone width (390 px).

Real server on port 0 with its own SQLite file, real headless Chromium (Playwright), virtual
time where hours must pass. Synchronisation is Playwright's auto-waiting `expect`, never a sleep.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from playwright.sync_api import Page, expect

import devserver
from devserver.clock import VirtualClock, iso
from devserver.web import dashboard
from devserver.web.server import Server

from .helpers import Browser, MakeServer, get, get_json, idle, send

START = 1_736_935_200_000  # 2025-01-15T10:00:00Z
HOUR = 3_600_000
PHONE = {"width": 390, "height": 844}


@pytest.fixture(autouse=True)
def strict_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render every page with StrictUndefined: a template typo fails the test."""
    monkeypatch.setenv(dashboard.STRICT_ENV_VAR, "1")


def ops_app() -> devserver.App:
    """`job` (fails when data.fail, sends `ops/child` when data.child), `child`, and a cron
    function `nightly`."""
    app = devserver.App("ops")

    @app.function(trigger="ops/job", retries=0)
    async def job(ctx: devserver.Context) -> dict[str, Any]:
        n = await ctx.step.run("work", lambda: ctx.event.data.get("n", 0))
        if ctx.event.data.get("fail"):
            raise devserver.NonRetriableError(f"job {n} failed\nsecond line")
        if ctx.event.data.get("child"):
            await ctx.step.send_event("spawn", {"name": "ops/child", "data": {"of": n}})
        return {"n": n}

    @app.function(trigger="ops/child", retries=0)
    async def child(ctx: devserver.Context) -> str:
        return "child"

    @app.function(trigger=devserver.TriggerCron("0 3 * * *"), retries=0)
    async def nightly(ctx: devserver.Context) -> str:
        return "nightly"

    return app


async def populate(http: aiohttp.ClientSession, server: Server,
                   clock: VirtualClock) -> dict[str, str]:
    """A run without a session, a failed one in a session, one that starts a child run; two
    hours later one more. Returns their event ids by name."""
    ids = {
        "plain": await send(http, server, "ops/job", {"n": 1}),
        "failed": await send(http, server, "ops/job", {"n": 2, "fail": True},
                             sessions={"conv": "c-fail"}),
        "parent": await send(http, server, "ops/job", {"n": 3, "child": True},
                             sessions={"conv": "c-ok"}),
    }
    await idle(server)
    clock.advance(2 * HOUR)
    ids["late"] = await send(http, server, "ops/job", {"n": 4})
    await idle(server)
    return ids


def url(server: Server, path: str, **params: str) -> str:
    return server.url + path + ("?" + urlencode(params) if params else "")


def texts(page: Page, selector: str) -> list[str]:
    return [t or "" for t in page.locator(selector).evaluate_all(
        "cells => cells.map(c => c.textContent.trim())")]


def twin(page: Page) -> dict[str, Any]:
    """The page's JSON twin, fetched from the URL its `Link` names."""
    href = page.locator("link[rel=alternate][type='application/json']").get_attribute("href")
    assert href, "the page names no JSON twin"
    response = page.request.get(page.evaluate("location.origin") + href)
    assert response.ok, response.text()
    body: dict[str, Any] = response.json()
    return body


# ---------------------------------------------------------------------------------------------
# Plain HTTP: the filters


@pytest.mark.asyncio
async def test_runs_twin_filters_by_status_function_search_time_and_pages(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    clock = VirtualClock(START)
    server = await make_server(ops_app(), clock=clock)
    ids = await populate(http, server, clock)
    every = (await get(http, server, "/api/runs"))["runs"]
    assert len(every) == 5  # four jobs and the child
    assert [r["run_id"] for r in every] == sorted((r["run_id"] for r in every), reverse=True)
    no_session = [r for r in every if not r["sessions"]]
    assert {r["event_id"] for r in no_session} == {ids["plain"], ids["late"]}

    failed = (await get(http, server, "/api/runs", status="failed"))["runs"]
    assert [(r["event_id"], r["status"], r["error"]) for r in failed] == [
        (ids["failed"], "Failed", "NonRetriableError: job 2 failed")]
    status, body = await get_json(http, server, "/api/runs", status="Broken")
    assert status == 400, body
    assert "status must be one of" in body["error"], body

    child = (await get(http, server, "/api/runs", function="ops-child"))["runs"]
    assert [r["event_name"] for r in child] == ["ops/child"]
    assert (await get(http, server, "/api/runs", function_id="ops-child"))["runs"] == child
    by_run = (await get(http, server, "/api/runs", q=child[0]["run_id"]))["runs"]
    assert [r["run_id"] for r in by_run] == [child[0]["run_id"]]
    by_event = (await get(http, server, "/api/runs", q=ids["late"]))["runs"]
    assert [r["event_id"] for r in by_event] == [ids["late"]]
    by_name = (await get(http, server, "/api/runs", q="child"))["runs"]
    assert [r["function_id"] for r in by_name] == ["ops-child"]

    recent = (await get(http, server, "/api/runs", last="1h"))["runs"]
    assert [r["event_id"] for r in recent] == [ids["late"]]
    early = (await get(http, server, "/api/runs", start=str(iso(START)),
                       end=str(iso(START + HOUR))))
    assert len(early["runs"]) == 4
    assert ids["late"] not in {r["event_id"] for r in early["runs"]}
    assert early["filters"]["start"] == iso(START)
    for bad, message in (({"last": "soon"}, "last must be"), ({"start": "yesterday"}, "start must"),
                         ({"last": "1h", "start": iso(START)}, "not both"),
                         ({"start": iso(START + HOUR), "end": iso(START)}, "after end"),
                         ({"start": "999999999999999"}, "up to year 9999"),
                         ({"end": "0001-01-01T00:00:00+14:00"}, "end must"),
                         ({"cursor": "not-a-cursor"}, "cursor")):
        status, body = await get_json(http, server, "/api/runs", **bad)
        assert status == 400, (bad, body)
        assert message in body["error"], (bad, body)

    assert len((await get(http, server, "/api/runs", last="999999w"))["runs"]) == 5

    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await get(http, server, "/api/runs", **params)
        seen += [r["run_id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [r["run_id"] for r in every]


@pytest.mark.asyncio
async def test_sessions_twins_have_failure_figures_latest_errors_and_filters(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    clock = VirtualClock(START)
    server = await make_server(ops_app(), clock=clock)
    await populate(http, server, clock)
    (row,) = (await get(http, server, "/api/sessions"))["identifiers"]
    assert (row["identifier"], row["sessions"], row["runs"], row["failed_runs"],
            row["failing_sessions"]) == ("conv", 2, 3, 1, 1)  # the child inherits c-ok

    doc = await get(http, server, "/api/sessions", identifier="conv", sort="failed_runs")
    assert [(s["value"], s["failed_runs"]) for s in doc["sessions"]] == [("c-fail", 1), ("c-ok", 0)]
    failing = doc["sessions"][0]["latest_error"]
    assert failing["error"] == "NonRetriableError: job 2 failed"
    assert doc["sessions"][1]["latest_error"] is None
    only = await get(http, server, "/api/sessions", identifier="conv", status="failing")
    assert [s["value"] for s in only["sessions"]] == ["c-fail"]
    assert (await get(http, server, "/api/sessions", identifier="conv", last="1h"))[
        "sessions"] == []
    status, body = await get_json(http, server, "/api/sessions", identifier="conv",
                                  status="nope")
    assert status == 400
    assert "failing" in body["error"]

    session = await get(http, server, "/api/session", identifier="conv", value="c-ok")
    assert [r["function_id"] for r in session["runs"]] == ["ops-child", "ops-job"]
    only_child = await get(http, server, "/api/session", identifier="conv", value="c-ok",
                           status="Completed", last="1h")
    assert only_child["runs"] == []
    failed = await get(http, server, "/api/session", identifier="conv", value="c-fail",
                       status="Failed")
    assert [r["error"] for r in failed["runs"]] == ["NonRetriableError: job 2 failed"]


# ---------------------------------------------------------------------------------------------
# Pages against their twins, in the browser


@pytest.mark.slow
@pytest.mark.asyncio
async def test_runs_page_shows_every_run_filters_and_searches_like_its_twin(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    clock = VirtualClock(START)
    server = await make_server(ops_app(), clock=clock)
    ids = await populate(http, server, clock)

    def check(page: Page) -> None:
        page.goto(server.url + "/")
        page.get_by_role("link", name="Runs", exact=True).click()
        page.wait_for_url(re.compile(r"/runs$"))
        expect(page.locator("tr.run-row")).to_have_count(5)
        doc = twin(page)
        assert texts(page, "tr.run-row a.run-id") == [r["run_id"] for r in doc["runs"]]
        assert texts(page, "tr.run-row .run-status") == [r["status"] for r in doc["runs"]]

        page.get_by_label("Status").select_option("Failed")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url(re.compile(r"status=Failed"))
        expect(page.locator("tr.run-row")).to_have_count(1)
        expect(page.locator("tr.run-row .run-error")).to_have_text(
            "NonRetriableError: job 2 failed")
        assert [r["event_id"] for r in twin(page)["runs"]] == [ids["failed"]]

        page.get_by_label("Status").select_option("")
        page.get_by_label("Search").fill(ids["late"])
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("tr.run-row")).to_have_count(1)
        assert twin(page)["runs"][0]["event_id"] == ids["late"]

        page.get_by_label("Search").fill("")
        page.get_by_label("Time").select_option("1h")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url(re.compile(r"last=1h"))
        expect(page.locator("tr.run-row")).to_have_count(1)
        page.get_by_label("Function").select_option("ops-child")
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("p.empty")).to_contain_text("No run matches these filters")
        page.get_by_role("link", name="Show every run").click()
        expect(page.locator("tr.run-row")).to_have_count(5)

        page.goto(url(server, "/runs", limit="2"))
        seen = texts(page, "a.run-id")
        while page.locator("a[rel=next]").count():
            page.locator("a[rel=next]").click()
            expect(page.locator("a[rel=first]")).to_be_visible()
            seen += texts(page, "a.run-id")
        assert seen == [r["run_id"] for r in doc["runs"]]

    await browser.check(check, ignore=("status of 400",))


@pytest.mark.slow
@pytest.mark.asyncio
async def test_events_functions_and_apps_pages_match_their_twins(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    clock = VirtualClock(START)
    server = await make_server(ops_app(), clock=clock)
    ids = await populate(http, server, clock)

    def check(page: Page) -> None:
        page.goto(server.url + "/events")
        doc = twin(page)
        assert texts(page, "tr.event-row a.event-id") == [e["internal_id"] for e in doc["events"]]
        assert len(doc["events"]) == 5  # four sent, one sent by a run
        page.get_by_label("Search").fill("ops/child")
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("tr.event-row")).to_have_count(1)
        page.locator("tr.event-row a.event-id").click()
        page.wait_for_url(re.compile(r"/events/"))
        event = twin(page)
        expect(page.locator("#event-name")).to_have_text("ops/child")
        expect(page.locator("#event-source a")).to_have_text(event["sent_by_run"])
        assert texts(page, "a.run-id") == [r["run_id"] for r in event["runs"]]
        page.locator("#event-source a").click()  # to the run that sent it
        expect(page.locator("#run-id")).to_have_text(event["sent_by_run"])

        page.goto(server.url + f"/events/{ids['failed']}")
        expect(page.locator("tr.run-row .run-status")).to_have_text("Failed")
        expect(page.locator("a.session-chip")).to_have_text("conv = c-fail")

        page.get_by_role("link", name="Functions", exact=True).click()
        page.wait_for_url(re.compile(r"/functions$"))
        functions = twin(page)["functions"]
        cards = page.locator("article.function")
        assert [c.get_attribute("data-function-id") for c in cards.all()] == [
            f["id"] for f in functions]
        job = cards.filter(has=page.locator("[data-function-id='ops-job']")).or_(
            page.locator("article[data-function-id='ops-job']"))
        expect(job.locator(".fn-rate")).to_contain_text("25%")  # 1 of 4 finished runs
        expect(job.locator("tr.run-row")).to_have_count(4)
        nightly = page.locator("article[data-function-id='ops-nightly']")
        expect(nightly.locator(".fn-triggers")).to_have_text("cron 0 3 * * *")
        expect(nightly.get_by_role("button", name="Trigger cron now")).to_be_visible()
        expect(job.get_by_role("button", name="Trigger cron now")).to_have_count(0)

        page.get_by_role("link", name="Apps", exact=True).click()
        page.wait_for_url(re.compile(r"/apps$"))
        assert twin(page)["apps"] == []
        expect(page.locator("#apps p.empty")).to_contain_text("No SDK apps yet")

        page.get_by_role("link", name="Sessions", exact=True).click()
        identifiers = twin(page)["identifiers"]
        expect(page.locator("tr.identifier-row td.failed")).to_have_text(
            str(identifiers[0]["failed_runs"]))
        page.locator("a.failing-link").click()
        page.wait_for_url(re.compile(r"status=failing"))
        expect(page.locator("tr.session-row")).to_have_count(1)
        expect(page.locator("tr.session-row .latest-error")).to_have_text(
            "NonRetriableError: job 2 failed")
        sessions = twin(page)["sessions"]
        assert texts(page, "tr.session-row td.cell-value") == [s["value"] for s in sessions]
        page.locator("tr.session-row .latest-error a").click()
        expect(page.locator("#run-status")).to_have_text("Failed")

    await browser.check(check)


# ---------------------------------------------------------------------------------------------
# Phone width


@pytest.mark.slow
@pytest.mark.asyncio
async def test_every_page_fits_a_390_px_screen(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    clock = VirtualClock(START)
    server = await make_server(ops_app(), clock=clock)
    ids = await populate(http, server, clock)
    run_id = (await get(http, server, "/api/runs", status="Failed"))["runs"][0]["run_id"]
    paths = ["/sessions", "/sessions?identifier=conv",
             "/session?identifier=conv&value=c-ok", "/runs", f"/runs/{run_id}", "/events",
             f"/events/{ids['parent']}", "/functions", "/apps"]

    def check(page: Page) -> None:
        for path in paths:
            page.goto(server.url + path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (path, width)
            overflowing = page.locator(".table-wrap, .card, .timeline").evaluate_all(
                "els => els.filter(e => e.scrollWidth > e.clientWidth + 1)"
                ".map(e => e.className)")
            assert overflowing == [], (path, overflowing)
            for cell in page.locator("table.data td.num").all():
                assert cell.is_visible(), (path, cell.text_content())
                box = cell.bounding_box()
                assert box is not None, (path, box)
                assert box["x"] + box["width"] <= 390, (path, box)

    await browser.check(check, viewport=PHONE)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_session_and_run_pages_filter_and_match_their_twins(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    clock = VirtualClock(START)
    server = await make_server(ops_app(), clock=clock)
    for n in range(3):
        await send(http, server, "ops/job", {"n": n, "fail": n == 1}, sessions={"conv": "mixed"})
    await idle(server)
    clock.advance(2 * HOUR)
    await send(http, server, "ops/job", {"n": 9, "child": True}, sessions={"conv": "mixed"})
    await idle(server)

    def check(page: Page) -> None:
        page.goto(url(server, "/session", identifier="conv", value="mixed"))
        doc = twin(page)
        assert texts(page, "#session-runs a.run-id") == [r["run_id"] for r in doc["runs"]]
        assert [r.get_attribute("data-run-id") for r in page.locator("li.tl-run").all()] == [
            r["run_id"] for r in doc["timeline"]["runs"]]
        expect(page.locator("#session-runs .run-error")).to_have_text(
            [r["error"] or "" for r in doc["runs"]])
        page.get_by_label("Status", exact=True).select_option("Failed")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url(re.compile(r"status=Failed"))
        expect(page.locator("#session-runs tr.run-row")).to_have_count(1)
        failed = twin(page)["runs"]
        assert [r["status"] for r in failed] == ["Failed"]
        expect(page.locator("#figure-runs")).to_have_text("5")  # the figures stay whole
        page.get_by_label("Status", exact=True).select_option("")
        page.get_by_label("Time", exact=True).select_option("1h")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url(re.compile(r"last=1h"))
        expect(page.locator("#session-runs tr.run-row")).to_have_count(2)  # job 9 and its child
        assert len(twin(page)["runs"]) == 2

        page.locator("#session-runs a.run-id").last.click()
        run = twin(page)
        expect(page.locator("#run-status")).to_have_text(run["status"])
        expect(page.locator("ol.steps > li")).to_have_count(len(run["steps"]))
        assert texts(page, "ol.steps .step-head .status") == [s["status"] for s in run["steps"]]
        shown = [re.findall(r"attempt (\d+)", t) for t in texts(page, "ol.steps .step-meta")]
        assert shown == [[str(s["attempt"])] for s in run["steps"]]
        expect(page.locator("a.child-link")).to_have_count(len(run["child_runs"]))

    await browser.check(check)
