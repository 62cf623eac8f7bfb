"""Fixture files: reading them, replaying them, and exporting a session as one.

A fixture is `.jsonl` (one event per line) or `.json` (an event or an array), every event exactly
what `POST /e/` accepts. Files are read and validated as a whole before anything is sent: a bad
line is reported as `file:line: what` and nothing is sent, as with the event API's atomic
validation.

Replaying goes one of two ways: `send_to_server` POSTs the events to a running server, and
`run_in_process` runs them against functions on a private store and a `VirtualClock`, waits for
every run to finish and returns per-session figures as a `Report` (the `report` module owns it:
filling one, from a server too for `--url --wait`, and rendering it).
With `timing="original"` the gaps between the events' `ts` values are kept: as real waits over
HTTP (each capped), as virtual time in-process, where runs progress through the gap as they would
have (sleeps end, retries fire, waits time out) before the next event arrives.

Exporting (`export_events`) keeps only the events users sent: events produced by runs (`send_event`,
lifecycle events) and by cron are left out, because replaying the export runs the functions again
and they produce those events anew. So an export replayed into an empty database gives the session
the same figures.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiohttp

from devserver.app import FunctionDef
from devserver.cli.report import Report, fill_report
from devserver.clock import VirtualClock
from devserver.errors import DevserverError, UserError
from devserver.model.events import (
    MAX_EVENT_BYTES,
    MAX_EVENTS_PER_REQUEST,
    loads,
    validate_event,
)
from devserver.model.fixtures import export_events
from devserver.runtime.local import LocalExecutor
from devserver.runtime.runner import DEFAULT_ENV, Runner
from devserver.store.facade import Store
from devserver.web.server import Config

STDIN = "-"
"""The file name that reads JSON Lines from standard input."""
BATCH_EVENTS = 500
"""Events per request (the event API takes up to 5000)."""
BATCH_BYTES = 8 * 1024 * 1024
"""Encoded bytes per request, well under the server's request body limit."""
TIMINGS = ("fast", "original")
DEFAULT_MAX_GAP = 10.0
"""Seconds: the longest real wait between two events with `timing="original"` over HTTP."""
DEFAULT_KEY = "replay"
"""The event key used in `/e/<key>` when the URL names none (devserver accepts any key)."""

Progress = Callable[[int, int], None]
"""Called with (events sent so far, events in all) after each request."""
Sleep = Callable[[float], Awaitable[None]]


class ReplayError(DevserverError):
    """Replaying stopped partway: some events were accepted, then the server refused or went
    away. The command line exits with 1 (not 2: something was sent)."""


# ---------------------------------------------------------------------------------------------
# Reading


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of one fixture file, validated; `UserError` says which file and line is bad.

    `-` reads JSON Lines from standard input.
    """
    if str(path) == STDIN:
        return parse_events(sys.stdin.buffer.read(), "<stdin>", array=False)
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_events(text, str(path), array=path.suffix.lower() == ".json")


def parse_events(text: bytes, name: str, *, array: bool) -> list[dict[str, Any]]:
    """Events from fixture text: a JSON event or array (`array`), else one event per line."""
    # Re-encoding never makes an event more than 4x longer, so small files need no measuring.
    measure = len(text) > MAX_EVENT_BYTES // 4
    if array:
        try:
            doc = loads(text)
        except UserError as exc:
            raise UserError(f"{name}: {_not_json(exc.message, one_line=False)}") from None
        events = doc if isinstance(doc, list) else [doc]
        for index, event in enumerate(events):
            _check(event, f"{name}: event {index}", measure)
        return events
    events = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(b"#"):  # blank lines and `#` comments
            continue
        where = f"{name}:{number}"
        try:
            event = loads(line)
        except UserError as exc:
            raise UserError(f"{where}: {_not_json(exc.message, one_line=True)}") from None
        _check(event, where, measure)
        events.append(event)
    return events


def _not_json(message: str, *, one_line: bool) -> str:
    """The event API's "request body is not valid JSON: ..." said of a fixture file, or of
    one of its lines (where "at line 1 column 9" is just "at column 9")."""
    message = re.sub(r"^request body is not valid JSON", "not valid JSON", message)
    return re.sub(r" at line 1 column (\d+)", r" at column \1", message) if one_line else message


def _check(event: Any, where: str, measure: bool) -> None:
    try:
        validate_event(event, 0)
    except UserError as exc:
        raise UserError(f"{where}: {exc.message.removeprefix('events[0].')}") from None
    if measure:
        size = len(_dumps(event).encode())
        if size > MAX_EVENT_BYTES:
            raise UserError(f"{where}: event is {size} bytes as compact JSON; at most "
                            f"{MAX_EVENT_BYTES} bytes (3 MiB) are allowed")


def read_all(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every file's events in order, all validated before the caller sends any."""
    return [event for path in paths for event in read_events(path)]


