"""The `devserver` pytest fixture, registered as a pytest11 plugin by the package.

Importing this module imports nothing heavy (it is loaded into every pytest run of a project that
has devserver installed); the server itself is imported when a test first asks for the fixture.

Configuration, the pytest way:
- ini option `devserver_apps`: app specs (`package.module:app` or `path/to/file.py`) that every
  test's server loads; or override the `devserver_apps` fixture in a conftest.
- marker `@pytest.mark.devserver(apps=[...], virtual_time=True, retry_interval=None,
  raise_on_failure=True, env="dev")` for one test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from devserver.testing import DevServer, LoopThread

MARKER = (
    "devserver(apps=None, virtual_time=True, retry_interval=None, raise_on_failure=True, "
    "env='dev'): options for this test's devserver fixture"
)
OPTIONS = ("apps", "virtual_time", "retry_interval", "raise_on_failure", "env")


def pytest_addoption(parser: pytest.Parser) -> None:
    """The `devserver_apps` ini option."""
    parser.addini("devserver_apps", type="args", default=[],
                  help="devserver: app specs (module:attr or file.py) every test server loads")


def pytest_configure(config: pytest.Config) -> None:
    """Declare the `devserver` marker (so --strict-markers accepts it)."""
    config.addinivalue_line("markers", MARKER)


@pytest.fixture(scope="session")
def devserver_loop() -> Iterator[LoopThread]:
    """The event loop thread all of a session's test servers run on."""
    from devserver.testing import LoopThread

    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def devserver_apps(request: pytest.FixtureRequest) -> list[Any]:
    """Apps every test server loads: the `devserver_apps` ini option. Override to choose."""
    return list(request.config.getini("devserver_apps"))


@pytest.fixture
def devserver(
    request: pytest.FixtureRequest, devserver_loop: LoopThread, devserver_apps: list[Any],
    tmp_path: Path,
) -> Iterator[DevServer]:
    """A running devserver for this test: real HTTP on an ephemeral port, its own SQLite file
    (kept in the test's tmp_path), virtual time. See `devserver.testing.DevServer`."""
    from devserver.testing import DevServer

    marker = request.node.get_closest_marker("devserver")
    options: dict[str, Any] = dict(marker.kwargs) if marker else {}
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.devserver: unknown option(s) {sorted(unknown)}; "
                                f"use {', '.join(OPTIONS)}")
    apps = options.pop("apps", None)
    server = DevServer(devserver_loop, tmp_path / "devserver.sqlite3",
                       apps=devserver_apps if apps is None else apps, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
