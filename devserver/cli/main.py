"""The command line: `python -m devserver [serve] ...`, `replay ...` and `export ...`.

`main(argv)` is callable in-process and returns the exit code. User errors (bad path, bad module,
busy port, unwritable database, a bad fixture line) print one line on stderr and exit with 2; no
traceback. `replay` exits with 1 when a run failed (or the server refused events partway), so it
works as a CI step. Progress is printed here; the work is done in `replay`, and the summary is
gathered and rendered by `report`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import aiohttp

from devserver import __version__
from devserver.app import FunctionDef
from devserver.cli import logs
from devserver.cli.replay import (
    DEFAULT_MAX_GAP,
    TIMINGS,
    ReplayError,
    batches,
    event_endpoint,
    export_session,
    follow_runs,
    human_ms,
    read_all,
    run_in_process,
    send_to_server,
    span_ms,
)
from devserver.cli.report import apply_followed, print_report, server_report
from devserver.errors import UserError
from devserver.model.events import validate_event
from devserver.model.fixtures import to_jsonl
from devserver.runtime.loader import load_app
from devserver.runtime.runner import DEFAULT_ENV
from devserver.sdk.apps import DEFAULT_POLL_INTERVAL
from devserver.web.server import DEFAULT_DB, DEFAULT_HOST, DEFAULT_PORT, Config, Server

log = logging.getLogger(__name__)
T = TypeVar("T")
COMMANDS = ("serve", "dev", "replay", "export")
LOG_LEVELS = ("debug", "info", "warning", "error")
PROGRESS_ABOVE = 1000
"""Replays of more events than this print progress on stderr."""
DEMO_RETRY_INTERVAL = 2.0
"""Seconds between attempts in `--demo` (unless given), so its failing path fails in seconds."""
DEFAULT_TIMEOUT = 600.0
"""Seconds of wall time `replay --app` (and `--url --wait`) waits for runs to finish."""
SWITCH_INTERVAL = 0.001
"""Seconds between GIL hand-overs while `serve` runs (Python's default is 0.005)."""
ABANDON_AFTER = 1.0
"""Seconds `serve` waits at exit for sync functions still running before leaving them."""
FUNCTION_THREADS = "devserver-fn"
"""The name prefix of the runner's worker threads (sync functions and sync step bodies)."""


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds over 0 (use "
                                         "--no-poll to turn polling off)")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


COMMANDS_HELP = """commands:
  serve     run the server (the default command; the options above); `dev` is the same
  replay    send fixture events to a running server (--url), or run them in-process (--app)
  export    write a session's events as a JSONL fixture

`devserver replay --help` and `devserver export --help` list their options;
`devserver --version` prints the version."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with `serve` as the default command."""
    parser = argparse.ArgumentParser(
        prog="devserver",
        description="Local dev server for Inngest-style durable functions, with Sessions.",
    )
    parser.add_argument("--version", action="version", version=f"devserver {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", aliases=["dev"], help="run the server (the default command; also `dev`, so "
        "`devserver dev --no-discovery --no-poll -p 8288` runs as `inngest dev` would)",
        usage="devserver [serve] [options]  |  devserver {replay,export} ... (COMMAND --help)",
        description="Run the dev server: the dashboard, the event API (POST /e/<key>) and your\n"
                    "functions. `serve` is the default command: `devserver --port 9000` is\n"
                    "`devserver serve --port 9000`.",
        epilog=COMMANDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT,
                       help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to bind (default {DEFAULT_HOST}, this machine only)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       dest="allowed_hosts",
                       help="also answer requests addressed to this host name (repeatable), "
                            "e.g. host.docker.internal; localhost and IP addresses always work")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       dest="allowed_origins",
                       help="let web pages from this origin send events and change state "
                            "(repeatable), e.g. http://localhost:3000; other pages get 403")
    serve.add_argument("--db", default=None,
                       help=f"SQLite database file (default {DEFAULT_DB}; with --demo a "
                            "temporary one; ':memory:' keeps nothing after exit)")
    serve.add_argument("--app", action="append", default=[], metavar="MODULE[:ATTR]|FILE.py",
                       help="app whose functions to run (repeatable)")
    serve.add_argument("--retry-interval", type=_seconds, default=None, metavar="SECONDS",
                       help="fixed delay between attempts (default: Inngest's backoff table; "
                            "0 retries at once)")
    serve.add_argument("-u", "--sdk-url", action="append", default=[], metavar="URL",
                       dest="sdk_urls",
                       help="an Inngest SDK app to sync and run, e.g. "
                            "http://127.0.0.1:3000/api/inngest (repeatable)")
    discovery = serve.add_mutually_exclusive_group()
    discovery.add_argument("--discover", action="store_true",
                           help="also look for Inngest SDK apps on the usual local dev ports")
    discovery.add_argument("--no-discovery", action="store_false", dest="discover",
                           help="don't look for apps (the default; accepted as Inngest's dev "
                                "server takes it)")
    polling = serve.add_mutually_exclusive_group()
    polling.add_argument("--poll-interval", type=_positive_seconds,
                         default=DEFAULT_POLL_INTERVAL, metavar="SECONDS",
                         help="seconds between re-syncs of the SDK apps, which pick up their "
                              f"restarts (default {DEFAULT_POLL_INTERVAL:g})")
    polling.add_argument("--no-poll", action="store_true",
                         help="never re-sync SDK apps after the first sync (as in Inngest's "
                              "dev server: a re-sync mid-test can change its results)")
    serve.add_argument("--reload", action=argparse.BooleanOptionalAction, default=None,
                       help="reload the apps when their files change (default: on when --app "
                            "is given)")
    serve.add_argument("--replay", action="append", default=[], metavar="FILE",
                       help="send a fixture file's events (.jsonl or .json) once the server is "
                            "up, before the banner (repeatable)")
    serve.add_argument("--demo", action="store_true",
                       help="run the bundled support-bot example app with its fixtures "
                            "preloaded, on a temporary database unless --db is given")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                       help="log verbosity (default info)")

    replay = commands.add_parser(
        "replay", help="send fixture events to a running server, or run them in-process",
        description="Send fixture events (.jsonl: one event per line; .json: an event or an "
                    "array; '-': JSON Lines on stdin) to a running server with --url, or run "
                    "them in-process against --app on a temporary database and a virtual clock, "
                    "print a per-session summary and exit 1 if any run failed. Every file is "
                    "validated before anything is sent.")
    replay.add_argument("files", nargs="+", metavar="FILE", help="fixture files, in order")
    replay.add_argument("--url", help="a running devserver (or Inngest dev server), e.g. "
                                      "http://127.0.0.1:8288, or its full /e/<key> URL")
    replay.add_argument("--app", action="append", default=[], metavar="MODULE[:ATTR]|FILE.py",
                        help="run in-process against this app (repeatable)")
    replay.add_argument("--env", default=None,
                        help=f"environment (X-Inngest-Env; default {DEFAULT_ENV})")
    replay.add_argument("--timing", choices=TIMINGS, default="fast",
                        help="fast: send at once (default); original: keep the gaps between "
                             "the events' ts (virtual time with --app; real waits with --url, "
                             "each capped by --max-gap)")
    replay.add_argument("--max-gap", type=_seconds, default=DEFAULT_MAX_GAP, metavar="SECONDS",
                        help=f"--url --timing original: longest real wait between two events "
                             f"(default {DEFAULT_MAX_GAP:g})")
    replay.add_argument("--retry-interval", type=_seconds, default=None, metavar="SECONDS",
                        help="--app: fixed delay between attempts (default: Inngest's backoff "
                             "table; virtual time, so it costs nothing either way)")
    replay.add_argument("--db", default=None, metavar="PATH",
                        help="--app: keep the replay's database at PATH (a new file) to browse "
                             "it later with `devserver --db PATH`")
    replay.add_argument("--wait", action="store_true",
                        help="--url: wait for the runs to finish, print the summary and exit 1 "
                             "if a run failed")
    replay.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"wall-clock seconds to wait for runs to finish "
                             f"(default {DEFAULT_TIMEOUT:g})")
    replay.add_argument("--limit", type=_count, default=100, metavar="N",
                        help="sessions listed in the summary (default 100, failing ones first; "
                             "0 lists all)")
    replay.add_argument("--log-level", choices=LOG_LEVELS, default="warning",
                        help="log verbosity (default warning)")

    export = commands.add_parser(
        "export", help="write a session's events as a JSONL fixture",
        description="Write the events users sent with a session (not those produced by runs "
                    "or cron) as a JSONL fixture that `replay` accepts.")
    export.add_argument("--session", required=True, metavar="IDENTIFIER=VALUE",
                        help="the session, e.g. conversation_id=conv_1234 (the value is "
                             "everything after the first '=')")
    export.add_argument("--env", default=DEFAULT_ENV, help=f"environment (default {DEFAULT_ENV})")
    export.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help=f"database file (default {DEFAULT_DB})")
    export.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="write to FILE instead of stdout")
    export.add_argument("--log-level", choices=LOG_LEVELS, default="warning",
                        help="log verbosity (default warning)")
    return parser


