"""What the terminal says about runs: one line for every run that fails for good (at warning,
so the default level shows it) and one for every retry (at debug), on the `devserver.runs`
logger. Each names the function, the run, its sessions and the error's first line, and links
the run's dashboard page when the server has a URL.

These lines are never rate-limited (cli/logs.py): each is about a run of its own.

`log_sink` keeps what a run writes with `ctx.logger` in the database, for the run's page.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from devserver.clock import Clock

RUNS_LOGGER = "devserver.runs"
log = logging.getLogger(RUNS_LOGGER)


def error_line(error: dict[str, Any] | None) -> str:
    """`Name: first line of the message`, as a log line shows an error."""
    if not error:
        return "no error recorded"
    message = str(error.get("message") or "").strip().partition("\n")[0]
    name = str(error.get("name") or "Error")
    return f"{name}: {message}" if message else name


def sessions_text(sessions: dict[str, str]) -> str:
    """`conversation_id=conv_1, user_id=42`, or `no session`."""
    if not sessions:
        return "no session"
    return ", ".join(f"{key}={value}" for key, value in sorted(sessions.items()))


def run_link(base_url: str | None, run_id: str) -> str:
    """` — http://…/runs/ID` when there is a dashboard to link to, else nothing."""
    return f" — {base_url.rstrip('/')}/runs/{run_id}" if base_url else ""


def run_failed(*, run_id: str, function_id: str, sessions: dict[str, str],
               error: dict[str, Any] | None, base_url: str | None) -> None:
    """Say that a run failed for good."""
    log.warning("run %s of %s failed (%s): %s%s", run_id, function_id, sessions_text(sessions),
                error_line(error), run_link(base_url, run_id))


def will_retry(*, run_id: str, function_id: str, step_id: str | None, attempt: int,
               error: dict[str, Any] | None, at_ms: int, base_url: str | None = None) -> None:
    """Say (at debug) that an attempt failed and when the next one is."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    when = dt.datetime.fromtimestamp(at_ms / 1000, tz=dt.UTC).isoformat(timespec="seconds")
    what = "the function" if step_id is None else f"step {step_id!r}"
    log.debug("run %s of %s: attempt %d of %s failed (%s); retrying at %s%s", run_id,
              function_id, attempt + 1, what, error_line(error), when.replace("+00:00", "Z"),
              run_link(base_url, run_id))


class LogLines(Protocol):
    """The store's one method a log sink needs."""

    def add_log_lines(self, lines: list[tuple[str, int, str, str]]) -> asyncio.Future[None]:
        ...


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("a ctx.logger line was not kept: %s", future.exception())


def log_sink(store: LogLines, clock: Clock, run_id: str) -> Callable[[int, str], None]:
    """A `RunLogger` sink that queues each line for the store (from the loop's thread or a
    sync function's worker thread alike); the store keeps a bounded number per run."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()

    def write(line: tuple[str, int, str, str]) -> None:
        try:
            store.add_log_lines([line]).add_done_callback(_consume)
        except RuntimeError:  # the store closed meanwhile (the server is stopping)
            log.debug("a ctx.logger line came after the store closed")

    def sink(level: int, text: str) -> None:
        line = (run_id, clock.now_ms(), logging.getLevelName(level), text)
        if threading.get_ident() == loop_thread:
            write(line)
        else:
            loop.call_soon_threadsafe(write, line)
    return sink
