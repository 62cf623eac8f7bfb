"""Benchmarks: every figure of SPEC 7 / issues 7 and 18, measured side by side in one run.

    python -m devserver.bench            # the full run (1M runs for the dashboard and memory rows)
    python -m devserver.bench --short    # seconds, for CI: proves it runs, prints the figures

Each row prints the figure, the target and whether it was met, after a header that says what
machine it ran on. The traffic is shaped like real use (`workload`: every event a new message
id, one of 1,000 conversations and 97 users). HTTP rows drive a server in a child process with
the same load generator for both sides of a ratio: wrk when installed, else a built-in aiohttp
client. The batched-ingest rows compare with a minimal schema written in this process, no HTTP
(`minimal`). The two sides run in
alternating rounds (bare, ours, bare, ours, ...) and a ratio is the median of the rounds' ratios,
so a noisy neighbour slows both alike; `DEVSERVER_BENCH_VERBOSE=1` prints every round. The exit
code is 1 when a row misses its target (CI runs `--short --no-fail`: a shared machine is too
noisy to gate on).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from devserver.bench import versus
from devserver.bench.servers import (
    child,
    devserver_args,
    event_count,
    free_port,
    rss_mb,
    run_counts,
    wait_healthy,
    wait_idle,
)
from devserver.bench.workload import CONVERSATIONS, SINGLE, USERS, Workload, load

BENCH_APP = "devserver.bench.app:app"


@dataclass
class Row:
    """One benchmark figure and its target."""

    name: str
    value: float
    unit: str
    target: str
    ok: bool
    note: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "MISS"
        note = f"  ({self.note})" if self.note else ""
        return (f"  {mark} {self.name:<52} {self.value:>10.2f} {self.unit:<10} "
                f"target {self.target}{note}")


def machine() -> str:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}")


# ---------------------------------------------------------------------------------------------
# Rows


def alternate(rounds: int, bare: Callable[[], float], ours: Callable[[], float],
              sides: str = "bare, ours") -> tuple[float, float, float]:
    """Measure the two sides of a ratio in alternating rounds (bare then ours, ours then bare,
    ...), so that a noisy neighbour slows both alike and neither side always runs in the
    other's wake (a devserver's checkpoints and index passes just after its round); returns
    the median of each side and the median of the rounds' ratios."""
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            pairs.append((bare(), ours()))
        else:
            second = ours()
            pairs.append((bare(), second))
    if os.environ.get("DEVSERVER_BENCH_VERBOSE"):
        print(f"    rounds ({sides}): " + ", ".join(f"({b:.0f}, {o:.0f})" for b, o in pairs))
    return (statistics.median(b for b, _ in pairs), statistics.median(o for _, o in pairs),
            statistics.median(o / b for b, o in pairs))


@contextmanager
def reference_server(module: str, *extra: str) -> Iterator[str]:
    """A reference server (`bare` or `minimal`) in a child process, warmed up."""
    port = free_port()
    with child([module, str(port), *extra], port) as url:
        load(url + "/e/key", SINGLE, 1, 8)
        yield url


def ingest_rows(seconds: float, rounds: int, bare_url: str, tmp: Path) -> list[Row]:
    """Events acknowledged per second, one a request, ours vs a bare aiohttp handler."""
    port = free_port()
    with child(devserver_args(port, tmp / "ingest.sqlite3"), port) as url:
        load(url + "/e/key", SINGLE, 1, 8)
        bare, ours, ratio = alternate(
            rounds, lambda: load(bare_url + "/e/key", SINGLE, seconds),
            lambda: load(url + "/e/key", SINGLE, seconds))
    return [
        Row("ingest: bare aiohttp handler", bare, "events/s", "(reference)", True,
            f"median of {rounds} rounds"),
        Row("ingest: devserver, stored durably", ours, "events/s", ">= 0.5 x bare", ratio >= 0.5,
            f"{ratio:.2f} x bare, median of the rounds' ratios"),
    ]


def batched_rows(seconds: float, rounds: int, tmp: Path) -> list[Row]:
    """Events per second at 50 and 500 a request, ours vs the minimal SQLite schema."""
    rows = []
    for size in (50, 500):
        rows += _batched(Workload(size), seconds, rounds, tmp)
    return rows