def batches(events: list[dict[str, Any]], size: int = BATCH_EVENTS) -> list[list[dict[str, Any]]]:
    """Events in request-sized batches, in order."""
    size = max(1, min(size, MAX_EVENTS_PER_REQUEST))
    return [events[i:i + size] for i in range(0, len(events), size)]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Exporting


async def export_session(
    db: str | Path, env: str, identifier: str, value: str,
) -> tuple[list[dict[str, Any]], int]:
    """A session's fixture lines from a database file, and how many events were left out.

    `UserError` when the file is missing or the session unknown (naming the known identifiers).
    """
    path = Path(db)
    if str(db) == ":memory:":
        raise UserError("--db :memory: holds nothing once its server has stopped; "
                        "pass the database file the server used")
    if not await asyncio.to_thread(path.is_file):
        raise UserError(f"no database at {db} (pass the --db the server used)")
    store = Store(path, probe_write=False)  # export only reads: a read-only file is fine
    await store.open()
    try:
        if await store.session(env, identifier, value, limit=1) is None:
            known = [i.identifier for i in await store.identifiers(env)]
            hint = (f"; identifiers there: {', '.join(known[:10])}" if known
                    else "; it has no sessions")
            raise UserError(
                f"no session {identifier}={value!r} in environment {env!r} of {db}{hint}")
        events = await store.session_events(env, identifier, value)
    finally:
        await store.close()
    lines = export_events(events)
    return lines, len(events) - len(lines)


# ---------------------------------------------------------------------------------------------
# Timing


def timed_groups(
    events: list[dict[str, Any]], timing: str,
) -> list[tuple[int, list[dict[str, Any]]]]:
    """Events as (milliseconds to wait first, events to send together), in order.

    `fast` sends everything at once. `original` keeps the gaps between `ts` values: an event
    without `ts`, or with one earlier than the event before it, follows with no gap.
    """
    if timing not in TIMINGS:
        raise UserError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    if timing == "fast" or not events:
        return [(0, list(events))] if events else []
    groups: list[tuple[int, list[dict[str, Any]]]] = []
    now: int | None = None
    for event in events:
        ts, gap = _ts(event), 0
        if ts is not None:
            gap = 0 if now is None else max(0, ts - now)
            now = ts if now is None else max(now, ts)
        if groups and gap == 0:
            groups[-1][1].append(event)
        else:
            groups.append((gap, [event]))
    return groups


