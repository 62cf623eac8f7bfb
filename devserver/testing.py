"""devserver in test suites: a real server per test, driven from sync or async tests.

`DevServer` is what the `devserver` pytest fixture hands a test. It serves real HTTP on
127.0.0.1 (an ephemeral port, bound and kept) with its own SQLite file, on an event loop that
runs in a background thread shared by all tests, so starting one costs milliseconds. Every
method has a blocking form (`send`) and an async twin (`send_async`) for pytest-asyncio tests.

Time is virtual by default: `wait_idle` jumps the clock to the next timer whenever every live
run is parked on one, so a function that sleeps a day finishes at once; `advance` moves the
clock by hand. A run that fails unexpectedly, or a `wait_idle` that times out, raises with the
timeline of the sessions involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import threading
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from devserver.app import App, FunctionDef
from devserver.cli.replay import read_events
from devserver.clock import Clock, VirtualClock, WallClock, iso, parse_duration
from devserver.model.events import session_value_string, validate_event
from devserver.model.records import FAILED, RunRecord
from devserver.runtime.loader import load_app
from devserver.web.server import Config, Server

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0


class DevserverTestError(AssertionError):
    """A run failed unexpectedly or the server did not become idle; the message has the
    timeline of the sessions involved."""


class LoopThread:
    """An asyncio loop running in a daemon thread, shared by the servers of a test session."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="devserver-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        while True:
            try:
                self.loop.run_forever()
                return  # stopped by close()
            except (SystemExit, KeyboardInterrupt) as exc:
                # Raised by user code outside any run (a task it created, a callback it
                # scheduled): it must not stop the loop every server of the session shares.
                logging.getLogger(__name__).error(
                    "user code raised %s outside any run (in a task or callback it put on "
                    "the event loop); ignored: the server keeps serving", type(exc).__name__)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and block until it is done."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking devserver methods can't run inside a function; "
                               "use the *_async method")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def call_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop and await it from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass(frozen=True)
class Run:
    """A run as tests see it."""

    run_id: str
    function_id: str
    status: str
    event_name: str
    event_id: str
    sessions: dict[str, str]
    output: Any
    error: dict[str, Any] | None

    @classmethod
    def from_record(cls, run: RunRecord) -> Run:
        """From the store's record."""
        return cls(run.run_id, run.function_id, run.status, run.event_name, run.event_id,
                   dict(run.sessions), run.output, run.error)


@dataclass(frozen=True)
class Session:
    """A session's SPEC 2.3 figures and its runs (newest first)."""

    identifier: str
    value: str
    runs: int
    failed_runs: int
    failure_rate: float
    last_active: dt.datetime
    functions: list[str]
    run_list: list[Run]


def functions_of(items: Iterable[object]) -> list[FunctionDef]:
    """Functions from Apps, FunctionDefs, `--app` style specs, or lists of them."""
    found: list[FunctionDef] = []
    for item in items:
        if isinstance(item, App):
            found.extend(item.functions)
        elif isinstance(item, FunctionDef):
            found.append(item)
        elif isinstance(item, str):
            found.extend(load_app(item))
        elif isinstance(item, list | tuple):
            found.extend(functions_of(item))
        else:
            raise TypeError(f"can't register {item!r}: pass a devserver.App, its functions, "
                            "or an app spec such as 'myapp.functions:app'")
    return found