BATCH_CONNECTIONS = 8
"""Clients sending batches at once (a batch of 500 is 60 KB: 32 of them at once would be a
queue, not traffic)."""


def _batched(workload: Workload, seconds: float, rounds: int, tmp: Path) -> list[Row]:
    from devserver.bench import minimal

    size = workload.per_request
    port = free_port()
    reference = minimal.connect(tmp / f"minimal{size}.sqlite3")
    try:
        with child(devserver_args(port, tmp / f"batched{size}.sqlite3"), port) as url:
            load(url + "/e/key", workload, 1, BATCH_CONNECTIONS)
            limit, ours, ratio = alternate(
                rounds, lambda: minimal.rate(workload, seconds, reference),
                lambda: load(url + "/e/key", workload, seconds, BATCH_CONNECTIONS), "minimal, ours")
    finally:
        reference.close()
    return [
        Row(f"batched ingest, {size} a request: minimal schema, no HTTP", limit, "events/s",
            "(reference)", True, f"{size} a commit, median of {rounds} rounds"),
        Row(f"batched ingest, {size} a request: devserver over HTTP", ours, "events/s",
            ">= 0.8 x minimal", ratio >= 0.8,
            f"{ratio:.2f} x the minimal schema, {BATCH_CONNECTIONS} clients, median of the "
            "rounds' ratios"),
    ]


def e2e_row(seconds: float, rounds: int, bare_url: str, tmp: Path) -> Row:
    """Events -> trivial async function -> Completed and recorded, runs per second."""
    port = free_port()
    db = tmp / "e2e.sqlite3"
    with child(devserver_args(port, db, "--app", BENCH_APP), port) as url:
        runs = versus.e2e_rate(url, seconds, functools.partial(run_counts, db),
                               functools.partial(wait_idle, url))
        bare, rate, ratio = alternate(
            rounds, lambda: load(bare_url + "/e/key", SINGLE, seconds), runs)
        failed = run_counts(db)[1]
    return Row("end to end: event -> run Completed", rate, "runs/s", ">= 0.3 x bare",
               ratio >= 0.3 and failed == 0,
               f"{ratio:.2f} x bare ({bare:.0f}/s), median of {rounds} rounds")


def versus_rows(seconds: float, rounds: int, other: Path, tmp: Path) -> list[Row]:
    """Ingest and end to end, this build against the checkout at `other`, side by side."""
    rows: list[Row] = []
    for name, app in (("ingest", ()), ("end to end", ("--app", BENCH_APP))):
        rates: list[Callable[[], float]] = []
        with ExitStack() as servers:
            for side, build in (("other", other), ("this", None)):
                port, db = free_port(), tmp / f"vs-{side}{len(rows)}.sqlite3"
                url = servers.enter_context(child(devserver_args(port, db, *app), port,
                                                  build=build))
                load(url + "/e/key", SINGLE, 1, 8)
                rates.append(versus.ingest_rate(url, seconds) if not app else versus.e2e_rate(
                    url, seconds, functools.partial(run_counts, db),
                    functools.partial(wait_idle, url)))
            theirs, ours, ratio = alternate(rounds, rates[0], rates[1], "other, this")
        rows.append(Row(f"{name}: this build / the build at --against", ratio, "x",
                        "(a comparison)", True, f"{ours:.0f} against {theirs:.0f} a second, "
                        f"median of {rounds} rounds' ratios"))
    return rows