def _ts(event: dict[str, Any]) -> int | None:
    ts = event.get("ts")
    return int(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None


def first_ts(events: list[dict[str, Any]]) -> int | None:
    """The first `ts` among the events, where `timing="original"` starts the clock."""
    return next((ts for ts in map(_ts, events) if ts is not None), None)


def span_ms(events: list[dict[str, Any]]) -> int:
    """Milliseconds from the first `ts` to the last (0 without any)."""
    stamps = [ts for ts in map(_ts, events) if ts is not None]
    return max(stamps) - min(stamps) if stamps else 0


def human_ms(ms: int) -> str:
    """A duration such as `2h 13m`, `4m 05s`, `1.5s`."""
    if ms < 60_000:
        return f"{ms / 1000:.3g}s"
    minutes, seconds = divmod(ms // 1000, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s"


# ---------------------------------------------------------------------------------------------
# Sending to a running server


def event_endpoint(url: str, key: str = DEFAULT_KEY) -> tuple[str, str]:
    """(event API URL, server base URL) from `--url`: a base URL, or one ending in `/e/<key>`."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--url {url!r}: expected a server URL such as http://127.0.0.1:8288")
    path = parts.path.rstrip("/")
    head, sep, tail = path.rpartition("/e/")
    if sep and tail and "/" not in tail:
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, head, "", ""))
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")), base
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return f"{base}/e/{urllib.parse.quote(key, safe='')}", base


def _request_bodies(events: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    """(event count, JSON array body) per request: at most BATCH_EVENTS events, BATCH_BYTES."""
    bodies: list[tuple[int, bytes]] = []
    chunk: list[bytes] = []
    size = 0
    for event in events:
        encoded = _dumps(event).encode()
        if chunk and (len(chunk) >= BATCH_EVENTS or size + len(encoded) > BATCH_BYTES):
            bodies.append((len(chunk), b"[" + b",".join(chunk) + b"]"))
            chunk, size = [], 0
        chunk.append(encoded)
        size += len(encoded) + 1
    if chunk:
        bodies.append((len(chunk), b"[" + b",".join(chunk) + b"]"))
    return bodies


@dataclass
class Sent:
    """What `send_to_server` did."""

    events: int
    requests: int
    base_url: str
    capped: int = 0
    """Gaps shortened to `max_gap`."""
    ids: list[str] = field(default_factory=list)
    """The ids the server gave the events, in order (what `follow_runs` starts from)."""


async def send_to_server(
    events: list[dict[str, Any]], url: str, *, env: str | None = None, timing: str = "fast",
    max_gap: float = DEFAULT_MAX_GAP, progress: Progress | None = None,
    sleep: Sleep = asyncio.sleep, session: aiohttp.ClientSession | None = None,
) -> Sent:
    """POST the events, in order, to a running server's `/e/<key>` on one connection pool.

    Raises `UserError` when nothing was accepted (server unreachable, wrong URL) and
    `ReplayError` when the server refused a request after accepting earlier ones.
    """
    endpoint, base = event_endpoint(url)
    groups = timed_groups(events, timing)
    headers = {"Content-Type": "application/json"}
    if env is not None:
        headers["X-Inngest-Env"] = env
    sent = Sent(0, 0, base)
    total = len(events)
    owned = session is None
    client = session or aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300))
    try:
        for gap_ms, group in groups:
            if gap_ms:
                wait = min(gap_ms / 1000, max_gap)
                sent.capped += wait < gap_ms / 1000
                await sleep(wait)
            for count, body in _request_bodies(group):
                await _post(client, endpoint, body, count, headers, sent, total)
                sent.events += count
                sent.requests += 1
                if progress is not None:
                    progress(sent.events, total)
    finally:
        if owned:
            await client.close()
    return sent


async def _post(client: aiohttp.ClientSession, endpoint: str, body: bytes, count: int,
                headers: dict[str, str], sent: Sent, total: int) -> None:
    which = f"events {sent.events + 1}-{sent.events + count} of {total}"
    try:
        async with client.post(endpoint, data=body, headers=headers) as resp:
            text = await resp.text(errors="replace")
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        problem = f"cannot reach {endpoint}: {exc or type(exc).__name__}"
        _fail(problem, sent)
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    ids = doc.get("ids") if isinstance(doc, dict) else None
    if status == 200 and isinstance(ids, list) and len(ids) == count:
        sent.ids.extend(str(i) for i in ids)
        return
    error = doc.get("error") if isinstance(doc, dict) else None
    detail = error if isinstance(error, str) else " ".join(text.split())[:200] or "no body"
    _fail(f"{endpoint} answered HTTP {status} to {which}: {detail}", sent)


def _fail(problem: str, sent: Sent) -> NoReturn:
    if sent.events == 0:
        raise UserError(f"{problem}; nothing was sent")
    raise ReplayError(f"{problem}; the {sent.events} events before were accepted")


# ---------------------------------------------------------------------------------------------
# Following the runs the sent events led to


FOLLOW_CONCURRENCY = 8
"""Requests `follow_runs` keeps in flight at once."""
FOLLOW_POLL = (0.05, 0.5)
"""Seconds between two rounds of `follow_runs`: the first, and the most it grows to."""


@dataclass
class Followed:
    """What `follow_runs` found: every run the events led to, by run id, as `/api/runs/{id}`
    last showed it; `finished` is False when some were still unfinished at the timeout."""

    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: bool = True

    @property
    def unfinished(self) -> list[dict[str, Any]]:
        """The runs not Completed, Failed or Cancelled, oldest first."""
        return [doc for _, doc in sorted(self.runs.items())
                if doc.get("status") not in FINISHED_STATUSES]


FINISHED_STATUSES = ("Completed", "Failed", "Cancelled")


def _event_ids(output: Any) -> list[str]:
    """Event ids in a step's output: a list of them, or `{"ids": [...]}` (what an SDK app's
    `send_event` step, which posts to `/e/` itself, reports)."""
    ids = output.get("ids") if isinstance(output, dict) else output
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return []
    return [i for i in ids if len(i) == ULID_CHARS and i.isalnum()]


ULID_CHARS = 26


def led_to(run: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(event ids, run ids) a run produced: the events it sent and its end's lifecycle events
    (`emitted_events`), the events of its `send_event` steps (of SDK apps too, reported as a
    step's output) and the runs its `invoke` steps started."""
    emitted = run.get("emitted_events")
    events: list[str] = [e for e in emitted if isinstance(e, str)] if isinstance(
        emitted, list) else []
    runs: list[str] = []
    for step in run.get("steps") or []:
        kind, detail = step.get("kind"), step.get("detail")
        if kind == "invoke" and isinstance(detail, dict) and isinstance(detail.get("run_id"), str):
            runs.append(detail["run_id"])
        elif step.get("status") == "Completed" and kind in ("send_event", "run"):
            events.extend(_event_ids(step.get("output")))
    return events, runs


class _Follower:
    def __init__(self, base_url: str, http: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self.http = http
        self.events: set[str] = set()
        self.open: set[str] = set()
        self.found = Followed()
        self._gate = asyncio.Semaphore(FOLLOW_CONCURRENCY)

    async def _get(self, path: str) -> dict[str, Any] | None:
        url = f"{self.base_url}{path}"
        async with self._gate, self.http.get(url) as resp:
            if resp.status == 404:
                return None
            doc = await resp.json(content_type=None) if resp.status == 200 else None
        if not isinstance(doc, dict):
            raise ReplayError(f"{url} answered HTTP {resp.status}: --wait needs a devserver")
        return doc

    def _add_runs(self, run_ids: Iterable[str]) -> bool:
        new = [r for r in run_ids if r not in self.found.runs and r not in self.open]
        self.open.update(new)
        return bool(new)

    async def add_events(self, event_ids: Iterable[str]) -> bool:
        """Note the runs these events started; True when there were new ones."""
        new = [e for e in dict.fromkeys(event_ids) if e not in self.events]
        self.events.update(new)
        docs = await asyncio.gather(*(
            self._get(f"/v1/events/{urllib.parse.quote(e, safe='')}/runs") for e in new))
        return self._add_runs(run["run_id"] for doc in docs if doc is not None
                              for run in doc.get("data") or [] if isinstance(run, dict))

    async def round(self) -> bool:
        """Read every unfinished run once and note what it led to; True when that found new
        runs (read them at once, no need to wait)."""
        ids = sorted(self.open)
        docs = await asyncio.gather(*(
            self._get(f"/api/runs/{urllib.parse.quote(r, safe='')}") for r in ids))
        events: list[str] = []
        runs: list[str] = []
        for run_id, doc in zip(ids, docs, strict=True):
            if doc is None:  # gone (a database replaced under the server): nothing to wait for
                self.open.discard(run_id)
                continue
            self.found.runs[run_id] = doc
            if doc.get("status") in FINISHED_STATUSES:
                self.open.discard(run_id)
            sent, invoked = led_to(doc)
            events.extend(sent)
            runs.extend(invoked)
        new_runs = self._add_runs(runs)
        return await self.add_events(events) or new_runs


async def follow_runs(base_url: str, session: aiohttp.ClientSession, event_ids: list[str],
                      timeout: float) -> Followed:
    """Wait for the runs these events started, and for what those led to (the runs of the
    events they sent, the runs they invoked), to finish; at most `timeout` seconds.

    Only these runs: other work on the server (a day-long sleep left by an earlier replay)
    is not waited for. Everything is read over the JSON API (`/v1/events/{id}/runs`,
    `/api/runs/{id}`), so it works with any devserver.
    """
    follower = _Follower(base_url, session)
    deadline = time.monotonic() + timeout
    pause = FOLLOW_POLL[0]
    await follower.add_events(event_ids)
    while follower.open:
        if await follower.round():
            continue
        if not follower.open:
            break
        if time.monotonic() >= deadline:
            follower.found.finished = False
            break
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, FOLLOW_POLL[1])
    return follower.found


# ---------------------------------------------------------------------------------------------
# Running in-process


async def run_in_process(
    events: list[dict[str, Any]], functions: list[FunctionDef], *, env: str = DEFAULT_ENV,
    timing: str = "fast", retry_interval: float | None = None, db: str | Path = ":memory:",
    timeout: float = 600.0, progress: Progress | None = None,
) -> Report:
    """Run the events against `functions` on a fresh store and a virtual clock; report.

    Waits until no run executes or waits on a timer (virtual time skips every sleep, retry
    backoff and timeout), at most `timeout` seconds of wall time. `db` is `:memory:` (a
    temporary file removed afterwards) or a path to keep.
    """
    groups = timed_groups(events, timing)
    start = first_ts(events) if timing == "original" else None
    clock = VirtualClock(start_ms=start)
    began = clock.now_ms()
    store = Store(db)
    local = LocalExecutor()
    runner = Runner(store, clock, Config(retry_interval=retry_interval).backoff(), local=local)
    runner.register(functions)
    report = Report(events=len(events))
    await store.open()
    try:
        await runner.start()
        try:
            async with asyncio.timeout(timeout):
                done = 0
                for gap_ms, group in groups:
                    if gap_ms:
                        await _advance(runner, clock, clock.now_ms() + gap_ms)
                    for batch in batches(group):
                        await runner.ingest(env, [validate_event(ev, i)
                                                  for i, ev in enumerate(batch)])
                        done += len(batch)
                        if progress is not None:
                            progress(done, len(events))
                await runner.wait_idle()
        except TimeoutError:
            report.timed_out = True
        finally:
            await runner.stop()
            local.close()
        report.virtual_ms = clock.now_ms() - began
        await fill_report(report, store, env)
    finally:
        await store.close()
    return report


async def _advance(runner: Runner, clock: VirtualClock, target: int) -> None:
    """Let virtual time pass up to `target` the way real time would: every timer due by then
    fires in order, and the runs it wakes execute, before the clock moves on."""
    while True:
        await runner.wait_idle(skip_time=False)
        due = clock.next_due()
        if due is None or due > target:
            break
        clock.advance_to(due)
        await asyncio.sleep(0)  # the due timers' callbacks run on the loop's next turn
    clock.advance_to(target)
    await asyncio.sleep(0)
    await runner.wait_idle(skip_time=False)

