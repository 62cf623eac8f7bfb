"""`python -m devserver [serve]`: start the server with its functions, apps and preloaded
fixtures, print the banner, and shut down cleanly on Ctrl-C or SIGTERM (a second one exits at
once). A SystemExit or KeyboardInterrupt raised by user code outside any run does not stop the
server; sync functions still running at exit are left behind, as their runs resume from their
last committed step."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from devserver import __version__
from devserver.app import FunctionDef
from devserver.cli.fixture_files import batches, read_all
from devserver.cli.progress import Progress, cumulative
from devserver.model.events import validate_event
from devserver.runtime.loader import load_app
from devserver.runtime.runner import DEFAULT_ENV
from devserver.web.server import DEFAULT_DB, DEFAULT_HOST, Config, Server

log = logging.getLogger("devserver.cli.main")  # the name operators' filters know


DEMO_RETRY_INTERVAL = 2.0
"""Seconds between attempts in `--demo` (unless given), so its failing path fails in seconds."""
SWITCH_INTERVAL = 0.001
"""Seconds between GIL hand-overs while `serve` runs (Python's default is 0.005)."""
GC_YOUNG = 10_000
"""Allocations between the collector's young collections while `serve` runs."""
ABANDON_AFTER = 1.0
"""Seconds `serve` waits at exit for sync functions still running before leaving them."""
FUNCTION_THREADS = "devserver-fn"
"""The name prefix of the runner's worker threads (sync functions and sync step bodies)."""
T = TypeVar("T")


def _banner(server: Server, db: str, functions: list[FunctionDef],
            notes: Sequence[tuple[str, str]] = (), db_text: str | None = None) -> str:
    reloading = server.config.reload and bool(server.config.app_specs)
    lines = [
        f"devserver {__version__}",
        f"  dashboard   {server.url}/sessions",
        f"  event API   POST {server.url}/e/<any key>",
        f"  database    {db_text or (db if db == ':memory:' else Path(db).resolve())}",
        f"  reload      {'on: watching app files' if reloading else 'off'}",
    ]
    # Extra lines go before `functions`: the lines after it list the functions, one each.
    lines.extend(f"  {label:<11} {text}" for label, text in notes)
    lines.append(f"  functions   {len(functions)}")
    for fn in functions:
        triggers = ", ".join(t.describe() for t in fn.triggers)
        lines.append(f"    {fn.id}  <- {triggers}")
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> int:
    code = _run_serving(serve_async(args))
    # Everything is committed and closed by now. A sync function still blocked in its worker
    # thread can't be interrupted, and Python would wait for it at exit; its run resumes from
    # its last committed step on the next start, so leave it behind.
    deadline = time.monotonic() + ABANDON_AFTER
    for thread in threading.enumerate():
        if thread.name.startswith(FUNCTION_THREADS):
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in threading.enumerate() if t.name.startswith(FUNCTION_THREADS)
             and t.is_alive()]
    if stuck:
        temporary = args.db == ":memory:" or (args.demo and args.db is None)
        log.warning("%d sync function(s) still running were left behind; %s", len(stuck),
                    "the temporary database is deleted, so their runs end here" if temporary
                    else "their runs resume from their last committed step on the next start")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_serving(main: Coroutine[Any, Any, int]) -> int:
    """`asyncio.run(main)`, except that a SystemExit or KeyboardInterrupt raised by user code
    outside any run (in a task it created or a callback it scheduled on the loop) does not
    end the server: it is logged and the loop goes on (`run_until_complete` can be entered
    again). The real stops are signals: Ctrl-C and SIGTERM set `serve_async`'s stop event
    once its handlers are installed; a Ctrl-C before that raises KeyboardInterrupt here and
    is told apart by `interrupted`."""
    interrupted: list[int] = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    # Threads running Python code (sync functions) take turns with the loop's thread for the
    # GIL; switching every 1 ms instead of 5 keeps the HTTP server answering while 8 of them
    # spin (median /health 34-64 ms instead of 157-175 ms, measured with 32 spinning).
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return _until_done(loop, loop.create_task(main), interrupted)
    finally:
        try:
            rest = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in rest:
                task.cancel()
            if rest:
                _until_done(loop, asyncio.gather(*rest, return_exceptions=True), interrupted)
            _until_done(loop, loop.shutdown_asyncgens(), interrupted)
            with contextlib.suppress(TimeoutError):
                _until_done(loop, asyncio.wait_for(loop.shutdown_default_executor(),
                                                   ABANDON_AFTER), interrupted)
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            signal.signal(signal.SIGINT, previous)
            sys.setswitchinterval(switch_interval)


