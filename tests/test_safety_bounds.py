"""SPEC 8, "Bounded": idle and slow connections are closed, SDK replies are capped while they
are read, the log does not flood at the descriptor limit, registration and re-sync stay linear,
and every list endpoint is paged."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from devserver.app import FunctionDef
from devserver.cli.logs import RateLimit
from devserver.clock import VirtualClock
from devserver.model.registry import Registry
from devserver.sdk import apps as apps_module
from devserver.sdk.registration import Registration, parse_registration
from devserver.store.facade import Store
from devserver.web.server import Config, Server

from .helpers import eventually, get, get_json, send
from .procs import START_TIMEOUT, URL_LINE, child_env

TIMEOUT = 20.0


@pytest_asyncio.fixture
async def servers(tmp_path: Path) -> AsyncIterator[list[Server]]:
    """Servers a test starts with its own Config; stopped after it."""
    started: list[Server] = []
    yield started
    for server in reversed(started):
        await server.stop()


async def start(servers: list[Server], tmp_path: Path, **options: Any) -> Server:
    clock = options.pop("clock", None)
    config = Config(db=str(tmp_path / f"db{len(servers)}.sqlite3"), retry_interval=0,
                    sdk_poll_interval=0, **options)
    server = Server(config, port=0, clock=clock)
    await server.start()
    servers.append(server)
    return server


async def open_raw(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    return await asyncio.wait_for(reader.read(), timeout)


# ---------------------------------------------------------------------------------------------
# Idle and slow connections


@pytest.mark.asyncio
async def test_idle_keep_alive_and_trickling_headers_are_closed(
    servers: list[Server], tmp_path: Path
) -> None:
    server = await start(servers, tmp_path, idle_timeout=0.3)
    # A connection that never sends anything.
    silent_r, silent_w = await open_raw(server)
    # One that sends half a request head and stops.
    half_r, half_w = await open_raw(server)
    half_w.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await half_w.drain()
    # One that is served, then left idle (keep-alive).
    kept_r, kept_w = await open_raw(server)
    kept_w.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await kept_w.drain()
    head = await asyncio.wait_for(kept_r.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200"), head
    began = time.monotonic()
    assert await closed_by_server(silent_r) == b""
    assert await closed_by_server(half_r) == b""
    rest = await closed_by_server(kept_r)  # the rest of the /health body, then EOF
    assert b"OK" in rest
    assert time.monotonic() - began < 10.0
    for writer in (silent_w, half_w, kept_w):
        writer.close()


@pytest.mark.asyncio
async def test_idle_timeout_default_is_one_a_user_will_not_hit() -> None:
    config = Config()
    assert config.idle_timeout >= 60
    assert config.body_timeout >= 30


@pytest.mark.asyncio
async def test_a_body_slower_than_the_deadline_gets_408_and_is_closed(
    servers: list[Server], tmp_path: Path
) -> None:
    server = await start(servers, tmp_path, body_timeout=0.3)
    body = json.dumps({"name": "app/slow", "data": {}}).encode()
    reader, writer = await open_raw(server)
    writer.write(b"POST /e/key HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
    await writer.drain()
    answer = await closed_by_server(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 0.3 s" in answer
    async with aiohttp.ClientSession() as http:  # nothing of it was stored
        assert (await get(http, server, "/api/environments"))["environments"] == []


@pytest.mark.asyncio
async def test_a_body_trickling_within_the_deadline_is_served(
    servers: list[Server], tmp_path: Path
) -> None:
    server = await start(servers, tmp_path, body_timeout=5.0, idle_timeout=5.0)
    body = json.dumps({"name": "app/trickle", "data": {"pad": "p" * 200}}).encode()
    reader, writer = await open_raw(server)
    writer.write(b"POST /e/key HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 40):
        writer.write(body[i:i + 40])
        await writer.drain()
        await asyncio.sleep(0.01)  # pacing the slow client, not synchronising
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head


# ---------------------------------------------------------------------------------------------
# The log at the descriptor limit


def test_rate_limit_passes_one_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    limit = RateLimit(interval=10.0, clock=lambda: now[0])

    def record(msg: str, level: int = logging.ERROR, errno: int | None = 24) -> logging.LogRecord:
        exc = OSError(errno, "Too many open files") if errno else None
        return logging.LogRecord("asyncio", level, __file__, 1, msg, None,
                                 (type(exc), exc, None) if exc else None)

    assert limit.filter(record("socket.accept() out of system resource"))
    assert not any(limit.filter(record("socket.accept() out of system resource"))
                   for _ in range(500))
    # Another kind passes; info lines always pass.
    assert limit.filter(record("something else"))
    assert all(limit.filter(record("run x done", logging.INFO, None)) for _ in range(5))
    # Numbers and addresses don't make a kind (asyncio's callback reports differ in them).
    assert limit.filter(record("Exception in callback <Handle when=1.5 at 0x7f01>"))
    assert not limit.filter(record("Exception in callback <Handle when=2.25 at 0x7f99>"))
    now[0] = 11.0
    later = record("socket.accept() out of system resource")
    assert limit.filter(later)
    assert "500 more like this in the last 11 s were not logged" in later.getMessage()


def test_rate_limit_leaves_what_user_code_logs_alone() -> None:
    limit = RateLimit(interval=10.0, clock=lambda: 0.0)
    for name in ("devserver.functions.shop-charge", "shop.payments", "root"):
        records = [logging.LogRecord(name, logging.WARNING, __file__, 1, "retry %d", (i,), None)
                   for i in range(100)]
        assert all(limit.filter(r) for r in records), name
    ours = [logging.LogRecord("devserver.web.api", logging.WARNING, __file__, 1, "x %d", (i,),
                              None) for i in range(100)]
    assert sum(limit.filter(r) for r in ours) == 1


SITECUSTOMIZE = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))
"""


