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
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from devserver.bench import versus
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


def free_port() -> int:
    """A port that was free a moment ago (for children that must be told their port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, timeout: float = 20.0) -> float:
    """Poll `url` until it answers 200; returns the seconds it took."""
    start = time.perf_counter()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{url} did not become healthy in {timeout}s")
        time.sleep(0.002)


@contextmanager
def child(args: list[str], port: int, health: str = "/health", *,
          build: Path | None = None) -> Iterator[str]:
    """`python -m <args>` on `port` (of the checkout `build`, if given); yields its URL."""
    # Its log goes to a file: a pipe no one reads while it runs would stall it once full.
    env = None if build is None else versus.build_env(build)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL,
                                stderr=log, cwd=build, env=env)
        try:
            try:
                wait_healthy(f"http://127.0.0.1:{port}{health}")
            except RuntimeError:
                proc.kill()
                proc.wait()
                log.seek(0)
                raise RuntimeError(f"child {args} failed: {log.read()[-2000:]}") from None
            yield f"http://127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def devserver_args(port: int, db: Path, *extra: str) -> list[str]:
    """Arguments for a devserver child."""
    return ["devserver", "--port", str(port), "--db", str(db), "--no-reload",
            "--log-level", "warning", *extra]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Rows


def alternate(rounds: int, bare: Callable[[], float], ours: Callable[[], float],
              ) -> tuple[float, float, float]:
    """Measure the two sides of a ratio in alternating rounds (bare, ours, bare, ours...), so
    that a noisy neighbour slows both alike; returns the median of each side and the median
    of the rounds' ratios."""
    pairs = [(bare(), ours()) for _ in range(rounds)]
    if os.environ.get("DEVSERVER_BENCH_VERBOSE"):
        print("    rounds (bare, ours): " + ", ".join(f"({b:.0f}, {o:.0f})" for b, o in pairs))
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
                lambda: load(url + "/e/key", workload, seconds, BATCH_CONNECTIONS))
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
        runs = versus.e2e_rate(url, seconds, functools.partial(_run_counts, db),
                               functools.partial(_wait_idle, url))
        bare, rate, ratio = alternate(
            rounds, lambda: load(bare_url + "/e/key", SINGLE, seconds), runs)
        failed = _run_counts(db)[1]
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
                    url, seconds, functools.partial(_run_counts, db),
                    functools.partial(_wait_idle, url)))
            theirs, ours, ratio = alternate(rounds, rates[0], rates[1])
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
            _wait_idle(url)  # then every batch and debounce runs (they count as busy)
            (seen["runs"], seen["failed"]), seen["events"] = _run_counts(db), _event_count(db)
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


def _event_count(db: Path) -> int:
    """Events stored in a server's database, read beside it."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(count)


def _run_counts(db: Path) -> tuple[int, int]:
    """(runs, failed runs) in a server's database, read beside it (WAL allows it)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        total, failed = conn.execute(
            "SELECT count(*), coalesce(sum(status = 'Failed'), 0) FROM runs").fetchone()
    return int(total), int(failed)


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
                _wait_idle(url)
                samples[checkpoints[0] if checkpoints[0] not in samples else total] = \
                    rss_mb(proc.pid)
        _wait_idle(url)
        samples[total] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    first = samples[min(samples)]
    last = samples[total]
    return [Row(f"memory: RSS after {total:,} runs", last, "MB", "<= 100 MB, flat",
                last <= 100 and last <= first * 1.5 + 20,
                f"{first:.0f} MB after {min(samples):,}")]


def _wait_idle(url: str) -> None:
    while True:
        with urllib.request.urlopen(url + "/api/status", timeout=10) as resp:
            if json.loads(resp.read())["busy_runs"] == 0:
                return
        time.sleep(0.05)


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