class DevServer:
    """A devserver for one test. See the module docstring."""

    def __init__(
        self, loop: LoopThread, db: Path, *, apps: Iterable[object] = (),
        virtual_time: bool = True, retry_interval: float | None = None,
        raise_on_failure: bool = True, env: str = "dev",
    ) -> None:
        self._loop = loop
        self.env = env
        self.raise_on_failure = raise_on_failure
        self.clock: Clock = VirtualClock() if virtual_time else WallClock()
        config = Config(db=str(db), functions=functions_of(apps), retry_interval=retry_interval)
        self._server = Server(config, port=0, clock=self.clock)
        self._seen_failures: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> DevServer:
        """Bind, open the database and start serving."""
        self._loop.call(self._server.start())
        return self

    def stop(self) -> None:
        """Stop serving and close the database."""
        self._loop.call(self._server.stop())

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:54321`; point `INNGEST_DEV` at it."""
        return self._server.url

    @contextlib.contextmanager
    def inngest_env(self) -> Iterator[str]:
        """Point code that uses the Inngest SDKs at this server for the `with` block."""
        names = ("INNGEST_DEV", "INNGEST_BASE_URL", "INNGEST_EVENT_API_BASE_URL")
        saved = {name: os.environ.get(name) for name in names}
        os.environ.update({name: self.url for name in names})
        try:
            yield self.url
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    # -- functions and events ----------------------------------------------------------------

    async def _register(self, items: tuple[object, ...]) -> None:
        self._server.runner.register(functions_of(items))

    def register(self, *apps_or_functions: object) -> None:
        """Register Apps (or their functions, or app specs) on the running server."""
        self._loop.call(self._register(apps_or_functions))

    async def register_async(self, *apps_or_functions: object) -> None:
        """Async twin of `register`."""
        await self._loop.call_async(self._register(apps_or_functions))

    async def _send(self, events: object, env: str | None) -> list[str]:
        raw = events if isinstance(events, list) else [events]
        incoming = [validate_event(ev, i) for i, ev in enumerate(raw)]
        return await self._server.runner.ingest(env or self.env, incoming)

    def send(self, events: dict[str, Any] | list[dict[str, Any]], *,
             env: str | None = None) -> list[str]:
        """Send events exactly as `POST /e/` would (same validation); returns their ids."""
        return self._loop.call(self._send(events, env))

    async def send_async(self, events: dict[str, Any] | list[dict[str, Any]], *,
                         env: str | None = None) -> list[str]:
        """Async twin of `send`."""
        return await self._loop.call_async(self._send(events, env))

    def replay(self, path: str | Path, *, env: str | None = None) -> list[str]:
        """Send a `.jsonl`/`.json` fixture file's events in order; returns their ids."""
        return self.send(read_events(path), env=env)

    async def replay_async(self, path: str | Path, *, env: str | None = None) -> list[str]:
        """Async twin of `replay`."""
        return await self.send_async(read_events(path), env=env)

    # -- waiting and time --------------------------------------------------------------------

    async def _wait_idle(self, timeout: float, skip_time: bool) -> None:
        try:
            await asyncio.wait_for(self._server.runner.wait_idle(skip_time=skip_time), timeout)
        except TimeoutError:
            busy = await self._server.store.runs(self.env, status="Running", limit=20)
            busy += await self._server.store.runs(self.env, status="Queued", limit=20)
            raise DevserverTestError(
                f"devserver did not become idle within {timeout}s; unfinished runs:\n"
                + await self._timeline(busy)) from None
        if not self.raise_on_failure:
            return
        failed = [r for r in await self._server.store.runs(self.env, status=FAILED, limit=500)
                  if r.run_id not in self._seen_failures]
        self._seen_failures.update(r.run_id for r in failed)
        if failed:
            raise DevserverTestError(
                f"{len(failed)} run(s) failed (pass raise_on_failure=False, or mark the test "
                "with @pytest.mark.devserver(raise_on_failure=False), if that is expected):\n"
                + await self._timeline(failed))

    def wait_idle(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until no run executes or waits on a timer (virtual time skips ahead).

        Raises `DevserverTestError` with the sessions' timeline on timeout, or when a run has
        failed since the last call (unless `raise_on_failure` is off).
        """
        __tracebackhide__ = True  # pytest shows the test's line, then the timeline
        try:
            self._loop.call(self._wait_idle(timeout, True))
        except DevserverTestError as exc:
            raise _surfaced(exc) from None

    async def wait_idle_async(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Async twin of `wait_idle`."""
        __tracebackhide__ = True
        try:
            await self._loop.call_async(self._wait_idle(timeout, True))
        except DevserverTestError as exc:
            raise _surfaced(exc) from None

    async def _advance(self, ms: int, timeout: float) -> None:
        if not isinstance(self.clock, VirtualClock):
            raise RuntimeError("advance() needs virtual time (the fixture's default)")
        self.clock.advance(ms)
        await asyncio.sleep(0)  # let due timers fire before settling
        await self._wait_idle(timeout, False)

    def advance(self, duration: str | float | dt.timedelta,
                timeout: float = DEFAULT_TIMEOUT) -> None:
        """Move virtual time forward (`"1h"`, seconds, a timedelta) and let due work run."""
        __tracebackhide__ = True
        try:
            self._loop.call(self._advance(parse_duration(duration), timeout))
        except DevserverTestError as exc:
            raise _surfaced(exc) from None

    async def advance_async(self, duration: str | float | dt.timedelta,
                            timeout: float = DEFAULT_TIMEOUT) -> None:
        """Async twin of `advance`."""
        __tracebackhide__ = True
        try:
            await self._loop.call_async(self._advance(parse_duration(duration), timeout))
        except DevserverTestError as exc:
            raise _surfaced(exc) from None

    @property
    def now(self) -> dt.datetime:
        """The server's current time (virtual unless the test asked for wall time)."""
        return dt.datetime.fromtimestamp(self.clock.now_ms() / 1000, tz=dt.UTC)

    # -- reading -----------------------------------------------------------------------------

    async def _runs(self, function: str | None, status: str | None,
                    session: tuple[str, str] | None) -> list[Run]:
        store = self._server.store
        if session is None:
            records = await store.runs(self.env, function_id=function, status=status,
                                       limit=10_000)
        else:
            found = await store.session(self.env, session[0], session[1], limit=500)
            records = [] if found is None else found[1].rows
        return [Run.from_record(r) for r in reversed(records)
                if (function is None or r.function_id == function)
                and (status is None or r.status == status)]

    def runs(self, *, function: str | None = None, status: str | None = None,
             session: tuple[str, str] | None = None) -> list[Run]:
        """Runs, oldest first, filtered by function id, status and/or (identifier, value)."""
        return self._loop.call(self._runs(function, status, session))

    async def runs_async(self, *, function: str | None = None, status: str | None = None,
                         session: tuple[str, str] | None = None) -> list[Run]:
        """Async twin of `runs`."""
        return await self._loop.call_async(self._runs(function, status, session))

    async def _session(self, identifier: str, value: str) -> Session:
        found = await self._server.store.session(self.env, identifier, value, limit=500)
        if found is None:
            raise DevserverTestError(f"no session {identifier}={value!r} in env {self.env!r}")
        stats, page = found
        return Session(
            identifier, value, stats.runs, stats.failed_runs, stats.failure_rate,
            dt.datetime.fromtimestamp(stats.last_active / 1000, tz=dt.UTC),
            stats.functions, [Run.from_record(r) for r in page.rows])

    def session(self, identifier: str, value: object) -> Session:
        """A session's figures (runs, failed_runs, failure_rate, last_active, functions)."""
        __tracebackhide__ = True
        try:
            return self._loop.call(self._session(identifier, _session_value(value)))
        except DevserverTestError as exc:
            raise _surfaced(exc) from None

    async def session_async(self, identifier: str, value: object) -> Session:
        """Async twin of `session`."""
        __tracebackhide__ = True
        try:
            return await self._loop.call_async(self._session(identifier, _session_value(value)))
        except DevserverTestError as exc:
            raise _surfaced(exc) from None

    # -- explaining failures -----------------------------------------------------------------

    async def _timeline(self, runs: list[RunRecord]) -> str:
        store = self._server.store
        lines: list[str] = []
        sessions = {(k, v) for run in runs for k, v in run.sessions.items()}
        for identifier, value in sorted(sessions)[:10]:
            found = await store.session(self.env, identifier, value, limit=50)
            if found is None:
                continue
            stats, page = found
            lines.append(f"session {identifier}={value!r}: {stats.runs} run(s), "
                         f"{stats.failed_runs} failed")
            for run in reversed(page.rows):
                lines.append(f"  {iso(run.queued_at)}  {run.event_name} -> {run.function_id} "
                             f"{run.status}  run {run.run_id}")
        for run in runs[:10]:
            detail = await store.run_detail(run.run_id)
            if detail is None:
                continue
            lines.append(f"run {run.run_id} ({run.function_id}, {detail.run.status}) on "
                         f"{run.event_name}:")
            for step in detail.steps:
                what = step.step_id or "(function)"
                outcome = step.status
                if step.error:
                    outcome += f" {step.error.get('name')}: {step.error.get('message')}"
                lines.append(f"  {what} attempt {step.attempt + 1}: {outcome}")
            error = detail.run.error
            if error and error.get("stack"):
                lines.append("  " + str(error["stack"]).rstrip().replace("\n", "\n  "))
        return "\n".join(lines)


def _surfaced(exc: DevserverTestError) -> DevserverTestError:
    """The error raised on the loop thread, without the frames it went through there (the
    event loop, concurrent.futures, devserver's internals): raised again from the public
    method, whose frame pytest hides, a failure shows the test's line and then the timeline."""
    return exc.with_traceback(None)


def _session_value(value: object) -> str:
    return session_value_string(value, "session value")
