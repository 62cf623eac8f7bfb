"""Devserver child processes for tests: `python -m devserver ...` with its output captured.

Every child is started on `--port 0`; `wait_banner` reads the banner from stdout to learn the
URL. Waits are for a line on stdout, an HTTP answer or the child's exit, always with a timeout.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import eventually_sync

START_TIMEOUT = 15.0
"""Seconds a child gets to print its banner (imports included, on a slow CI box)."""
RUN_TIMEOUT = 10.0
"""Seconds a run gets to reach a final status."""
EXIT_TIMEOUT = 5.0
"""Seconds a child gets to exit after a signal (SPEC: "within a few seconds")."""
ERROR_TIMEOUT = 15.0
"""Seconds a child that should fail at start gets to exit."""

FINAL_STATUSES = {"Completed", "Failed", "Cancelled"}
URL_LINE = re.compile(r"^\s*dashboard\s+(http://127\.0\.0\.1:(\d+))/sessions\s*$")
ERROR_PREFIX = "devserver: error:"

class Devserver:
    """A `python -m devserver` child: its stdout lines in a queue, its stderr drained."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devserver", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stdout_lines: list[str] = []
        self._stderr_chunks: list[str] = []
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.url = ""
        self.banner: list[str] = []

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in self.proc.stderr:
            self._stderr_chunks.append(chunk)

    def next_line(self, deadline: float) -> str | None:
        """The next stdout line, None at EOF; fails the test at the deadline."""
        remaining = deadline - time.monotonic()
        try:
            line = self._lines.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            pytest.fail(
                f"devserver {self.args} printed nothing new for too long; stdout so far: "
                f"{self.stdout_lines!r}"
            )
        if line is not None:
            self.stdout_lines.append(line)
        return line

    def wait_banner(self, timeout: float = START_TIMEOUT) -> list[str]:
        """Read stdout until the whole banner is in: the URL, the counts and each function."""
        deadline = time.monotonic() + timeout
        expected_functions: int | None = None
        listed = 0
        while True:
            line = self.next_line(deadline)
            if line is None:
                self.proc.wait(timeout=EXIT_TIMEOUT)
                pytest.fail(
                    f"devserver {self.args} exited with {self.proc.returncode} before its "
                    f"banner was complete; stdout: {self.stdout_lines!r}; "
                    f"stderr: {self.stderr()!r}"
                )
            match = URL_LINE.match(line)
            if match:
                self.url = match.group(1)
            counted = re.match(r"^\s*functions\s+(\d+)\s*$", line)
            if counted:
                expected_functions = int(counted.group(1))
            elif expected_functions is not None:
                listed += 1
            if self.url and expected_functions is not None and listed >= expected_functions:
                self.banner = list(self.stdout_lines)
                return self.banner

    def stderr(self) -> str:
        """What the child wrote on stderr (all of it, once the child has exited)."""
        if self.proc.poll() is not None:
            self._threads[1].join(timeout=EXIT_TIMEOUT)
        return "".join(self._stderr_chunks)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        """Send `sig` and wait for the exit code; fails the test if the child does not exit."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"devserver did not exit within {timeout}s of signal {sig}")

    def kill(self) -> None:
        """Make sure the child is gone and its pipes are closed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=EXIT_TIMEOUT)
        for thread in self._threads:
            thread.join(timeout=EXIT_TIMEOUT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    # HTTP ------------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 5.0
    ) -> tuple[int, Any]:
        """One HTTP request to the child; returns (status, parsed JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

    def get(self, path: str, **params: str) -> Any:
        """GET a JSON endpoint that must answer 200."""
        query = urllib.parse.urlencode(params)
        status, body = self.request("GET", f"{path}?{query}" if query else path)
        assert status == 200, (path, params, status, body)
        return body

    def send(self, *events: dict[str, Any]) -> list[str]:
        """POST events to /e/key; returns their ids."""
        status, body = self.request("POST", "/e/key", list(events))
        assert status == 200, body
        assert body["status"] == 200, body
        assert len(body["ids"]) == len(events), body
        return list(body["ids"])

    def wait_session_settled(
        self, identifier: str, value: str, runs: int, timeout: float = RUN_TIMEOUT
    ) -> dict[str, Any]:
        """Poll /api/session until it lists `runs` runs, all in a final status."""
        last: list[Any] = []

        def settled() -> dict[str, Any] | None:
            status, doc = self.request(
                "GET", "/api/session?" + urllib.parse.urlencode(
                    {"identifier": identifier, "value": value})
            )
            last[:] = [status, doc]
            if status == 200 and len(doc["runs"]) == runs and all(
                run["status"] in FINAL_STATUSES for run in doc["runs"]
            ):
                return dict(doc)
            if self.proc.poll() is not None:
                pytest.fail(f"devserver exited with {self.proc.returncode}: {self.stderr()}")
            return None

        return dict(eventually_sync(
            settled, lambda: f"session {identifier}={value} to settle with {runs} runs; "
                             f"last answer: {last[0]} {last[1]!r}", timeout))


Spawn = Callable[..., Devserver]


class Http:
    """A keep-alive HTTP/1.1 client for one server (one per thread): thousands of small
    requests without a new connection each. Reconnects after an error."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str | bytes] | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        """One request; (status, body, headers). Raises OSError / HTTPException on failure."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self._conn.request(method, path, body=body, headers=headers or {})
            resp = self._conn.getresponse()
            data = resp.read()
        except BaseException:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, data, dict(resp.getheaders())

    def get_json(self, path: str, **params: str) -> tuple[int, Any]:
        """GET a JSON endpoint; (status, parsed body)."""
        query = urllib.parse.urlencode(params)
        status, data, _ = self.request("GET", f"{path}?{query}" if query else path)
        return status, json.loads(data)

    def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        """POST a JSON body; (status, parsed body)."""
        status, data, _ = self.request("POST", path, json.dumps(body).encode(),
                                       {"Content-Type": "application/json"})
        return status, json.loads(data)

    def close(self) -> None:
        """Drop the connection (the next request opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def child_env(pythonpath: Path | None = None) -> dict[str, str]:
    """The environment for a child: ours, with PYTHONPATH set (or cleared) as asked."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start devserver children (cwd tmp_path unless told); every one is killed at teardown."""
    children: list[Devserver] = []

    def start(*args: str, cwd: Path | None = None, pythonpath: Path | None = None) -> Devserver:
        child = Devserver(list(args), cwd=cwd or tmp_path, env=child_env(pythonpath))
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