# ---------------------------------------------------------------------------------------------
# serve


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


def _serve(args: argparse.Namespace) -> int:
    code = _run_serving(_serve_async(args))
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
    again). The real stops are signals: Ctrl-C and SIGTERM set `_serve_async`'s stop event
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


async def _serve_async(args: argparse.Namespace) -> int:
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
            progress = _Progress("preloaded", len(events))
            for done, batch in _cumulative(batches(events)):
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
        await stop.wait()
        log.info("shutting down: %s", _shutdown_note(db))
    finally:
        await server.stop()
    return 0


def _shutdown_note(db: str) -> str:
    """What stopping keeps: a database file keeps everything; `:memory:` (and `--demo`'s
    temporary database) is deleted on exit, so nothing resumes."""
    if db == ":memory:":
        return ("no new requests; the database is temporary and deleted on exit, so "
                "unfinished runs end here (pass --db PATH to keep them)")
    return ("no new requests; acknowledged events are committed; unfinished runs resume on "
            "the next start")


def _cumulative(groups: list[list[dict[str, Any]]]) -> list[tuple[int, list[dict[str, Any]]]]:
    done, out = 0, []
    for group in groups:
        done += len(group)
        out.append((done, group))
    return out


# ---------------------------------------------------------------------------------------------
# replay


