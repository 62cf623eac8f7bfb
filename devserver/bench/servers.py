"""The servers the benchmark rows measure: child processes of `python -m ...` (devserver, the
bare handler, another build's devserver) on ports of their own, and what is read beside them
(their health, memory, and the runs and events in their databases).
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from devserver.bench import versus


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


def event_count(db: Path) -> int:
    """Events stored in a server's database, read beside it."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(count)


def run_counts(db: Path) -> tuple[int, int]:
    """(runs, failed runs) in a server's database, read beside it (WAL allows it)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        total, failed = conn.execute(
            "SELECT count(*), coalesce(sum(status = 'Failed'), 0) FROM runs").fetchone()
    return int(total), int(failed)


def wait_idle(url: str) -> None:
    """Poll a devserver until it has no run left to do."""
    while True:
        with urllib.request.urlopen(url + "/api/status", timeout=10) as resp:
            if json.loads(resp.read())["busy_runs"] == 0:
                return
        time.sleep(0.05)