@pytest.mark.slow
def test_at_the_descriptor_limit_the_log_does_not_flood(tmp_path: Path) -> None:
    limit = 64
    lim = tmp_path / "lim"
    lim.mkdir()
    (lim / "sitecustomize.py").write_text(SITECUSTOMIZE.format(limit=limit))
    err = tmp_path / "stderr.txt"
    env = child_env(lim)
    with err.open("wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devserver", "--port", "0", "--db",
             str(tmp_path / "db.sqlite3")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=err_file, text=True)
    socks: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = None
        deadline = time.monotonic() + START_TIMEOUT
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            match = URL_LINE.match(line)
            port = int(match.group(2)) if match else None
        assert port is not None, err.read_text()
        for _ in range(limit * 2):  # more than the child has descriptors for
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))

        def saw_emfile() -> bool:
            return "out of system resource" in err.read_text(errors="replace")
        deadline = time.monotonic() + TIMEOUT
        while not saw_emfile() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert saw_emfile(), err.read_text()
        # Let asyncio retry accept() for a few seconds (it logs every failure, ~100 a second).
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            time.sleep(0.1)
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    text = err.read_text(errors="replace")
    # Unlimited, this is megabytes (measured: 4 MB in 5 s); limited, one report a kind.
    assert len(text.encode()) < 20_000, (len(text), text[:3000])
    assert text.count("out of system resource") <= 2, text[:3000]


# ---------------------------------------------------------------------------------------------
# SDK replies


def registration(app_url: str, fn_ids: list[str], *, retries: int = 0,
                 event: str = "app/big") -> dict[str, Any]:
    return {"appname": "bounds", "url": app_url, "sdk": "py:test", "framework": "aiohttp",
            "functions": [{
                "id": fn_id, "name": fn_id, "triggers": [{"event": event}],
                "steps": {"step": {"id": "step", "name": "step", "retries": {"attempts": retries},
                                   "runtime": {"type": "http",
                                               "url": f"{app_url}?fnId={fn_id}&stepId=step"}}},
            } for fn_id in fn_ids]}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest_asyncio.fixture
