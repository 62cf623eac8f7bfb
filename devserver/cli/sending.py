"""Replaying to a running server: `send_to_server` POSTs a fixture's events to its `/e/<key>`
(with `timing="original"`, the gaps as real waits, each capped at `max_gap`), and `follow_runs`
follows the runs they led to, over the server's API, until every one has ended (`--url
--wait`). A server that refuses events after accepting earlier ones is a `ReplayError`.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import aiohttp

from devserver.cli.fixture_files import BATCH_EVENTS, dumps, timed_groups
from devserver.errors import DevserverError, UserError

BATCH_BYTES = 8 * 1024 * 1024
"""Encoded bytes per request, well under the server's request body limit."""
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
        encoded = dumps(event).encode()
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

