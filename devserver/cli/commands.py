"""`replay` and `export`: the checks of their options, the lines they print and their exit
codes. The work is done in `replay` (fixture files in and out) and `report` (the summary)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from devserver.cli.args import parse_session
from devserver.cli.fixture_files import human_ms, read_all, span_ms
from devserver.cli.progress import Progress
from devserver.cli.replay import export_session, run_in_process
from devserver.cli.report import apply_followed, print_report, server_report
from devserver.cli.sending import ReplayError, event_endpoint, follow_runs, send_to_server
from devserver.errors import UserError
from devserver.model.fixtures import to_jsonl
from devserver.runtime.loader import load_app
from devserver.runtime.runner import DEFAULT_ENV


def replay(args: argparse.Namespace) -> int:
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
        return asyncio.run(replay_url(args, events, where))
    functions = [fn for spec in args.app for fn in load_app(spec)]
    started = time.monotonic()
    report = asyncio.run(run_in_process(
        events, functions, env=args.env or DEFAULT_ENV, timing=args.timing,
        retry_interval=args.retry_interval, db=args.db or ":memory:", timeout=args.timeout,
        progress=Progress("replayed", len(events))))
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


async def replay_url(args: argparse.Namespace, events: list[dict[str, Any]], where: str) -> int:
    if args.timing == "original":
        span = span_ms(events)
        print(f"devserver: keeping the original timing: the events span {human_ms(span)}; "
              f"each gap is capped at {args.max_gap:g}s (--max-gap)", file=sys.stderr)
    started = time.monotonic()
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)) as http:
        sent = await send_to_server(
            events, args.url, env=args.env, timing=args.timing, max_gap=args.max_gap,
            progress=Progress("sent", len(events)), session=http)
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


def export(args: argparse.Namespace) -> int:
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