async def huge_app() -> AsyncIterator[tuple[str, list[int]]]:
    """An aiohttp server posing as an SDK app: `?fnId=claims` answers with a Content-Length of
    2 GiB, `?fnId=streams` streams chunks lazily without one (no GBs are ever allocated)."""
    streamed: list[int] = [0]

    async def serve(request: web.Request) -> web.StreamResponse:
        await request.read()
        fn = request.query.get("fnId")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if fn == "claims":
            response.content_length = 2 * 1024 ** 3
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * (1024 * 1024)
        try:
            for _ in range(2048):  # up to 2 GiB, one MiB at a time, while the reader reads
                await response.write(chunk)
                streamed[0] += len(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return response

    app = web.Application()
    app.router.add_post("/api/inngest", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/api/inngest", streamed
    await runner.cleanup()


@pytest.mark.asyncio
@pytest.mark.slow
async def test_an_sdk_reply_over_the_cap_fails_the_attempt_and_memory_stays_bounded(
    servers: list[Server], tmp_path: Path, huge_app: tuple[str, list[int]]
) -> None:
    app_url, streamed = huge_app
    cap = 8 * 1024 * 1024
    server = await start(servers, tmp_path, max_sdk_reply_bytes=cap, clock=VirtualClock())
    async with aiohttp.ClientSession() as http:
        status, doc = await _post(http, server, "/fn/register",
                                  registration(app_url, ["claims", "streams"]))
        assert status == 200, doc
        before = rss_bytes()
        event_id = await send(http, server, "app/big")

        async def failed_runs() -> list[dict[str, Any]] | None:
            runs = (await get(http, server, f"/v1/events/{event_id}/runs"))["data"]
            done = [r for r in runs if r["status"] == "Failed"]
            return done if len(done) == 2 else None
        runs = await eventually(failed_runs, "both runs to fail", timeout=TIMEOUT)
        grown = rss_bytes() - before
        errors = {}
        for run in runs:
            full = await get(http, server, f"/api/runs/{run['run_id']}")
            errors[run["function_id"]] = json.dumps(full)
    assert "SdkReplyTooLargeError" in errors["claims"]
    assert "2048 MiB (Content-Length), over the 8 MiB cap on SDK replies" in errors["claims"]
    assert "passed the 8 MiB cap on SDK replies" in errors["streams"]
    assert streamed[0] < 512 * 1024 * 1024  # the stream was cut off, not drained
    assert grown < 200 * 1024 * 1024, f"RSS grew {grown / 2**20:.0f} MiB"


async def _post(http: aiohttp.ClientSession, server: Server, path: str,
                body: Any) -> tuple[int, Any]:
    async with http.post(f"{server.url}{path}", json=body) as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------------------------------------
# Registration and re-sync


@pytest.mark.asyncio
async def test_an_unchanged_re_registration_does_no_work(
    servers: list[Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start(servers, tmp_path)
    url = "http://127.0.0.1:9/api/inngest"
    body = registration(url, [f"fn-{i}" for i in range(50)])
    async with aiohttp.ClientSession() as http:
        status, doc = await _post(http, server, "/fn/register", body)
        assert (status, doc["modified"]) == (200, True), doc
        registry = server.runner.registry
        parsed: list[object] = []

        def counted_parse(raw: Any) -> Registration:
            parsed.append(raw)
            return parse_registration(raw)
        monkeypatch.setattr(apps_module, "parse_registration", counted_parse)
        status, doc = await _post(http, server, "/fn/register", json.loads(json.dumps(body)))
        assert (status, doc["modified"]) == (200, False), doc
        assert server.runner.registry is registry  # not rebuilt
        assert parsed == []  # not even parsed
        # A real change is still picked up.
        body["functions"][0]["name"] = "renamed"
        status, doc = await _post(http, server, "/fn/register", body)
        assert (status, doc["modified"]) == (200, True), doc
        assert server.runner.registry is not registry
        assert len(parsed) == 1
        renamed = server.runner.registry.get("fn-0")
        assert renamed is not None
        assert renamed.name == "renamed"


def test_registering_thousands_of_functions_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts the comparisons of functions and of their ids that registering makes: the old
    duplicate checks compared every one with every other (quadratic, 50 million for 10,000);
    dict lookups need none."""
    compared = [0]
    real_eq = FunctionDef.__eq__

    def counting_eq(self: FunctionDef, other: object) -> bool:
        compared[0] += 1
        return bool(real_eq(self, other))
    monkeypatch.setattr(FunctionDef, "__eq__", counting_eq)

    class CountedId(str):
        """A function id that counts how often it is compared (dict lookups hash instead)."""

        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            compared[0] += 1
            return str.__eq__(self, other) is True

    def cost(n: int) -> int:
        compared[0] = 0
        # One event for all: every function lands in the same trigger bucket.
        body = registration("http://127.0.0.1:9/api/inngest", [f"fn-{i}" for i in range(n)])
        for config in body["functions"]:
            config["id"] = CountedId(config["id"])
        reg = parse_registration(body)
        Registry(reg.functions).replaced(reg.functions, lambda fn: True)
        return compared[0]
    small, big = cost(2000), cost(10000)
    assert big <= 5 * small + 10, (small, big)
    assert big <= 10000, big


def test_duplicate_ids_are_still_refused() -> None:
    from devserver.errors import UserError

    body = registration("http://127.0.0.1:9/api/inngest", ["a", "b", "a"])
    with pytest.raises(UserError, match=r"functions\[2\]: two functions have the id 'a'"):
        parse_registration(body)
    fns = parse_registration(registration("http://127.0.0.1:9/api/inngest", ["a"])).functions
    with pytest.raises(UserError, match="two functions have the id 'a'"):
        Registry([*fns, *parse_registration(
            registration("http://127.0.0.1:9/api/inngest", ["a"])).functions])


# ---------------------------------------------------------------------------------------------
# Paging


@pytest.mark.asyncio
async def test_identifiers_and_environments_are_paged(
    servers: list[Server], tmp_path: Path
) -> None:
    server = await start(servers, tmp_path)
    async with aiohttp.ClientSession() as http:
        events = [{"name": "app/x", "data": {}, "sessions": {f"ident{i:02d}": "v"}}
                  for i in range(7)]
        async with http.post(f"{server.url}/e/key", json=events) as resp:
            assert resp.status == 200
        for env in ("e1", "e2", "e3"):
            await send(http, server, "app/x", env=env)

        seen: list[str] = []
        cursor = None
        for _ in range(10):
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            doc = await get(http, server, "/api/sessions", **params)
            assert len(doc["identifiers"]) <= 3
            seen.extend(i["identifier"] for i in doc["identifiers"])
            cursor = doc["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == [f"ident{i:02d}" for i in range(7)]
        assert len(seen) == len(set(seen))

        envs: list[str] = []
        cursor = None
        for _ in range(10):
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            doc = await get(http, server, "/api/environments", **params)
            envs.extend(e["env"] for e in doc["environments"])
            cursor = doc["next_cursor"]
            if cursor is None:
                break
        assert sorted(envs) == ["dev", "e1", "e2", "e3"]

        status, doc = await get_json(http, server, "/api/sessions", limit="100000")
        assert status == 400
        assert "limit must be an integer from 1 to 500" in str(doc)
        status, doc = await get_json(http, server, "/api/sessions", cursor="nonsense")
        assert status == 400, doc

        # The dashboard page links to the next page, which shows the rest.
        async with http.get(f"{server.url}/sessions", params={"limit": "5"}) as resp:
            html = await resp.text()
        assert resp.status == 200
        match = re.search(r'href="([^"]*cursor=[^"]*)" rel="next"', html)
        assert match, html
        shown = set(re.findall(r"ident\d\d", html))
        async with http.get(server.url + match.group(1).replace("&amp;", "&")) as resp:
            rest = await resp.text()
        assert resp.status == 200
        assert 'rel="first"' in rest
        assert shown | set(re.findall(r"ident\d\d", rest)) == {f"ident{i:02d}" for i in range(7)}


@pytest.mark.asyncio
async def test_identifier_pages_stay_small_for_many_identifiers(tmp_path: Path) -> None:
    """50,000 identifiers: the default page is 50 of them, not all."""
    path = tmp_path / "many.sqlite3"
    store = Store(str(path))
    await store.open()  # creates the schema
    await store.close()
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO identifiers (env, identifier, sessions) VALUES ('dev', ?, 1)",
                       [(f"id-{i:05d}",) for i in range(50_000)])
    store = Store(str(path))
    await store.open()
    try:
        page = await store.identifiers_page("dev", limit=50)
        assert len(page.rows) == 50
        assert page.next_cursor is not None
        assert await store.identifier_known("dev", "id-00042")
        assert not await store.identifier_known("dev", "nope")
    finally:
        await store.close()