def flow_row(kind: str, seconds: float, rounds: int, bare_url: str, tmp: Path) -> Row:
    """Events into a batched (up to 100 a run) or a debounced function: events acknowledged
    per second (each decided and stored with its batch or debounce), as a ratio to the bare
    server's; after each round every batch and debounce must have run, exactly once."""
    name = {"batch": "bench/batched", "debounce": "bench/debounced"}[kind]
    workload = Workload(1, name=name)
    port = free_port()
    db = tmp / f"flow-{kind}.sqlite3"
    seen: dict[str, int] = {"events": 0, "runs": 0, "failed": 0}
    with child(devserver_args(port, db, "--app", BENCH_APP), port) as url:

        def events() -> float:
            rate = load(url + "/e/key", workload, seconds)  # acknowledged, with decisions
            wait_idle(url)  # then every batch and debounce runs (they count as busy)
            (seen["runs"], seen["failed"]), seen["events"] = run_counts(db), event_count(db)
            return rate

        bare, rate, ratio = alternate(
            rounds, lambda: load(bare_url + "/e/key", workload, seconds), events)
    if kind == "batch":  # every event in exactly one run of at most 100
        right = -(-seen["events"] // 100) <= seen["runs"] < seen["events"]
        what = f"{seen['events']:,} events in {seen['runs']:,} batched runs"
        title = "batched function: events -> runs of up to 100"
    else:  # one key: one run per round, after its last event
        right = seen["runs"] == rounds
        what = f"{seen['events']:,} events, {seen['runs']} debounced runs"
        title = "debounced function: events -> one run per key"
    return Row(title, rate, "events/s", ">= 0.25 x bare",
               ratio >= 0.25 and right and seen["failed"] == 0,
               f"{ratio:.2f} x bare ({bare:.0f}/s); {what}, median of {rounds} rounds")


def dashboard_rows(sizes: list[int], tmp: Path, requests: int = 60) -> list[Row]:
    """Median latency of the sessions list, a session page (with its timeline) and the runs
    list at each DB size."""
    from devserver.store.schema import seed_runs

    medians: dict[int, tuple[float, ...]] = {}
    for runs in sizes:
        db = tmp / f"dash{runs}.sqlite3"
        seed_runs(db, runs=runs, sessions=max(1, runs // 10))
        port = free_port()
        with child(devserver_args(port, db), port) as url:
            pages = (f"{url}/sessions?identifier=conversation_id",
                     f"{url}/session?identifier=conversation_id&value=conv_{runs // 20}",
                     f"{url}/runs")
            timings: list[list[float]] = [[] for _ in pages]
            for _ in range(requests):
                for index, page in enumerate(pages):
                    began = time.perf_counter()
                    with urllib.request.urlopen(page, timeout=10) as resp:
                        resp.read()
                    timings[index].append((time.perf_counter() - began) * 1000)
            medians[runs] = tuple(statistics.median(t) for t in timings)
    small, big = min(sizes), max(sizes)
    rows = []
    for index, name in enumerate(("/sessions?identifier=", "/session?identifier=&value=",
                                  "/runs")):
        for runs in sizes:
            value = medians[runs][index]
            flat = value <= 2 * medians[small][index] or runs == small
            rows.append(Row(f"dashboard {name} at {runs:,} runs", value, "ms median",
                            "<= 20 ms, <= 2 x at 10k" if runs == big else "<= 20 ms",
                            value <= 20 and flat))
    return rows


def fixture_row(rounds: int, tmp: Path) -> Row:
    """Start + stop of the pytest fixture's server, median."""
    from devserver.testing import DevServer, LoopThread

    loop = LoopThread()
    timings = []
    try:
        for i in range(rounds):
            began = time.perf_counter()
            server = DevServer(loop, tmp / f"fixture{i}.sqlite3").start()
            server.stop()
            timings.append((time.perf_counter() - began) * 1000)
    finally:
        loop.close()
    median = statistics.median(timings)
    return Row("pytest fixture start + stop", median, "ms median", "<= 20 ms", median <= 20)


def startup_row(rounds: int, tmp: Path) -> Row:
    """`python -m devserver` to the first healthy /health, and the same for the bare aiohttp
    handler (what importing and starting aiohttp alone costs on this machine).

    With Python's default bytecode cache, as users start it: a start first (not timed) writes
    the cache where `PYTHONDONTWRITEBYTECODE` would have every start compile every module."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def started(args: list[str], port: int) -> float:
        began = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health")
            return time.perf_counter() - began
        finally:
            proc.terminate()
            proc.wait()

    timings, bare = [], []
    for i in range(rounds + 1):
        port = free_port()
        took = started(devserver_args(port, tmp / f"s{i}.sqlite3"), port)
        port = free_port()
        bare_took = started(["devserver.bench.bare", str(port)], port)
        if i:  # the first start writes the bytecode cache
            timings.append(took)
            bare.append(bare_took)
    median = statistics.median(timings)
    return Row("python -m devserver to first healthy /health", median, "s median", "<= 0.5 s",
               median <= 0.5, f"the bare aiohttp handler: {statistics.median(bare):.2f} s")


def memory_rows(total: int, tmp: Path) -> list[Row]:
    """RSS of a server after `total` runs (and after a tenth of them): flat, bounded."""
    batch = Workload(500)
    port = free_port()
    args = devserver_args(port, tmp / "memory.sqlite3", "--app", BENCH_APP)
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    samples: dict[int, float] = {}
    try:
        wait_healthy(url + "/health")
        sent = 0
        checkpoints = sorted({total // 10, total})
        while sent < total:
            request = urllib.request.Request(url + "/e/key", data=batch.body(sent),
                                             method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as resp:
                resp.read()
            sent += 500
            if sent in checkpoints or (sent >= checkpoints[0] and checkpoints[0] not in samples):
                wait_idle(url)
                samples[checkpoints[0] if checkpoints[0] not in samples else total] = \
                    rss_mb(proc.pid)
        wait_idle(url)
        samples[total] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    first = samples[min(samples)]
    last = samples[total]
    return [Row(f"memory: RSS after {total:,} runs", last, "MB", "<= 100 MB, flat",
                last <= 100 and last <= first * 1.5 + 20,
                f"{first:.0f} MB after {min(samples):,}")]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print the rows; exit 1 if one missed (unless --no-fail)."""
    parser = argparse.ArgumentParser(prog="python -m devserver.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="a quick run for CI")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even if a row misses")
    parser.add_argument("--against", metavar="CHECKOUT",
                        help="also measure ingest and end to end against the build in this "
                             "checkout, side by side (before and after a change)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only these rows: ingest, batched, e2e, flow-batch, "
                             "flow-debounce, dashboard, fixture, startup, memory")
    args = parser.parse_args(argv)
    short = args.short
    try:
        other = None if args.against is None else versus.checkout(args.against)
    except ValueError as exc:
        parser.error(str(exc))
    wanted = set(args.only) or ({"versus"} if other is not None else {
        "ingest", "batched", "e2e", "flow-batch", "flow-debounce", "dashboard", "fixture",
        "startup", "memory"})
    if other is not None:
        wanted.add("versus")  # --against alone runs only the comparison
    print(f"devserver benchmarks ({'short' if short else 'full'} run)")
    print(f"machine: {machine()}")
    print(f"load generator: {'wrk' if shutil.which('wrk') else 'built-in aiohttp client'}, "
          f"32 connections; every event a new message id in one of {CONVERSATIONS:,} "
          f"conversations and {USERS} users")
    rows: list[Row] = []
    seconds, rounds = (1.0, 2) if short else (2.0, 7)
    bare_url: list[str] = []
    stack = ExitStack()

    def bare() -> str:
        if not bare_url:
            bare_url.append(stack.enter_context(reference_server("devserver.bench.bare")))
        return bare_url[0]

    steps: list[tuple[str, Callable[[Path], list[Row]]]] = [
        ("versus", lambda tmp: [] if other is None else versus_rows(seconds, rounds, other, tmp)),
        ("ingest", lambda tmp: ingest_rows(seconds, rounds, bare(), tmp)),
        ("batched", lambda tmp: batched_rows(seconds, rounds, tmp)),
        ("e2e", lambda tmp: [e2e_row(seconds, rounds, bare(), tmp)]),
        ("flow-batch", lambda tmp: [flow_row("batch", seconds, rounds, bare(), tmp)]),
        ("flow-debounce", lambda tmp: [flow_row("debounce", seconds, rounds, bare(), tmp)]),
        ("dashboard", lambda tmp: dashboard_rows([10_000, 100_000 if short else 1_000_000],
                                                 tmp, 20 if short else 60)),
        ("fixture", lambda tmp: [fixture_row(10 if short else 30, tmp)]),
        ("startup", lambda tmp: [startup_row(3 if short else 7, tmp)]),
        ("memory", lambda tmp: memory_rows(20_000 if short else 1_000_000, tmp)),
    ]
    with stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="devserver-bench-"))
        for name, step in steps:
            if name not in wanted:
                continue
            found = step(Path(folder))
            rows.extend(found)
            for row in found:
                print(row.line(), flush=True)
    missed = [row for row in rows if not row.ok]
    print(f"{len(rows) - len(missed)} of {len(rows)} rows met their targets")
    return 1 if missed and not args.no_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())

