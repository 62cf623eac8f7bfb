"""The Sessions dashboard (SPEC 5) in a real browser and over plain HTTP.

Each test starts a real server (`make_server`: port 0, its own SQLite file). Browser tests drive
headless Debian Chromium with Playwright; Playwright's sync API belongs to the thread that
started it, so one worker thread owns the browser for the whole module and async tests hand it
blocking checks (`await browser.check(fn)`) while their own loop keeps serving the devserver.
Synchronisation is Playwright's auto-waiting `expect(...)`, never a sleep.

`DEVSERVER_SCREENSHOTS=docs pytest tests/test_dashboard.py -k screenshots` refreshes the
README's screenshots from the demo.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import aiohttp
import pytest
from playwright.sync_api import Page, expect

import devserver
from devserver.cli import report
from devserver.clock import VirtualClock
from devserver.model import records
from devserver.web import dashboard
from devserver.web.server import Server

from .helpers import Browser, MakeServer, get_json, idle, post_events, send

T = TypeVar("T")

START = 1_736_935_200_000  # 2025-01-15T10:00:00Z: virtual clocks start here
MINUTE = 60_000
NOT_FOUND_LOG = "the server responded with a status of 404"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
ODD_IDENTIFIER = "thread id/é:?#&+"
ODD_VALUES = [
    "a/b:c?d#e%f&g+h",
    "two  spaces and 'single' \"double\" quotes",
    "emoji 🎉 naïve 日本語",
    "%2F already-encoded %20 +plus",
    "long-" + "x" * 507,  # 512 characters, the maximum
]


@pytest.fixture(autouse=True)
def strict_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render every page with StrictUndefined: a template typo fails the test."""
    monkeypatch.setenv(dashboard.STRICT_ENV_VAR, "1")


# ---------------------------------------------------------------------------------------------
# Apps and helpers


def support_app(gate: threading.Event | None = None) -> devserver.App:
    """`summarize` (fails when data.fail is set), `flaky` (a step fails once, then the function
    fails for good) and `slow` (a sync function that waits for `gate`)."""
    app = devserver.App("support-bot")
    fetches: list[int] = []

    @app.function(trigger="app/message.created", retries=0)
    async def summarize(ctx: devserver.Context) -> dict[str, Any]:
        text = await ctx.step.run("load", lambda: str(ctx.event.data.get("text", "")))
        if ctx.event.data.get("fail"):
            raise devserver.NonRetriableError(f"cannot summarize {text!r}")
        if ctx.event.data.get("notify"):  # the sent event inherits the run's sessions
            await ctx.step.send_event("notify", {"name": "app/summary.ready", "data": {}})
        return {"chars": len(text), "echo": text}

    @app.function(trigger="app/summary.ready", retries=0)
    async def deliver(ctx: devserver.Context) -> None:
        return None

    @app.function(trigger="app/report.requested", retries=1)
    async def flaky(ctx: devserver.Context) -> None:
        def fetch() -> dict[str, int]:
            fetches.append(1)
            if len(fetches) == 1:
                raise ConnectionError("upstream hiccup")
            return {"items": 3}

        got = await ctx.step.run("fetch", fetch)
        raise ValueError(f"cannot report on {got['items']} items <b>bold</b>")

    @app.function(trigger="app/slow", retries=0)
    def slow(ctx: devserver.Context) -> dict[str, bool]:
        if gate is None or not gate.wait(timeout=30):
            raise TimeoutError("the test never released the gate")
        return {"released": True}

    return app


def page_url(server: Server, path: str, **params: str) -> str:
    return server.url + path + ("?" + urlencode(params, quote_via=quote) if params else "")


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def column(page: Page, selector: str) -> list[str]:
    """The exact text of every cell matching `selector`."""
    return [text or "" for text in page.locator(selector).evaluate_all(
        "cells => cells.map(c => c.textContent)")]


def open_link_with_text(page: Page, selector: str, text: str) -> None:
    """Click the one link under `selector` whose text is exactly `text` (spaces included)."""
    links = page.locator(selector)
    texts = column(page, selector)
    assert texts.count(text) == 1, (text, texts)
    links.nth(texts.index(text)).click()


