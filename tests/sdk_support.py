"""Helpers for the tests that run real Inngest SDK apps against a real devserver.

A devserver on 127.0.0.1 with its own SQLite file and a virtual clock (the SDK apps run in
real time, but sleeps, timeouts and backoff are the server's to keep, so hours pass at once),
plus polling helpers that wait on conditions with a timeout, never on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devserver.clock import Clock, VirtualClock
from devserver.functions import FunctionDef
from devserver.server import Config, Server

TIMEOUT = 20.0
"""Seconds an SDK round trip may take on a slow CI box before a test gives up."""


@contextlib.asynccontextmanager
async def sdk_server(
    tmp_path: Path, *, sdk_urls: Sequence[str] = (), functions: Sequence[FunctionDef] = (),
    poll_interval: float = 0.0, port: int = 0, clock: Clock | None = None,
    retry_interval: float | None = 0,
) -> AsyncIterator[Server]:
    """A running devserver for SDK apps; virtual time unless a clock is given."""
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


async def eventually(
    probe: Callable[[], Awaitable[Any]], what: str, timeout: float = TIMEOUT,
) -> Any:
    """Poll `probe` until it returns something truthy, and return that; fail after
    `timeout` seconds naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def get(http: aiohttp.ClientSession, server: Server, path: str,
              **params: str) -> Any:
    """GET a JSON endpoint that must answer 200."""
    async with http.get(f"{server.url}{path}", params=params) as resp:
        body = await resp.json()
        assert resp.status == 200, (path, body)
        return body


async def post(http: aiohttp.ClientSession, server: Server, path: str, body: Any,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST JSON; returns (status, JSON body)."""
    async with http.post(f"{server.url}{path}", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def idle(server: Server, timeout: float = TIMEOUT) -> None:
    """Wait until no run executes or waits on a timer (virtual time jumps ahead)."""
    await asyncio.wait_for(server.runner.wait_idle(), timeout)


async def runs_of_event(http: aiohttp.ClientSession, server: Server,
                        event_id: str) -> list[dict[str, Any]]:
    """`/v1/events/{id}/runs`: the runs an event started (Inngest's shape)."""
    return list((await get(http, server, f"/v1/events/{event_id}/runs"))["data"])


async def the_run(http: aiohttp.ClientSession, server: Server, event_id: str) -> dict[str, Any]:
    """The one run an event started, as the run page's JSON twin shows it."""
    runs = await runs_of_event(http, server, event_id)
    assert len(runs) == 1, runs
    return dict(await get(http, server, f"/api/runs/{runs[0]['run_id']}"))


async def run_doc(http: aiohttp.ClientSession, server: Server, run_id: str) -> dict[str, Any]:
    """`/api/runs/{id}`."""
    return dict(await get(http, server, f"/api/runs/{run_id}"))


async def runs_of_function(http: aiohttp.ClientSession, server: Server,
                           function_id: str) -> list[dict[str, Any]]:
    """`/api/runs?function_id=`: newest first."""
    return list((await get(http, server, "/api/runs", function_id=function_id))["runs"])


async def waiting_step(http: aiohttp.ClientSession, server: Server, run_id: str,
                       step_id: str) -> dict[str, Any]:
    """Wait until a run's step is waiting (a sleep, a wait for an event, an invoke)."""
    async def probe() -> dict[str, Any] | None:
        steps = (await run_doc(http, server, run_id))["steps"]
        return next((s for s in steps if s["step_id"] == step_id and s["status"] == "Waiting"),
                    None)
    return dict(await eventually(probe, f"step {step_id!r} of run {run_id} to wait"))


def attempts(run: dict[str, Any], step_id: str | None) -> list[tuple[int, str]]:
    """(attempt, status) of a step's attempts, in order (None: function-level attempts)."""
    return [(s["attempt"], s["status"]) for s in run["steps"] if s["step_id"] == step_id]
