"""Shared test fixtures: a real devserver on port 0 with its own SQLite file, an HTTP client,
`spawn` for devserver child processes and `browser` (headless Chromium, one per module).
Plain helpers are in tests/helpers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from devserver.app import App
from devserver.clock import Clock
from devserver.web.server import Config, Server

from .helpers import CHROMIUM, Browser, MakeServer
from .procs import spawn as spawn


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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: the page tests need it "
                    "(apt-get install chromium; .ci/run does)")
    owner = Browser()
    owner.start()
    yield owner
    owner.stop()
