"""The command line: `python -m devserver [serve] ...`.

`main(argv)` is callable in-process and returns the exit code. User errors (bad path, bad module,
busy port, unwritable database) print one line on stderr and exit with 2; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import ConfigError
from .functions import FunctionDef
from .loader import load_app
from .server import DEFAULT_DB, DEFAULT_HOST, DEFAULT_PORT, Config, Server

log = logging.getLogger(__name__)
COMMANDS = ("serve",)
LOG_LEVELS = ("debug", "info", "warning", "error")


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with `serve` as the default command."""
    parser = argparse.ArgumentParser(
        prog="devserver",
        description="Local dev server for Inngest-style durable functions, with Sessions.",
    )
    parser.add_argument("--version", action="version", version=f"devserver {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server (the default command)")
    serve.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT,
                       help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to bind (default {DEFAULT_HOST}, this machine only)")
    serve.add_argument("--db", default=DEFAULT_DB,
                       help=f"SQLite database file (default {DEFAULT_DB}; ':memory:' keeps "
                            "nothing after exit)")
    serve.add_argument("--app", action="append", default=[], metavar="MODULE[:ATTR]|FILE.py",
                       help="app whose functions to run (repeatable)")
    serve.add_argument("--retry-interval", type=_seconds, default=None, metavar="SECONDS",
                       help="fixed delay between attempts (default: Inngest's backoff table; "
                            "0 retries at once)")
    serve.add_argument("--reload", action=argparse.BooleanOptionalAction, default=None,
                       help="reload the apps when their files change (default: on when --app "
                            "is given)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                       help="log verbosity (default info)")
    return parser


def _banner(server: Server, db: str, functions: list[FunctionDef]) -> str:
    reloading = server.config.reload and bool(server.config.app_specs)
    lines = [
        f"devserver {__version__}",
        f"  dashboard   {server.url}/sessions",
        f"  event API   POST {server.url}/e/<any key>",
        f"  database    {db if db == ':memory:' else Path(db).resolve()}",
        f"  reload      {'on: watching app files' if reloading else 'off'}",
        f"  functions   {len(functions)}",
    ]
    for fn in functions:
        triggers = ", ".join(t.describe() for t in fn.triggers)
        lines.append(f"    {fn.id}  <- {triggers}")
    return "\n".join(lines)


async def _serve(args: argparse.Namespace) -> int:
    functions = [fn for spec in args.app for fn in load_app(spec)]
    reload = bool(args.app) if args.reload is None else args.reload
    config = Config(db=args.db, functions=functions, retry_interval=args.retry_interval,
                    app_specs=list(args.app), reload=reload)
    server = Server(config, host=args.host, port=args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(_banner(server, args.db, functions), flush=True)
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] not in
                         ("-h", "--help", "--version")):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        return asyncio.run(_serve(args))
    except ConfigError as exc:
        message = " ".join(exc.message.split())
        print(f"devserver: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