class _Progress:
    """Progress lines on stderr, one per tenth, for replays of more than PROGRESS_ABOVE events."""

    def __init__(self, verb: str, total: int, stream: TextIO | None = None) -> None:
        self.verb = verb
        self.total = total
        self.stream = stream
        self.started = time.monotonic()
        self._shown = 0

    def __call__(self, done: int, total: int) -> None:
        if total <= PROGRESS_ABOVE:
            return
        tenth = done * 10 // total
        if tenth > self._shown:
            self._shown = tenth
            rate = done / max(time.monotonic() - self.started, 1e-6)
            print(f"devserver: {self.verb} {done}/{total} events ({done * 100 // total}%, "
                  f"{rate:,.0f}/s)", file=self.stream or sys.stderr, flush=True)


def _replay(args: argparse.Namespace) -> int:
    if args.url and args.app:
        raise UserError("replay: use --url (send to a running server) or --app (run "
                        "in-process), not both")
    if not args.url and not args.app:
        raise UserError("replay: pass --url URL to send to a running server, or --app SPEC to "
                        "run the events in-process against your functions")
    if args.url:
        event_endpoint(args.url)  # a bad URL is a user error before any file is read
        for given, option in ((args.db, "--db"), (args.retry_interval, "--retry-interval")):
            if given is not None:
                raise UserError(f"replay: {option} applies to --app (in-process) only")
    elif args.wait:
        raise UserError("replay: --wait applies to --url only (--app always waits)")
    if args.db is not None and args.db != ":memory:" and Path(args.db).exists():
        raise UserError(f"--db {args.db} already exists; replay --app starts from an empty "
                        "database (remove it or pick a new path)")
    files = list(args.files)
    if files.count("-") > 1:
        raise UserError("replay: '-' (stdin) can be given once")
    events = read_all(files)  # every file, every line, before anything is sent
    if not events:
        print(f"no events in {', '.join(files)}: nothing to replay")
        return 0
    where = f"{len(events)} events from {len(files)} file{'s' if len(files) != 1 else ''}"
    if args.url:
        return asyncio.run(_replay_url(args, events, where))
    functions = [fn for spec in args.app for fn in load_app(spec)]
    started = time.monotonic()
    report = asyncio.run(run_in_process(
        events, functions, env=args.env or DEFAULT_ENV, timing=args.timing,
        retry_interval=args.retry_interval, db=args.db or ":memory:", timeout=args.timeout,
        progress=_Progress("replayed", len(events))))
    elapsed = time.monotonic() - started
    print(f"replayed {where} against {len(functions)} function"
          f"{'s' if len(functions) != 1 else ''} in {elapsed:.2f}s "
          f"(virtual time moved {human_ms(report.virtual_ms)}; timing {args.timing})")
    if report.timed_out:
        print(f"runs were still executing after {args.timeout:g}s (--timeout); "
              "the figures below are as they stood")
    kept = bool(args.db) and args.db != ":memory:"
    print_report(report, args.limit, None if kept else
                 "the runs above were in a temporary database, deleted on exit: replay with "
                 "--db PATH to keep it, then python -m devserver --db PATH to browse them")
    if kept:
        print(f"database kept at {Path(args.db).resolve()}: "
              f"python -m devserver --db {args.db} to browse it")
    return 0 if report.ok else 1