def _until_done(loop: asyncio.AbstractEventLoop, work: Awaitable[T],
                interrupted: list[int]) -> T:
    future = asyncio.ensure_future(work, loop=loop)
    while True:
        try:
            return loop.run_until_complete(future)
        except (SystemExit, KeyboardInterrupt) as exc:
            if future.done() or interrupted:
                raise
            log.error("user code raised %s outside any run (in a task or callback it put on "
                      "the server's event loop); ignored: the server keeps serving",
                      _exit_name(exc))


def _exit_name(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r})"
    return type(exc).__name__


def exposure_warning(server: Server) -> str | None:
    """The warning to print when the server listens beyond this machine, else None."""
    if server.loopback_only:
        return None
    return (f"devserver: warning: listening on {server.host}, so other machines can reach "
            "this server; it has no authentication (events, runs and their data are open to "
            f"anyone who can connect). Use --host {DEFAULT_HOST} (the default) to keep it local.")


async def serve_async(args: argparse.Namespace) -> int:
    replay_files = [str(path) for path in args.replay]
    functions: list[FunctionDef] = []
    if args.demo:
        from devserver import demo

        functions.extend(demo.app.functions)
        replay_files = [str(path) for path in demo.fixture_paths()] + replay_files
    # Every fixture is read and checked before the server starts: a bad line binds nothing.
    events = read_all(replay_files)
    functions.extend(fn for spec in args.app for fn in load_app(spec))
    temporary = args.demo and args.db is None
    db = ":memory:" if temporary else (args.db or DEFAULT_DB)
    retry_interval = args.retry_interval
    if retry_interval is None and args.demo:
        retry_interval = DEMO_RETRY_INTERVAL
    reload = bool(args.app) if args.reload is None else args.reload
    config = Config(db=db, functions=functions, retry_interval=retry_interval,
                    app_specs=list(args.app), reload=reload, sdk_urls=list(args.sdk_urls),
                    sdk_discover=args.discover,
                    sdk_poll_interval=0.0 if args.no_poll else args.poll_interval,
                    allowed_hosts=list(args.allowed_hosts),
                    allowed_origins=list(args.allowed_origins))
    server = Server(config, host=args.host, port=args.port)
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # a second Ctrl-C: the user won't wait (SQLite survives this)
            log.warning("second signal: exiting without finishing shutdown")
            os._exit(1)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    await server.start()
    try:
        warning = exposure_warning(server)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        notes: list[tuple[str, str]] = []
        if config.sdk_urls or config.sdk_discover:
            await server.sdk.wait_synced()  # apps register over HTTP once the server serves
            for result in server.sdk.sync_results:
                notes.append(("sdk app", f"{result.url}  " + (
                    f"synced: {result.app_id}" if result.ok else
                    (f"not synced yet (retried every {config.sdk_poll_interval:g}s): "
                     if config.sdk_poll_interval > 0 else
                     "not synced (--no-poll: sync it with POST /api/apps/sync): ")
                    + f"{result.error}")))
        if events:
            # Preloaded before the banner, so the dashboard it links to already has them.
            progress = Progress("preloaded", len(events))
            for done, batch in cumulative(batches(events)):
                await server.runner.ingest(DEFAULT_ENV, [validate_event(ev, i)
                                                         for i, ev in enumerate(batch)])
                progress(done, len(events))
            names = [Path(f).name if args.demo else f for f in replay_files]
            notes.append(("replayed", f"{len(events)} events from {', '.join(names)}"))
        if args.demo:
            notes.append(("demo", f"support bot: {server.url}/sessions?identifier="
                                  "conversation_id"))
        db_text = ("temporary, deleted on exit (--demo; pass --db PATH to keep it)"
                   if temporary else None)
        print(_banner(server, db, server.runner.functions, notes, db_text), flush=True)
        thresholds = _settle_gc()
        try:
            await stop.wait()
        finally:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
        log.info("shutting down: %s", _shutdown_note(db))
    finally:
        await server.stop()
    return 0


def _settle_gc() -> tuple[int, int, int]:
    """Once started: what startup made (modules, the app, the routes) is moved out of the
    collector's reach (`gc.freeze`), so its full collections stop walking it, and young
    collections come every `GC_YOUNG` allocations instead of 700, since a request makes
    hundreds of short-lived objects (the collector took 3% of a loaded server's time).
    Returns the thresholds before, to restore at the end."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, before[1], before[2])
    return before


def _shutdown_note(db: str) -> str:
    """What stopping keeps: a database file keeps everything; `:memory:` (and `--demo`'s
    temporary database) is deleted on exit, so nothing resumes."""
    if db == ":memory:":
        return ("no new requests; the database is temporary and deleted on exit, so "
                "unfinished runs end here (pass --db PATH to keep them)")
    return ("no new requests; acknowledged events are committed; unfinished runs resume on "
            "the next start")
