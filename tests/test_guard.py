"""No other web page can drive the server (SPEC 8, README "Safety"): requests addressed to another
host get 403, and state-changing requests a browser sends from another origin get 403 before
anything is stored, while curl, the SDKs and the fixture (no `Origin`) work as before.

The rules are checked with plain values, against a real server with forged headers, and from a
real headless Chromium page served by another server on another port.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devserver.web.guard import Guard

from .helpers import Browser, MakeServer, get_json, post_events

EVENT = {"name": "app/probe", "data": {}, "sessions": {"conversation_id": "c1"}}


# ---------------------------------------------------------------------------------------------
# The rules, with plain values


@pytest.mark.parametrize("host", [
    "127.0.0.1:8288", "localhost:8288", "LOCALHOST", "[::1]:8288", "app.localhost:1",
    "10.0.0.7:8288", "127.0.0.1"])
def test_loopback_names_and_ip_literals_are_answered(host: str) -> None:
    assert Guard().host_allowed(host)


@pytest.mark.parametrize("host", [
    "evil.example:8288", "evil.example", "localhost.evil.example", "127.0.0.1.nip.io",
    "user@127.0.0.1", "", "a b", "[zz]:1"])
def test_other_names_are_refused(host: str) -> None:
    assert not Guard().host_allowed(host)


def test_extra_names_and_the_bound_name_are_answered() -> None:
    guard = Guard("devbox.internal", allowed_hosts=["host.docker.internal"])
    assert guard.host_allowed("host.docker.internal:8288")
    assert guard.host_allowed("devbox.internal:8288")
    assert not guard.host_allowed("other.internal:8288")


def test_listening_beyond_loopback_answers_to_the_machine_name() -> None:
    assert Guard("0.0.0.0").host_allowed(f"{socket.gethostname()}:8288")
    assert not Guard("127.0.0.1").host_allowed(f"{socket.gethostname()}.invalid:8288")


@pytest.mark.parametrize(("origin", "site", "ok"), [
    (None, None, True),  # curl, the SDKs, the fixture
    ("http://127.0.0.1:8288", "same-origin", True),  # the dashboard's own pages
    ("http://127.0.0.1:8288", None, True),
    (None, "same-origin", True),
    (None, "none", True),
    ("http://127.0.0.1:3000", "same-site", False),  # another port is another origin
    ("http://localhost:8288", "cross-site", False),  # another name too
    ("https://127.0.0.1:8288", None, False),
    ("null", "cross-site", False),  # sandboxed frames, file:// pages
    ("https://evil.example", "cross-site", False),
    (None, "cross-site", False),
    (None, "same-site", False),
])
def test_state_changes_only_from_this_origin(origin: str | None, site: str | None,
                                             ok: bool) -> None:
    assert Guard().origin_allowed(origin, site, "127.0.0.1:8288") is ok


def test_allowed_origins_are_let_through() -> None:
    guard = Guard(allowed_origins=["http://localhost:3000/"])
    assert guard.origin_allowed("http://localhost:3000", "same-site", "127.0.0.1:8288")
    assert not guard.origin_allowed("http://localhost:3001", "same-site", "127.0.0.1:8288")


# ---------------------------------------------------------------------------------------------
# A real server, forged headers


async def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (aiohttp's client would fix the Host header); read the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


@pytest.mark.asyncio
async def test_a_forged_host_is_refused_on_every_path(make_server: MakeServer) -> None:
    server = await make_server()
    for path in (b"/api/sessions", b"/sessions", b"/health", b"/v1/events/x"):
        status, body = await raw_request(
            server.url, b"GET " + path + b" HTTP/1.1\r\nHost: evil.example:8288\r\n"
            b"Connection: close\r\n\r\n")
        assert status == 403, (path, body)
        assert b"evil.example" in body
    body = b'{"name": "app/x"}'
    status, answer = await raw_request(
        server.url, b"POST /e/key HTTP/1.1\r\nHost: evil.example\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    assert status == 403
    assert b'"ids":[]' in answer
    status, _ = await raw_request(
        server.url, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status == 200


@pytest.mark.asyncio
async def test_cross_origin_state_changes_are_refused_before_anything_is_stored(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    server = await make_server()
    evil = {"Origin": "https://evil.example", "Content-Type": "text/plain",
            "Sec-Fetch-Site": "cross-site"}
    registration = {"url": "https://evil.example/api/inngest", "appname": "evil",
                    "framework": "flask", "sdk": "py:v0.5.19", "v": "0.1", "functions": []}
    for path, body in (("/e/key", EVENT), ("/fn/register", registration),
                       ("/api/apps/sync", {"url": "https://evil.example/api/inngest"}),
                       ("/e/key", [EVENT, EVENT])):
        async with http.post(server.url + path, json=body, headers=evil) as resp:
            assert resp.status == 403, path
            doc = await resp.json()
            assert "https://evil.example" in doc["error"]
    async with http.delete(server.url + "/v1/runs/01J00000000000000000000000",
                           headers={"Sec-Fetch-Site": "cross-site"}) as resp:
        assert resp.status == 403
    _, identifiers = await get_json(http, server, "/api/sessions")
    assert identifiers["identifiers"] == []
    _, apps = await get_json(http, server, "/api/apps")
    assert apps["apps"] == []
    # The same requests with no Origin (curl, the SDKs) or from this origin go through.
    status, plain = await post_events(http, server, EVENT)
    assert status == 200
    async with http.post(server.url + "/e/key", json=EVENT,
                         headers={"Origin": server.url, "Sec-Fetch-Site": "same-origin"}) as resp:
        assert resp.status == 200
        same_origin = await resp.json()
    for event_id in plain["ids"] + same_origin["ids"]:
        status, _ = await get_json(http, server, f"/v1/events/{event_id}")
        assert status == 200


# ---------------------------------------------------------------------------------------------
# A real browser page on another origin


ATTACK_PAGE = """<!doctype html><meta charset="utf-8"><title>attack</title>
<script>
async function attack(base) {
  const results = [];
  const shots = [
    ["/e/key", JSON.stringify({name: "app/probe", data: {}, sessions: {conversation_id: "evil"}})],
    ["/fn/register", JSON.stringify({url: "http://attacker.invalid/api/inngest", appname: "evil",
       framework: "flask", sdk: "py:v0.5.19", v: "0.1", functions: []})],
    ["/api/apps/sync", JSON.stringify({url: "http://attacker.invalid/api/inngest"})],
  ];
  for (const [path, body] of shots) {
    try {
      await fetch(base + path, {method: "POST", mode: "no-cors", body,
                                headers: {"Content-Type": "text/plain"}});
      results.push(path + ": sent");
    } catch (e) { results.push(path + ": " + e); }
  }
  let read = "unread";
  try { read = await (await fetch(base + "/api/sessions")).text(); }
  catch (e) { read = "blocked"; }
  return {results, read};
}
</script>"""


@pytest.mark.asyncio
@pytest.mark.slow
async def test_a_page_on_another_origin_can_neither_write_nor_read(
    make_server: MakeServer, http: aiohttp.ClientSession, browser: Browser, tmp_path: Path,
) -> None:
    server = await make_server()
    attacker = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=ATTACK_PAGE, content_type="text/html")

    attacker.router.add_get("/", page)
    runner = web.AppRunner(attacker)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        def run(p: Any) -> Any:
            p.goto(f"http://127.0.0.1:{port}/")
            return p.evaluate("base => attack(base)", server.url)

        outcome = await browser.check(run, ignore=("Failed to load resource", "CORS",
                                                   "Access-Control-Allow-Origin", "net::ERR"))
    finally:
        await runner.cleanup()
    assert all(line.endswith(": sent") for line in outcome["results"]), outcome
    assert outcome["read"] == "blocked"  # no CORS headers: the page can't read the answer
    _, identifiers = await get_json(http, server, "/api/sessions")
    assert identifiers["identifiers"] == []
    _, apps = await get_json(http, server, "/api/apps")
    assert apps["apps"] == []
