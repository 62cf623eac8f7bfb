"""The server: wires store, runner and routes into an aiohttp app and serves it.

Long-lived resources are aiohttp cleanup contexts, so they open in order on start and close in
reverse on shutdown: HTTP stops accepting first, then the runner stops (unfinished runs stay
resumable in the database), then the store commits what is queued and closes.
`Server` binds its socket itself (port 0 picks a free port) and keeps it, so callers know the
URL before the first request and no other process can take the port in between.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from devserver.app import FunctionDef
from devserver.clock import Clock, WallClock
from devserver.errors import ConfigError
from devserver.model.events import MAX_BODY_BYTES
from devserver.model.retry import Backoff, FixedBackoff, InngestBackoff
from devserver.runtime.local import DEFAULT_FUNCTION_TIMEOUT, LocalExecutor
from devserver.runtime.reload import AppReloader
from devserver.runtime.runner import Runner
from devserver.runtime.watchdog import DEFAULT_THRESHOLD, LoopWatchdog
from devserver.sdk import apps as sdk
from devserver.sdk.endpoints import DurableEndpoints
from devserver.sdk.executor import MAX_REPLY_BYTES, SdkExecutor
from devserver.sdk.streams import RunStreams
from devserver.store.facade import Store
from devserver.web import (
    actions,
    api,
    dashboard,
    endpoint_routes,
    gql_routes,
    guard,
    inngest_api,
    lists,
    pages,
    responses,
    sdk_routes,
    sdk_state,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8288
DEFAULT_DB = ".devserver/devserver.sqlite3"
SHUTDOWN_GRACE = 1.0
"""Seconds requests in flight get to finish when the server stops (an event request waits for
one commit: milliseconds). A body still arriving is not read any more (aiohttp stops reading
once it closes connections), so such a request is dropped, unanswered, after this."""

IDLE_TIMEOUT = 75.0
"""Seconds an idle keep-alive connection (or one whose request head is still trickling in) is
kept open: as long as many servers keep one, longer than browsers and HTTP clients reuse one."""
BODY_TIMEOUT = 60.0
"""Seconds a request body may take to arrive (a 3 MiB event batch needs a fraction of that even
at 100 KB/s); a slower one is answered 408 and its connection closed."""
LINGER = 1.0
"""Seconds the rest of an unread body is still read (and dropped) after answering early (413,
408), so the client sees the answer instead of a reset; aiohttp's 10 s would let a slow client
hold its connection that much longer."""


@dataclass
class Config:
    """What a server runs with."""

    db: str = DEFAULT_DB
    functions: list[FunctionDef] = field(default_factory=list)
    retry_interval: float | None = None
    """Fixed seconds between attempts; None for Inngest's backoff table."""
    app_specs: list[str] = field(default_factory=list)
    """The `--app` specs the functions came from, for hot reload."""
    reload: bool = False
    """Watch the apps' files and reload them on change."""
    function_timeout: float = DEFAULT_FUNCTION_TIMEOUT
    """Seconds one execution of a function body may take, unless it sets `timeout=`."""
    watchdog_threshold: float = DEFAULT_THRESHOLD
    """Seconds the event loop may be blocked before the watchdog names the run doing it."""
    sdk_urls: list[str] = field(default_factory=list)
    """Inngest SDK apps to sync at start (`-u URL`), e.g. http://127.0.0.1:3000/api/inngest."""
    sdk_poll_interval: float = sdk.DEFAULT_POLL_INTERVAL
    """Seconds between re-syncs of known SDK apps (picks up restarts); 0 turns it off."""
    sdk_discover: bool = False
    """Also look for SDK apps on the usual local dev ports (`--discover`)."""
    allowed_hosts: list[str] = field(default_factory=list)
    """More `Host` names to answer (`--allow-host`); see `web.guard`."""
    allowed_origins: list[str] = field(default_factory=list)
    """Origins whose web pages may change state (`--allow-origin`); see `web.guard`."""
    idle_timeout: float = IDLE_TIMEOUT
    """Seconds a connection may sit without a whole request head arriving (idle keep-alive, or
    headers trickling in) before it is closed."""
    max_sdk_reply_bytes: int = MAX_REPLY_BYTES
    """The largest reply read from an SDK app; a bigger one fails the attempt, saying so."""
    body_timeout: float = BODY_TIMEOUT
    """Seconds a request body may take to arrive before the request is answered 408 and its
    connection closed."""

    def backoff(self) -> Backoff:
        """The retry delay policy this config selects."""
        if self.retry_interval is None:
            return InngestBackoff()
        return FixedBackoff(self.retry_interval)


