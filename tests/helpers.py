"""Plain helpers shared by the tests (the pytest fixtures live in conftest.py).

- polling: `eventually` (async) and `eventually_sync` (blocking, for child processes and
  threads) wait on a condition with a timeout, never on a fixed sleep, and return what the
  probe found; `idle` waits until a server has no run executing or scheduled;
- servers: `MakeServer` (the `make_server` fixture's type), `sdk_server` (a devserver for real
  SDK apps, on a virtual clock) and `free_port`;
- HTTP against an in-process server: `get_json`, `get`, `post`, `post_events`, `send`;
- the browser: `Browser`, a headless Chromium driven by Playwright (the `browser` fixture);
- documents of the JSON API: `runs_of_event`, `run_doc`, `the_run`, `runs_of_function`,
  `session_doc`, `waiting_step`, and `attempts` to read a run document's steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
from playwright.sync_api import Browser as PlaywrightBrowser
from playwright.sync_api import Page, Playwright, expect, sync_playwright
from werkzeug.serving import BaseWSGIServer, make_server

from devserver.app import App, FunctionDef
from devserver.clock import Clock, VirtualClock
from devserver.web.server import Config, Server

TIMEOUT = 20.0
"""Seconds a wait may take on a slow CI box (an SDK round trip included) before a test gives
up."""
POLL_INTERVAL = 0.02
"""Seconds between two probes of a polling helper (a poll interval, not a synchronisation
point)."""

# ---------------------------------------------------------------------------------------------
# Polling


def _timed_out(timeout: float, what: str | Callable[[], str]) -> None:
    shown = what if isinstance(what, str) else what()
    pytest.fail(f"timed out after {timeout}s waiting for {shown}")


async def eventually(
    probe: Callable[[], Awaitable[Any]], what: str | Callable[[], str],
    timeout: float = TIMEOUT,
) -> Any:
    """Await `probe()` until it returns something truthy, and return that; fail the test
    after `timeout` seconds naming `what` (or what a callable `what` says then, e.g. the last
    state seen)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            _timed_out(timeout, what)
        await asyncio.sleep(POLL_INTERVAL)