async def _replay_url(args: argparse.Namespace, events: list[dict[str, Any]], where: str) -> int:
    if args.timing == "original":
        span = span_ms(events)
        print(f"devserver: keeping the original timing: the events span {human_ms(span)}; "
              f"each gap is capped at {args.max_gap:g}s (--max-gap)", file=sys.stderr)
    started = time.monotonic()
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)) as http:
        sent = await send_to_server(
            events, args.url, env=args.env, timing=args.timing, max_gap=args.max_gap,
            progress=_Progress("sent", len(events)), session=http)
        capped = (f"; {sent.capped} gap{'s' if sent.capped != 1 else ''} capped at "
                  f"{args.max_gap:g}s" if sent.capped else "")
        print(f"sent {where} to {sent.base_url} (env {args.env or DEFAULT_ENV}) in "
              f"{sent.requests} request{'s' if sent.requests != 1 else ''}, "
              f"{time.monotonic() - started:.2f}s{capped}")
        if not args.wait:
            return 0
        try:
            # Only the runs these events led to: other work on the server is not waited for.
            followed = await follow_runs(sent.base_url, http, sent.ids, args.timeout)
            report = await server_report(sent.base_url, http, events, args.env)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise ReplayError(f"the events were sent, but reading the runs from "
                              f"{sent.base_url} failed: {exc}") from None
    apply_followed(report, followed.runs, followed.finished)
    if not followed.finished:
        print(f"{len(followed.unfinished)} of the {len(followed.runs)} runs these events led "
              f"to were unfinished after {args.timeout:g}s (--timeout); the figures below are "
              "as they stood")
    print_report(report, args.limit)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------
# export


def parse_session(text: str) -> tuple[str, str]:
    """`IDENTIFIER=VALUE` split at the first `=`; the value is kept verbatim."""
    identifier, sep, value = text.partition("=")
    if not sep or not identifier or not value:
        raise UserError(f"--session {text!r}: expected IDENTIFIER=VALUE, e.g. "
                        "conversation_id=conv_1234")
    return identifier, value


def _export(args: argparse.Namespace) -> int:
    identifier, value = parse_session(args.session)
    lines, left_out = asyncio.run(export_session(args.db, args.env, identifier, value))
    data = to_jsonl(lines).encode()
    if args.output is None or args.output == "-":
        out = getattr(sys.stdout, "buffer", None)
        if out is None:
            sys.stdout.write(data.decode())
        else:
            sys.stdout.flush()
            out.write(data)
            out.flush()
    else:
        try:
            Path(args.output).write_bytes(data)
        except OSError as exc:
            raise UserError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        print(f"devserver: wrote {len(lines)} events of {identifier}={value} (env {args.env}) "
              f"to {args.output}", file=sys.stderr)
    if left_out:
        print(f"devserver: left out {left_out} events produced by runs or cron (replaying "
              "the fixture produces them again)", file=sys.stderr)
    if not lines:
        print("devserver: warning: no event in this session was sent by a user; the fixture "
              "is empty", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# main


def _stdout_closed() -> int:
    """The reader of stdout went away (`... | head -2`): stop quietly, as a program killed by
    SIGPIPE would (exit 141), with no traceback and no error at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush now goes nowhere
        os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `serve` is the default command, so `--help` alone is its help (which lists the others).
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] != "--version"):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)
    logs.setup(args.log_level)
    command = {"replay": _replay, "export": _export}.get(args.command, _serve)
    try:
        code = command(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except UserError as exc:
        message = " ".join(exc.message.split())
        print(f"devserver: error: {message}", file=sys.stderr)
        return 2
    except ReplayError as exc:
        print(f"devserver: error: {' '.join(exc.message.split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130 if args.command in ("replay", "export") else 0