async def populate(http: aiohttp.ClientSession, server: Server, clock: VirtualClock) -> None:
    """Four conversations a minute apart: alpha (3 runs), gamma (2, one failed), beta (1,
    failed), delta (an event no function listens to: 0 runs)."""
    for _ in range(3):
        await send(http, server, "app/message.created", sessions={"conversation_id": "conv_alpha"},
                   data={"text": "hi"})
    await idle(server)
    clock.advance(MINUTE)
    await send(http, server, "app/message.created", sessions={"conversation_id": "conv_gamma"},
               data={"text": "ok"})
    await send(http, server, "app/message.created", sessions={"conversation_id": "conv_gamma"},
               data={"text": "bad", "fail": True})
    await idle(server)
    clock.advance(MINUTE)
    await send(http, server, "app/message.created", sessions={"conversation_id": "conv_beta"},
               data={"fail": True})
    await idle(server)
    clock.advance(MINUTE)
    await send(http, server, "app/ping", sessions={"conversation_id": "conv_delta"})
    await idle(server)
    clock.advance(MINUTE)


# ---------------------------------------------------------------------------------------------
# Browser tests


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sessions_table_rows_sorting_search_and_row_click(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    clock = VirtualClock(START)
    server = await make_server(support_app(), clock=clock)
    await populate(http, server, clock)
    url = page_url(server, "/sessions", identifier="conversation_id")

    def check(page: Page) -> None:
        page.goto(server.url + "/sessions")
        expect(page.locator("table.identifiers tbody tr")).to_have_count(1)
        expect(page.locator("table.identifiers tbody td").nth(1)).to_have_text("4")
        expect(page.locator(".envs")).to_have_count(0)  # one environment: no selector
        page.get_by_role("link", name="conversation_id").click()
        page.wait_for_url(url)
        values = "table.sessions td.cell-value"
        assert column(page, values) == ["conv_delta", "conv_beta", "conv_gamma", "conv_alpha"]
        assert column(page, "td.runs") == ["0", "1", "2", "3"]
        assert column(page, "td.failed") == ["0", "1", "1", "0"]
        assert column(page, "td.rate") == ["0%", "100%", "50%", "0%"]
        assert column(page, "td.last-active") == [
            "1 min ago", "2 min ago", "3 min ago", "4 min ago"]
        title = page.locator("td.last-active time").first.get_attribute("title")
        assert title == "2025-01-15 10:03:00.000 UTC"
        assert column(page, "td.functions")[1:] == ["support-bot-summarize "] * 3
        expect(page.locator("td.functions").first).to_have_text("none")

        page.locator("a.sort[data-sort=runs]").click()
        expect(page.locator("a.sort.current")).to_have_attribute("data-sort", "runs")
        assert query_of(page.url)["sort"] == ["runs"]
        assert column(page, values) == ["conv_alpha", "conv_gamma", "conv_beta", "conv_delta"]
        page.locator("a.sort[data-sort=failure_rate]").click()
        expect(page.locator("a.sort.current")).to_have_attribute("data-sort", "failure_rate")
        assert column(page, values) == ["conv_beta", "conv_gamma", "conv_delta", "conv_alpha"]
        page.locator("a.sort[data-sort=value]").click()
        expect(page.locator("a.sort.current")).to_have_attribute("data-sort", "value")
        assert column(page, values) == ["conv_alpha", "conv_beta", "conv_delta", "conv_gamma"]

        page.get_by_label("Search values").fill("ta")
        page.get_by_role("button", name="Search").click()
        page.wait_for_url(re.compile(r"q=ta"))
        assert query_of(page.url)["sort"] == ["value"]  # the search keeps the sort
        assert column(page, values) == ["conv_beta", "conv_delta"]
        page.get_by_label("Search values").fill("nothing-like-this")
        page.get_by_role("button", name="Search").click()
        expect(page.locator("p.empty")).to_contain_text("nothing-like-this")
        page.get_by_role("link", name="Clear search").click()
        expect(page.locator("table.sessions tbody tr")).to_have_count(4)

        # Clicking anywhere on a row opens the session.
        box = page.locator("tr.session-row", has_text="conv_gamma").locator("td.runs")
        area = box.bounding_box()
        assert area is not None
        page.mouse.click(area["x"] + area["width"] / 2, area["y"] + area["height"] / 2)
        page.wait_for_url(re.compile(r"/session\?"))
        assert query_of(page.url) == {"identifier": ["conversation_id"], "value": ["conv_gamma"]}
        expect(page.locator("#figure-runs")).to_have_text("2")
        expect(page.locator("#figure-failed")).to_have_text("1")
        expect(page.locator("#figure-rate")).to_have_text("50%")
        expect(page.locator("#figure-functions")).to_have_text("support-bot-summarize")
        expect(page.locator("tr.run-row")).to_have_count(2)
        # Newest first: the failing event was sent second.
        assert column(page, "tr.run-row .status") == ["Failed", "Completed"]
        assert column(page, "tr.run-row td:nth-child(3)") == ["support-bot-summarize"] * 2
        assert column(page, "tr.run-row td:nth-child(4)") == ["app/message.created"] * 2

    await browser.check(check)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_pagination_links_walk_every_session_once(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    clock = VirtualClock(START)
    server = await make_server(support_app(), clock=clock)
    for i in range(7):
        await send(http, server, "app/ping", sessions={"user_id": f"user-{i}"})
        clock.advance(1000)
    run_ids = []
    for _ in range(5):  # one session with 5 runs
        event_id = await send(http, server, "app/message.created", sessions={"user_id": "many"})
        _, runs = await get_json(http, server, f"/v1/events/{event_id}/runs")
        run_ids.append(runs["data"][0]["run_id"])
    await idle(server)
    url = page_url(server, "/sessions", identifier="user_id", sort="value", limit="3")

    def check(page: Page) -> None:
        page.goto(url)
        seen: list[list[str]] = []
        while True:
            seen.append(column(page, "td.cell-value"))
            expect(page.locator("a[rel=first]")).to_have_count(1 if len(seen) > 1 else 0)
            following = page.locator("a[rel=next]")
            if not following.count():
                break
            following.click()
            page.wait_for_url(re.compile(r"cursor="))
            assert query_of(page.url)["limit"] == ["3"]
            assert query_of(page.url)["sort"] == ["value"]
        assert seen == [["many", "user-0", "user-1"], ["user-2", "user-3", "user-4"],
                        ["user-5", "user-6"]]
        page.locator("a[rel=first]").click()
        expect(page.locator("td.cell-value").first).to_have_text("many")
        assert "cursor" not in query_of(page.url)

        page.goto(page_url(server, "/session", identifier="user_id", value="many", limit="2"))
        runs: list[str] = []
        while True:
            expect(page.locator("#figure-runs")).to_have_text("5")
            runs += column(page, "a.run-id")
            if not page.locator("a[rel=next]").count():
                break
            page.locator("a[rel=next]").click()
            page.wait_for_url(re.compile(r"cursor="))
            assert query_of(page.url)["limit"] == ["2"]
        assert runs == run_ids[::-1]  # newest first, each once

    await browser.check(check)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_odd_identifiers_and_values_display_exactly_and_links_round_trip(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    server = await make_server(support_app())
    for value in ODD_VALUES:
        await send(http, server, "app/message.created", sessions={ODD_IDENTIFIER: value},
                   data={"text": value})
    await idle(server)

    def check(page: Page) -> None:
        page.goto(server.url + "/")
        for value in ODD_VALUES:
            page.goto(server.url + "/sessions")
            open_link_with_text(page, "table.identifiers a.row-link", ODD_IDENTIFIER)
            page.wait_for_url(re.compile(r"/sessions\?identifier="))
            assert query_of(page.url) == {"identifier": [ODD_IDENTIFIER]}
            assert page.locator("#identifier-name").text_content() == ODD_IDENTIFIER
            # A 512-character value is clipped inside its cell, not widening the page.
            assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
            open_link_with_text(page, "table.sessions a.row-link", value)
            page.wait_for_url(re.compile(r"/session\?"))
            assert query_of(page.url) == {"identifier": [ODD_IDENTIFIER], "value": [value]}
            assert page.locator("#session-identifier").text_content() == ODD_IDENTIFIER
            assert page.locator("#session-value").text_content() == value
            assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
            expect(page.locator("#figure-runs")).to_have_text("1")

            page.locator("a.run-id").click()
            page.wait_for_url(re.compile(r"/runs/"))
            chip = page.locator("a.session-chip")
            assert chip.locator(".mono").nth(1).text_content() == value
            assert json.loads(page.locator("section.result pre").text_content() or "") == {
                "chars": len(value), "echo": value}
            chip.click()
            page.wait_for_url(re.compile(r"/session\?"))
            assert page.locator("#session-value").text_content() == value

    await browser.check(check)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_script_values_never_execute_and_show_as_text(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    server = await make_server(support_app())
    await send(http, server, "app/message.created", sessions={XSS: XSS}, data={"text": XSS})
    await idle(server)
    pages = [("/sessions", "table.identifiers a.row-link"),
             ("/sessions?" + urlencode({"identifier": XSS}), "table.sessions a.row-link"),
             ("/session?" + urlencode({"identifier": XSS, "value": XSS}), "#session-value")]

    def check(page: Page) -> None:
        requested: list[str] = []
        page.on("request", lambda request: requested.append(urlsplit(request.url).path))
        for path, shown in pages:
            page.goto(server.url + path)
            assert page.evaluate("typeof window.__xss") == "undefined"
            assert page.locator(shown).text_content() == XSS
        page.locator("a.run-id").click()
        page.wait_for_url(re.compile(r"/runs/"))
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.locator("a.session-chip .mono").nth(1).text_content() == XSS
        output = json.loads(page.locator("section.result pre").text_content() or "")
        assert output["echo"] == XSS
        assert page.locator("img").count() == 0
        assert "/x" not in requested

    await browser.check(check)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_empty_state_teaches_a_curl_command_that_works(
    make_server: MakeServer, browser: Browser
) -> None:
    server = await make_server(support_app())

    def check(page: Page) -> None:
        page.goto(server.url + "/")
        page.wait_for_url(server.url + "/sessions")
        expect(page.locator(".empty-state h2")).to_have_text("No sessions yet")
        command = page.locator("#curl-command").text_content() or ""
        assert f"{server.url}/e/" in command
        assert '"sessions": {"conversation_id": "conv_1234"}' in command
        assert '"name": "app/message.created"' in command  # an event a function listens to
        page.evaluate("window.__sameDocument = true")
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == 200
        # Live refresh replaces the empty state with the new identifier, without a reload.
        expect(page.locator("table.identifiers a.row-link")).to_have_text("conversation_id")
        assert page.evaluate("window.__sameDocument") is True

        # An unknown identifier's page teaches the same way, then shows the new session.
        response = page.goto(page_url(server, "/sessions", identifier="ticket id"))
        assert response is not None
        assert response.status == 404
        command = page.locator("#curl-command").text_content() or ""
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        expect(page.locator("td.cell-value")).to_have_text("example-1")
        expect(page.locator("#identifier-name")).to_have_text("ticket id")

    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: this test runs the page's curl command "
                    "(apt-get install curl; .ci/run does)")
    await browser.check(check, ignore=(NOT_FOUND_LOG,))


@pytest.mark.slow
@pytest.mark.asyncio
async def test_unknown_identifier_session_run_and_page_say_so(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    server = await make_server(support_app())
    await send(http, server, "app/ping", sessions={"conversation_id": "conv_1"})

    def check(page: Page) -> None:
        response = page.goto(page_url(server, "/sessions", identifier="no such id"))
        assert response is not None
        assert response.status == 404
        expect(page.locator("h1")).to_have_text("Unknown identifier")
        expect(page.locator("#error-message")).to_contain_text("no such id")
        assert '"no such id": "example-1"' in (page.locator("#curl-command").text_content()
                                                or "")
        page.get_by_role("link", name="conversation_id").click()  # the identifiers that exist
        page.wait_for_url(re.compile(r"identifier=conversation_id"))

        response = page.goto(page_url(server, "/session", identifier="conversation_id",
                                      value="conv_404"))
        assert response is not None
        assert response.status == 404
        expect(page.locator("h1")).to_have_text("Unknown session")
        expect(page.locator("#error-message")).to_contain_text("conv_404")
        page.get_by_role("link", name="See the sessions of conversation_id").click()
        expect(page.locator("td.cell-value")).to_have_text("conv_1")

        response = page.goto(server.url + "/runs/01NOSUCHRUN")
        assert response is not None
        assert response.status == 404
        expect(page.locator("#error-message")).to_contain_text("01NOSUCHRUN")
        response = page.goto(server.url + "/no/such/page")
        assert response is not None
        assert response.status == 404
        expect(page.locator("h1")).to_have_text("Page not found")
        response = page.goto(page_url(server, "/sessions", identifier="conversation_id",
                                      sort="sideways"))
        assert response is not None
        assert response.status == 400
        expect(page.locator("#error-message")).to_contain_text("sort must be one of")

    await browser.check(check, ignore=(NOT_FOUND_LOG, "status of 400"))


@pytest.mark.slow
@pytest.mark.asyncio
async def test_run_page_shows_events_steps_errors_and_traceback(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    server = await make_server(support_app())
    event_id = await send(http, server, "app/report.requested",
                          sessions={"conversation_id": "conv_r", "user_id": "u 1"},
                          data={"report": {"week": 3, "tags": ["a", "é"]}}, id="req-1",
                          v="2025-01-01.1")
    await idle(server)
    status, runs = await get_json(http, server, f"/v1/events/{event_id}/runs")
    assert status == 200, runs
    run_id = runs["data"][0]["run_id"]

    def check(page: Page) -> None:
        page.goto(page_url(server, "/session", identifier="conversation_id", value="conv_r"))
        page.locator("a.run-id").click()
        page.wait_for_url(server.url + f"/runs/{run_id}")
        expect(page.locator("#run-status")).to_have_text("Failed")
        chips = column(page, "a.session-chip")
        assert chips == ["conversation_id = conv_r", "user_id = u 1"]
        event = page.locator("article.event")
        expect(event).to_contain_text("app/report.requested")
        expect(event).to_contain_text("req-1")
        assert json.loads(event.locator("pre").text_content() or "") == {
            "report": {"week": 3, "tags": ["a", "é"]}}
        assert "\n  " in (event.locator("pre").text_content() or "")  # pretty-printed

        steps = page.locator("ol.steps > li")
        heads = column(page, "ol.steps .step-head .step-id")
        statuses = column(page, "ol.steps .step-head .status")
        assert heads[:2] == ["fetch", "fetch"]
        assert statuses[:2] == ["Failed", "Completed"]
        expect(steps.nth(0).locator(".error-message")).to_have_text(
            "ConnectionError: upstream hiccup")
        assert json.loads(steps.nth(1).locator("pre").text_content() or "") == {"items": 3}
        assert heads[2:] == ["(function)", "(function)"]  # one retry of the function
        # One numbering, from 1: the function's first attempt failed and was retried.
        expect(steps.nth(0).locator(".step-meta")).to_contain_text("attempt 1 · retried")
        expect(steps.nth(2).locator(".step-meta")).to_contain_text("attempt 1 · retried")
        expect(steps.nth(3).locator(".step-meta")).to_contain_text("attempt 2")
        expect(page.locator("#run-attempt")).to_have_text("2")

        result = page.locator("section.result")
        expect(result.locator(".error-message")).to_have_text(
            "ValueError: cannot report on 3 items <b>bold</b>")
        trace = result.locator("pre.traceback").text_content() or ""
        assert trace.startswith("Traceback (most recent call last):")
        assert "in flaky" in trace
        assert 'raise ValueError(f"cannot report on' in trace
        assert page.locator("section.result b").count() == 0  # the <b> is text

    await browser.check(check)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_live_refresh_shows_running_runs_complete_without_reloading(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = threading.Event()
    server = await make_server(support_app(gate))
    await send(http, server, "app/slow", sessions={"conversation_id": "conv_live"})
    session_url = page_url(server, "/session", identifier="conversation_id", value="conv_live")

    def check(page: Page) -> None:
        page.goto(session_url)
        status = page.locator("tr.run-row .status")
        expect(status).to_have_text("Running")
        expect(page.locator("#live-status")).to_have_text("Live")
        run_page = page.context.new_page()
        run_page.goto(server.url + (page.locator("a.run-id").get_attribute("href") or ""))
        expect(run_page.locator("#run-status")).to_have_text("Running")
        for each in (page, run_page):
            each.evaluate("window.__sameDocument = true")
        gate.set()
        expect(status).to_have_text("Completed")
        expect(page.locator("tr.run-row td.num")).not_to_have_text("—")  # a duration now
        expect(run_page.locator("#run-status")).to_have_text("Completed")
        assert json.loads(run_page.locator("section.result pre").text_content() or "") == {
            "released": True}
        for each in (page, run_page):
            assert each.evaluate("window.__sameDocument") is True
        # A finished run's page stops polling.
        expect(run_page.locator("#live-status")).to_be_hidden()

    try:
        await browser.check(check)
    finally:
        gate.set()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_live_refresh_keeps_the_page_and_says_so_when_the_server_goes_away(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    server = await make_server()
    await send(http, server, "app/ping", sessions={"conversation_id": "conv_gone"})
    loop = asyncio.get_running_loop()

    def check(page: Page) -> None:
        page.goto(page_url(server, "/session", identifier="conversation_id", value="conv_gone"))
        expect(page.locator("#live-status")).to_have_text("Live")
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        expect(page.locator("#live-status")).to_have_text("Offline, retrying")
        expect(page.locator("#session-value")).to_have_text("conv_gone")
        expect(page.locator("#figure-runs")).to_have_text("0")

    await browser.check(check, ignore=("ERR_CONNECTION_REFUSED",))


@pytest.mark.slow
@pytest.mark.asyncio
async def test_fixture_download_round_trips_through_a_second_server(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    first = await make_server(support_app())
    session = {"conversation_id": "conv/rt 1"}
    await send(http, first, "app/message.created", sessions={**session, "user_id": "u+1"},
               data={"text": "héllo"}, id="evt-1", v="2025-01-01.1", user={"email": "a@b.c"})
    await send(http, first, "app/message.created", {"text": "again"}, sessions=session,
               id="evt-1")
    await send(http, first, "app/message.created", data={"text": "bad", "fail": True},
               meta={"sessions": session})
    await send(http, first, "app/ping", sessions=session, ts=1_700_000_000_000)
    await send(http, first, "app/message.created", sessions=session, data={"notify": True})
    await idle(first)

    def download(page: Page) -> tuple[str, bytes]:
        page.goto(page_url(first, "/session", identifier="conversation_id", value="conv/rt 1"))
        with page.expect_download() as info:
            page.get_by_role("link", name="Download as fixture").click()
        path = info.value.path()
        return info.value.suggested_filename, Path(path).read_bytes()

    filename, body = await browser.check(download)
    assert filename == "session-conversation_id-conv_rt_1.jsonl"
    lines = [json.loads(line) for line in body.decode().splitlines()]
    # Only what was sent to the event API: not the run's app/summary.ready event.
    assert [line["name"] for line in lines] == ["app/message.created"] * 3 + [
        "app/ping", "app/message.created"]
    assert lines[0] == {"name": "app/message.created", "data": {"text": "héllo"}, "id": "evt-1",
                        "ts": lines[0]["ts"], "v": "2025-01-01.1", "user": {"email": "a@b.c"},
                        "sessions": {"conversation_id": "conv/rt 1", "user_id": "u+1"}}
    assert lines[3]["ts"] == 1_700_000_000_000
    assert all(line["sessions"]["conversation_id"] == "conv/rt 1" for line in lines)

    second = await make_server(support_app())
    status, reply = await post_events(http, second, lines)
    assert status == 200, reply
    await idle(second)
    params = {"identifier": "conversation_id", "value": "conv/rt 1"}
    _, before = await get_json(http, first, "/api/session", **params)
    _, after = await get_json(http, second, "/api/session", **params)
    assert before["stats"]["runs"] == 4  # the duplicate id started none, the sent event one
    assert before["stats"]["functions"] == ["support-bot-deliver", "support-bot-summarize"]
    for figure in ("runs", "failed_runs", "failure_rate", "functions"):
        assert after["stats"][figure] == before["stats"][figure], figure
    async with http.get(page_url(second, "/session/fixture", **params)) as resp:
        assert await resp.read() == body  # the replayed session exports the same fixture


@pytest.mark.slow
@pytest.mark.asyncio
async def test_environment_selector_and_env_kept_in_every_link(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser
) -> None:
    server = await make_server(support_app())
    await send(http, server, "app/message.created", sessions={"conversation_id": "conv_dev"})
    await send(http, server, "app/message.created", sessions={"conversation_id": "conv_stage"},
               env="staging")
    await idle(server)

    def check(page: Page) -> None:
        page.goto(server.url + "/sessions?identifier=conversation_id")
        expect(page.locator("td.cell-value")).to_have_text("conv_dev")
        envs = page.locator(".envs a")
        expect(envs).to_have_text(["staging", "dev"])  # most recently active first
        expect(page.locator(".envs a.current")).to_have_text("dev")
        envs.filter(has_text="staging").click()
        page.wait_for_url(re.compile(r"env=staging"))
        page.get_by_role("link", name="conversation_id").click()
        expect(page.locator("td.cell-value")).to_have_text("conv_stage")
        assert query_of(page.url)["env"] == ["staging"]
        page.locator("a.sort[data-sort=runs]").click()
        assert query_of(page.url)["env"] == ["staging"]
        page.get_by_label("Search values").fill("stage")
        page.get_by_role("button", name="Search").click()
        page.wait_for_url(re.compile(r"q=stage"))
        assert query_of(page.url)["env"] == ["staging"]
        page.locator("a.row-link").click()
        page.wait_for_url(re.compile(r"/session\?"))
        assert query_of(page.url)["env"] == ["staging"]
        assert query_of(page.locator("#fixture-link").get_attribute("href") or "")["env"] == [
            "staging"]
        page.locator("a.run-id").click()
        page.wait_for_url(re.compile(r"/runs/.*env=staging"))
        expect(page.locator(".envs a.current")).to_have_text("staging")
        page.locator("a.session-chip").click()
        expect(page.locator("#session-value")).to_have_text("conv_stage")
        assert query_of(page.url)["env"] == ["staging"]

    await browser.check(check)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_screenshots_of_the_demo(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser, tmp_path: Path
) -> None:
    """The README's screenshots, taken from `--demo` (its app and fixtures): the Sessions page
    and a session's timeline. Written to the folder DEVSERVER_SCREENSHOTS names (`docs` to
    refresh them), else to a temporary folder, so the test checks the pages either way and
    never fails because an image is unchanged."""
    from devserver import demo
    from devserver.cli.replay import read_all

    clock = VirtualClock(START)
    server = await make_server(demo.app, clock=clock)
    for event in read_all(demo.fixture_paths()):
        status, body = await post_events(http, server, event)
        assert status == 200, body
        await idle(server)
        clock.advance(47_000)
    folder = Path(os.environ.get("DEVSERVER_SCREENSHOTS") or tmp_path)
    _, doc = await get_json(http, server, "/api/sessions", identifier="conversation_id")
    failing = next(s["value"] for s in doc["sessions"] if s["failed_runs"])

    def shoot(page: Page) -> list[bytes]:
        page.goto(page_url(server, "/sessions", identifier="conversation_id"))
        expect(page.locator("tr.session-row")).to_have_count(len(doc["sessions"]))
        expect(page.locator("tr.session-row .latest-error a")).to_have_count(1)
        sessions = page.screenshot(path=str(folder / "sessions.png"), full_page=True)
        page.goto(page_url(server, "/session", identifier="conversation_id", value=failing))
        expect(page.locator("li.tl-run.tl-failed")).not_to_have_count(0)
        timeline = page.locator("#timeline").screenshot(path=str(folder / "timeline.png"))
        return [sessions, timeline]

    pngs = await browser.check(shoot, viewport={"width": 1100, "height": 420},
                               device_scale_factor=2)
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in pngs)


# ---------------------------------------------------------------------------------------------
# Plain HTTP


@pytest.mark.asyncio
async def test_root_redirects_to_sessions_keeping_the_environment(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    for path, location in (("/", "/sessions"), ("/?env=staging", "/sessions?env=staging")):
        async with http.get(server.url + path, allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == location


@pytest.mark.asyncio
async def test_html_escapes_script_values(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(support_app())
    await send(http, server, "app/message.created", sessions={"conversation_id": XSS})
    await idle(server)
    for path, params in (("/sessions", {"identifier": "conversation_id"}),
                         ("/session", {"identifier": "conversation_id", "value": XSS})):
        async with http.get(server.url + path, params=params) as resp:
            html = await resp.text()
        assert resp.status == 200
        assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in html
        assert "<script>window" not in html
        assert "<img" not in html


@pytest.mark.asyncio
async def test_pages_have_csp_and_a_json_twin_with_the_same_data(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(support_app())
    event_id = await send(http, server, "app/message.created",
                          sessions={ODD_IDENTIFIER: ODD_VALUES[0]})
    await idle(server)
    _, runs = await get_json(http, server, f"/v1/events/{event_id}/runs")
    run_id = runs["data"][0]["run_id"]
    pages = [
        ("/sessions", {}),
        ("/sessions", {"identifier": ODD_IDENTIFIER, "sort": "runs", "q": "b:c"}),
        ("/session", {"identifier": ODD_IDENTIFIER, "value": ODD_VALUES[0]}),
        (f"/runs/{run_id}", {}),
        ("/sessions", {"identifier": "unknown"}),  # error pages too
    ]
    link = re.compile(r'^<([^>]+)>; rel="alternate"; type="application/json"$')
    for path, params in pages:
        async with http.get(server.url + path, params=params) as resp:
            html = await resp.text()
            headers = resp.headers
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        # Nothing the CSP would block: no inline script, style or event handler.
        assert all(' src="/static/' in tag for tag in re.findall(r"<script[^>]*>", html))
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html)
        found = link.match(headers["Link"])
        assert found, headers["Link"]
        twin = found.group(1)
        assert twin.startswith("/api" + path)
        async with http.get(server.url + twin) as resp:
            twin_status, twin_body = resp.status, await resp.json()
        async with http.get(server.url + "/api" + path, params=params) as resp:
            assert (twin_status, twin_body) == (resp.status, await resp.json())
        assert f'href="{twin.replace("&", "&amp;")}"' in html  # the page links its twin too


@pytest.mark.asyncio
async def test_static_files_have_types_and_cache_headers(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    async with http.get(server.url + "/sessions") as resp:
        html = await resp.text()
    for name, content_type in (("style.css", "text/css; charset=utf-8"),
                               ("live.js", "text/javascript; charset=utf-8"),
                               ("favicon.svg", "image/svg+xml")):
        versioned = re.search(rf'"(/static/{re.escape(name)}\?v=[0-9a-f]+)"', html)
        assert versioned, name
        async with http.get(server.url + versioned.group(1)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == content_type
            assert "immutable" in resp.headers["Cache-Control"]
            etag = resp.headers["ETag"]
        async with http.get(f"{server.url}/static/{name}") as resp:
            assert resp.headers["Cache-Control"] == "no-cache"
        async with http.get(f"{server.url}/static/{name}",
                            headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
    async with http.get(server.url + "/static/nope.css") as resp:
        assert resp.status == 404
        assert (await resp.json())["status"] == 404
    async with http.get(server.url + "/no/such/page") as resp:  # API clients keep JSON 404s
        assert resp.status == 404
        assert (await resp.json())["status"] == 404


@pytest.mark.asyncio
async def test_fixture_download_headers_and_unknown_session(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    await send(http, server, "app/ping", sessions={"user_id": "u/1 🎉"}, data={"n": 1})
    params = {"identifier": "user_id", "value": "u/1 🎉"}
    async with http.get(server.url + "/session/fixture", params=params) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson; charset=utf-8"
        assert resp.headers["Content-Disposition"] == (
            'attachment; filename="session-user_id-u_1.jsonl"')
        body = await resp.text()
    assert body.endswith("\n")
    assert json.loads(body) == {"name": "app/ping", "data": {"n": 1},
                                "ts": json.loads(body)["ts"], "sessions": params and {
                                    "user_id": "u/1 🎉"}}
    async with http.get(server.url + "/session/fixture",
                        params={**params, "value": "other"}) as resp:
        assert resp.status == 404
        assert "Unknown session" in await resp.text()


def test_formatting_helpers() -> None:
    assert report.format_percent(0) == "0%"
    assert report.format_percent(1 / 3) == "33.3%"
    assert report.format_percent(0.5) == "50%"
    assert report.format_percent(0.0001) == "<0.1%"
    assert report.format_percent(0.99999) == ">99.9%"
    assert report.format_percent(1) == "100%"
    # One formatter for the dashboard's `percent` filter and the CLI table; the old name stays.
    assert dashboard.format_percent is report.format_percent is records.format_percent
    assert dashboard.format_duration(None) == "—"
    assert dashboard.format_duration(850) == "850 ms"
    assert dashboard.format_duration(1250) == "1.25 s"
    assert dashboard.format_duration(125_000) == "2 min 05 s"
    assert dashboard.format_duration(3_720_000) == "1 h 02 min"
    now = START
    assert dashboard.format_ago(now, now) == "just now"
    assert dashboard.format_ago("2025-01-15T09:59:48.000Z", now) == "12 s ago"
    assert dashboard.format_ago(now - 3 * 3_600_000, now) == "3 h ago"
    assert dashboard.format_ago(now - 40 * 86_400_000, now) == "2024-12-06"
    assert dashboard.format_absolute("2025-01-15T10:00:00.123Z") == "2025-01-15 10:00:00.123 UTC"
    assert dashboard.format_clock(now + 5, now) == "10:00:00"
    assert dashboard.format_clock(now - 86_400_000, now) == "Jan 14 10:00"
    link = dashboard.make_link("stage & prod")
    assert link("/session", identifier="a/b", value="c d+e", cursor=None) == (
        "/session?identifier=a%2Fb&value=c%20d%2Be&env=stage%20%26%20prod")
    assert dashboard.make_link("dev")("/sessions") == "/sessions"
    assert dashboard.fixture_filename("conversation_id", "../../etc/passwd") == (
        "session-conversation_id-etc_passwd.jsonl")
