"""Shared test fixtures: a real devserver on port 0 with its own SQLite file, and an HTTP client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import pytest_asyncio

from devserver.clock import Clock
from devserver.functions import App
from devserver.server import Config, Server

from .procs import spawn as spawn


class MakeServer(Protocol):
    async def __call__(
        self, *apps: App, retry_interval: float | None = 0, db: Path | str | None = None,
        clock: Clock | None = None, watchdog_threshold: float = 2.0,
    ) -> Server: ...


@pytest_asyncio.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[MakeServer]:
    """Start real servers on 127.0.0.1:0 (each with a SQLite file under tmp_path); stop them all."""
    servers: list[Server] = []

    async def make(
        *apps: App, retry_interval: float | None = 0, db: Path | str | None = None,
        clock: Clock | None = None, watchdog_threshold: float = 2.0,
    ) -> Server:
        path = db if db is not None else tmp_path / f"db{len(servers)}.sqlite3"
        config = Config(db=str(path), functions=[fn for app in apps for fn in app.functions],
                        retry_interval=retry_interval, watchdog_threshold=watchdog_threshold)
        server = Server(config, port=0, clock=clock)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        await server.stop()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session, closed after the test."""
    async with aiohttp.ClientSession() as session:
        yield session


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll an async predicate until it holds; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def idle(server: Server, timeout: float = 10.0) -> None:
    """Wait until the server has no run executing or scheduled."""
    await asyncio.wait_for(server.runner.wait_idle(), timeout)


async def post_events(
    http: aiohttp.ClientSession, server: Server, body: Any, *, env: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST to /e/test-key; returns (status, JSON body)."""
    headers = {"Content-Type": "application/json"}
    if env is not None:
        headers["X-Inngest-Env"] = env
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.post(f"{server.url}/e/test-key", data=data, headers=headers) as resp:
        return resp.status, await resp.json()


async def get_json(
    http: aiohttp.ClientSession, server: Server, path: str, **params: str
) -> tuple[int, dict[str, Any]]:
    """GET a JSON endpoint; returns (status, JSON body)."""
    async with http.get(f"{server.url}{path}", params=params) as resp:
        return resp.status, await resp.json()


async def send(
    http: aiohttp.ClientSession, server: Server, name: str, data: dict[str, Any] | None = None,
    sessions: dict[str, Any] | None = None, env: str | None = None,
) -> str:
    """Send one event with optional sessions; returns its id."""
    event: dict[str, Any] = {"name": name, "data": data or {}}
    if sessions:
        event["sessions"] = sessions
    status, body = await post_events(http, server, event, env=env)
    assert status == 200, body
    return str(body["ids"][0])


async def runs_of(http: aiohttp.ClientSession, server: Server, event_id: str) -> list[Any]:
    """The runs an event started (Inngest's shape)."""
    status, body = await get_json(http, server, f"/v1/events/{event_id}/runs")
    assert status == 200, body
    return list(body["data"])


async def run_detail(http: aiohttp.ClientSession, server: Server, run_id: str) -> Any:
    """A run with its events and steps."""
    status, body = await get_json(http, server, f"/api/runs/{run_id}")
    assert status == 200, body
    return body


async def the_run(http: aiohttp.ClientSession, server: Server, event_id: str) -> Any:
    """The one run an event started, in full."""
    runs = await runs_of(http, server, event_id)
    assert len(runs) == 1, runs
    return await run_detail(http, server, runs[0]["run_id"])


async def session_doc(http: aiohttp.ClientSession, server: Server, ident: str, value: str
                      ) -> Any:
    """`/api/session` for one session."""
    status, body = await get_json(http, server, "/api/session", identifier=ident, value=value)
    assert status == 200, body
    return body
