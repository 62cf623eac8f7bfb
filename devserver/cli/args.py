"""The command line's grammar: `build_parser` (serve, the default, and `replay` and `export`),
the checks of option values that turn a bad one into argparse's one-line usage error, and
`parse_session` for `export --session`."""

from __future__ import annotations

import argparse

from devserver import __version__
from devserver.cli.fixture_files import TIMINGS
from devserver.cli.sending import DEFAULT_MAX_GAP
from devserver.errors import UserError
from devserver.runtime.runner import DEFAULT_ENV
from devserver.sdk.apps import DEFAULT_POLL_INTERVAL
from devserver.web.server import DEFAULT_DB, DEFAULT_HOST, DEFAULT_PORT

COMMANDS = ("serve", "dev", "replay", "export")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_TIMEOUT = 600.0
"""Seconds of wall time `replay --app` (and `--url --wait`) waits for runs to finish."""


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


def parse_session(text: str) -> tuple[str, str]:
    """`IDENTIFIER=VALUE` split at the first `=`; the value is kept verbatim."""
    identifier, sep, value = text.partition("=")
    if not sep or not identifier or not value:
        raise UserError(f"--session {text!r}: expected IDENTIFIER=VALUE, e.g. "
                        "conversation_id=conv_1234")
    return identifier, value