def create_app(config: Config, clock: Clock | None = None) -> web.Application:
    """The aiohttp application; the store opens and the runner starts when it starts."""
    app = web.Application(
        middlewares=[guard.guard_middleware, responses.error_middleware],
        client_max_size=MAX_BODY_BYTES)
    app[responses.BODY_DEADLINE] = config.body_timeout
    app[guard.GUARD] = guard.Guard(DEFAULT_HOST, config.allowed_hosts, config.allowed_origins)
    store = Store(config.db)
    clock = clock or WallClock()
    # The one place where functions meet their executors: local code and SDK apps alike.
    local = LocalExecutor(function_timeout=config.function_timeout)
    remote = SdkExecutor(clock, max_reply_bytes=config.max_sdk_reply_bytes)
    runner = Runner(store, clock, config.backoff(), local=local, remote=remote)
    runner.register(config.functions)
    apps = sdk.SdkApps(runner, clock, urls=config.sdk_urls,
                       poll_interval=config.sdk_poll_interval, discover=config.sdk_discover)
    app[api.STORE] = store
    app[api.RUNNER] = runner
    app[sdk_routes.SDK_APPS] = apps
    app[sdk_state.SDK_EXECUTOR] = remote
    endpoints = DurableEndpoints(store, clock, runner, remote)
    app[sdk_state.ENDPOINTS] = endpoints
    app[endpoint_routes.STREAMS] = RunStreams()

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        yield
        await store.close()

    async def watchdog_ctx(app: web.Application) -> AsyncIterator[None]:
        watchdog = LoopWatchdog(config.watchdog_threshold)
        watchdog.start()
        yield
        watchdog.stop()

    async def executors_ctx(app: web.Application) -> AsyncIterator[None]:
        # Opened before the runner starts and closed after it stops, so no run's call to
        # an SDK app is cut off by the client closing.
        await remote.open()
        yield
        await remote.close()
        local.close()

    async def runner_ctx(app: web.Application) -> AsyncIterator[None]:
        await endpoints.restore()  # their runs resume like any run
        await runner.start()
        yield
        endpoints.stop()
        await runner.stop()

    async def sdk_ctx(app: web.Application) -> AsyncIterator[None]:
        await apps.start()
        yield
        await apps.stop()

    app.cleanup_ctx.extend([store_ctx, executors_ctx, sdk_ctx, runner_ctx, watchdog_ctx])
    if config.reload and config.app_specs:
        reloader = AppReloader(config.app_specs, runner)
        app[api.RELOADER] = reloader

        async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
            reloader.start()
            yield
            await reloader.stop()

        app.cleanup_ctx.append(reload_ctx)
    app.add_routes(inngest_api.routes)
    app.add_routes(api.routes)
    app.add_routes(sdk_state.routes)
    app.add_routes(endpoint_routes.routes)
    app.add_routes(lists.routes)
    app.add_routes(actions.routes)
    app.add_routes(sdk_routes.routes)
    app.add_routes(gql_routes.routes)
    dashboard.setup(app)
    pages.setup(app)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or `ConfigError` saying why not (e.g. port in use)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, 98, 48):
            other = port + 1 if 0 < port < 65535 else 8289
            raise ConfigError(f"port {port} on {host} is already in use (another devserver, "
                              f"or another program): pick another with --port {other}, or "
                              "--port 0 for a free one") from exc
        raise ConfigError(f"port {port} on {host} can't be used: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


class Server:
    """A running devserver on a socket it owns."""

    def __init__(self, config: Config, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.app = create_app(config, clock)
        self.app[guard.GUARD] = guard.Guard(host, config.allowed_hosts, config.allowed_origins)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None

    @property
    def store(self) -> Store:
        """The server's store."""
        return self.app[api.STORE]

    @property
    def runner(self) -> Runner:
        """The server's runner."""
        return self.app[api.RUNNER]

    @property
    def sdk(self) -> sdk.SdkApps:
        """The server's Inngest SDK apps (sync them, list them)."""
        return self.app[sdk_routes.SDK_APPS]

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._sock is None:
            raise RuntimeError("server is not started")
        return int(self._sock.getsockname()[1])

    @property
    def host(self) -> str:
        """The address the socket is bound to (e.g. 127.0.0.1, 0.0.0.0, ::)."""
        if self._sock is None:
            raise RuntimeError("server is not started")
        return str(self._sock.getsockname()[0])

    @property
    def loopback_only(self) -> bool:
        """True when only this machine can connect (the socket is on a loopback address)."""
        return ipaddress.ip_address(self.host.partition("%")[0]).is_loopback

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8288."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind, open the database, resume unfinished runs and start serving."""
        self._sock = bind(self._host, self._port)
        self.sdk.base_url = self.url
        self.runner.dashboard_url = self.url
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    shutdown_timeout=SHUTDOWN_GRACE,
                                    keepalive_timeout=self.config.idle_timeout,
                                    lingering_time=LINGER)
        try:
            await self._runner.setup()
            await web.SockSite(self._runner, self._sock).start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop accepting, stop the runner, commit and close the database."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