def eventually_sync(
    probe: Callable[[], Any], what: str | Callable[[], str], timeout: float = TIMEOUT,
) -> Any:
    """`eventually` for blocking code: call `probe()` until it returns something truthy, and
    return that; fail the test after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            _timed_out(timeout, what)
        time.sleep(POLL_INTERVAL)


async def idle(server: Server, timeout: float = TIMEOUT) -> None:
    """Wait until the server has no run executing or waiting on a timer (on a virtual clock,
    time jumps ahead to the next timer)."""
    await asyncio.wait_for(server.runner.wait_idle(), timeout)


# ---------------------------------------------------------------------------------------------
# Servers


class MakeServer(Protocol):
    """The `make_server` fixture: start a real server on 127.0.0.1:0 with these apps."""

    async def __call__(
        self, *apps: App, retry_interval: float | None = 0, db: Path | str | None = None,
        clock: Clock | None = None, watchdog_threshold: float = 2.0,
    ) -> Server: ...


@contextlib.asynccontextmanager
async def sdk_server(
    tmp_path: Path, *, sdk_urls: Sequence[str] = (), functions: Sequence[FunctionDef] = (),
    poll_interval: float = 0.0, port: int = 0, clock: Clock | None = None,
    retry_interval: float | None = 0,
) -> AsyncIterator[Server]:
    """A running devserver for real SDK apps, with its own SQLite file under `tmp_path`.

    Virtual time unless a clock is given: the SDK apps run in real time, but sleeps, timeouts
    and backoff are the server's to keep, so hours pass at once."""
    config = Config(db=str(tmp_path / "sdk.sqlite3"), functions=list(functions),
                    retry_interval=retry_interval, sdk_urls=list(sdk_urls),
                    sdk_poll_interval=poll_interval)
    server = Server(config, port=port, clock=clock or VirtualClock())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def free_port() -> int:
    """A port nothing listens on right now (for an app that must know the server's URL
    before the server starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# HTTP


async def get_json(
    http: aiohttp.ClientSession, server: Server, path: str, **params: str
) -> tuple[int, dict[str, Any]]:
    """GET a JSON endpoint; returns (status, JSON body)."""
    async with http.get(f"{server.url}{path}", params=params) as resp:
        return resp.status, await resp.json()


async def get(http: aiohttp.ClientSession, server: Server, path: str, **params: str) -> Any:
    """GET a JSON endpoint that must answer 200; returns the JSON body."""
    status, body = await get_json(http, server, path, **params)
    assert status == 200, (path, params, body)
    return body


async def post(http: aiohttp.ClientSession, server: Server, path: str, body: Any,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST JSON; returns (status, JSON body)."""
    async with http.post(f"{server.url}{path}", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def post_events(
    http: aiohttp.ClientSession, server: Server, body: Any, *, env: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST to /e/test-key (`body` as JSON, or `raw` bytes as they are); returns (status,
    JSON body)."""
    headers = {"Content-Type": "application/json"}
    if env is not None:
        headers["X-Inngest-Env"] = env
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.post(f"{server.url}/e/test-key", data=data, headers=headers) as resp:
        return resp.status, await resp.json()


async def send(
    http: aiohttp.ClientSession, server: Server, name: str, data: dict[str, Any] | None = None,
    *, sessions: dict[str, Any] | None = None, env: str | None = None, **fields: Any,
) -> str:
    """Send one event that must be accepted, with optional sessions, environment and other
    event fields (`id`, `ts`, `meta`...); returns its internal id."""
    event: dict[str, Any] = {"name": name, "data": data or {}, **fields}
    if sessions is not None:
        event["sessions"] = sessions
    status, body = await post_events(http, server, event, env=env)
    assert status == 200, body
    return str(body["ids"][0])


# ---------------------------------------------------------------------------------------------
# Documents of the JSON API


async def runs_of_event(http: aiohttp.ClientSession, server: Server,
                        event_id: str) -> list[dict[str, Any]]:
    """`/v1/events/{id}/runs`: the runs an event started (Inngest's shape)."""
    return list((await get(http, server, f"/v1/events/{event_id}/runs"))["data"])


async def run_doc(http: aiohttp.ClientSession, server: Server, run_id: str) -> dict[str, Any]:
    """`/api/runs/{id}`: a run with its events and steps."""
    return dict(await get(http, server, f"/api/runs/{run_id}"))


async def the_run(http: aiohttp.ClientSession, server: Server, event_id: str) -> dict[str, Any]:
    """The one run an event started, in full (`run_doc`)."""
    runs = await runs_of_event(http, server, event_id)
    assert len(runs) == 1, runs
    return await run_doc(http, server, runs[0]["run_id"])


async def runs_of_function(http: aiohttp.ClientSession, server: Server,
                           function_id: str) -> list[dict[str, Any]]:
    """`/api/runs?function_id=`: newest first."""
    return list((await get(http, server, "/api/runs", function_id=function_id))["runs"])


async def session_doc(http: aiohttp.ClientSession, server: Server, identifier: str,
                      value: str, **params: str) -> dict[str, Any]:
    """`/api/session` for one session."""
    return dict(await get(http, server, "/api/session", identifier=identifier, value=value,
                          **params))


async def waiting_step(http: aiohttp.ClientSession, server: Server, run_id: str,
                       step_id: str) -> dict[str, Any]:
    """Wait until a run's step is waiting (a sleep, a wait for an event, an invoke); returns
    that step."""
    async def probe() -> dict[str, Any] | None:
        steps = (await run_doc(http, server, run_id))["steps"]
        return next((s for s in steps if s["step_id"] == step_id and s["status"] == "Waiting"),
                    None)
    return dict(await eventually(probe, f"step {step_id!r} of run {run_id} to wait"))


def attempts(run: dict[str, Any], step_id: str | None) -> list[tuple[int, str]]:
    """(attempt index, status) of a step's attempts in a run document, in order (None:
    function-level attempts). The index counts from 0, as `ctx.attempt` and the SDKs do;
    the document numbers attempts from 1, as the dashboard shows them."""
    return [(s["attempt"] - 1, s["status"]) for s in run["steps"] if s["step_id"] == step_id]


# ---------------------------------------------------------------------------------------------
# The browser

CHROMIUM = os.environ.get("DEVSERVER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 10_000
T = TypeVar("T")


class Browser:
    """A headless Chromium owned by one worker thread; `check` runs a function on a fresh page."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")
        self._playwright: Playwright | None = None
        self._browser: PlaywrightBrowser | None = None

    def start(self) -> None:
        self._pool.submit(self._start).result()

    def stop(self) -> None:
        self._pool.submit(self._stop).result()
        self._pool.shutdown()

    def _start(self) -> None:
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM,
                                                         args=CHROMIUM_ARGS)
        expect.set_options(timeout=TIMEOUT_MS)

    def _stop(self) -> None:
        if self._browser is not None:
            self._browser.close()
        if self._playwright is not None:
            self._playwright.stop()

    async def check(self, fn: Callable[[Page], T], *, ignore: tuple[str, ...] = (),
                    **context: Any) -> T:
        """Run `fn(page)` in the browser thread; fail on console errors, page errors, dialogs."""
        return await asyncio.wrap_future(self._pool.submit(self._run, fn, ignore, context))

    def _run(self, fn: Callable[[Page], T], ignore: tuple[str, ...], options: Any) -> T:
        assert self._browser is not None
        context = self._browser.new_context(
            **{"viewport": {"width": 1280, "height": 800}, "accept_downloads": True, **options})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        problems: list[str] = []

        def on_console(message: Any) -> None:
            if message.type in ("error", "warning") and not any(
                    text in message.text for text in ignore):
                problems.append(f"console {message.type}: {message.text}")

        def on_dialog(dialog: Any) -> None:
            problems.append(f"dialog: {dialog.message}")
            dialog.dismiss()

        page.on("console", on_console)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("dialog", on_dialog)
        context.on("page", lambda other: other.on("dialog", on_dialog))
        try:
            result = fn(page)
        finally:
            context.close()
        assert not problems, problems
        return result


# ---------------------------------------------------------------------------------------------
# Python SDK apps


class ServedFlask:
    """A Flask app (an Inngest SDK app's) served by werkzeug on 127.0.0.1 from a thread."""

    def __init__(self, app: Any, name: str, port: int = 0) -> None:
        self._server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name=name)
        self._thread.start()

    @property
    def url(self) -> str:
        """The SDK's serve endpoint."""
        return f"http://127.0.0.1:{self._server.server_port}/api/inngest"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


async def close_sdk_client(client: Any) -> None:
    """Close an `inngest.Inngest` client's HTTP clients: the SDK never closes them itself, and
    their sockets would leak."""
    http = client._http_client
    await http._http_client.aclose()
    http._http_client_sync.close()
