"""Graceful shutdown of `python -m devserver` on SIGINT and SIGTERM, with requests in flight and
runs executing: it stops accepting connections, answers (and commits) the requests it already
has, exits 0 within a few seconds, and a restart on the same database finishes every run it
left unfinished, including one whose sync function was stuck in its worker thread."""

from __future__ import annotations

import http.client
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .procs import EXIT_TIMEOUT, FINAL_STATUSES, RUN_TIMEOUT, Devserver, Http, Spawn

pytestmark = pytest.mark.slow  # devserver children stopped by signals

SHUTDOWN_APP = textwrap.dedent(
    """
    import asyncio
    import os
    import time

    import devserver

    app = devserver.App("shut")


    @app.function(trigger="shut/async", retries=0)
    async def slow_async(ctx):
        first = await ctx.step.run("first", lambda: ctx.event.data["n"])
        await asyncio.sleep(0.2)  # between two steps when the signal comes
        return await ctx.step.run("second", lambda: first + 1)


    @app.function(trigger="shut/sync", retries=0)
    def stuck_sync(ctx):
        first = ctx.step.run("first", lambda: ctx.event.data["n"])
        # Stuck in a blocking call until the test releases it (after the restart).
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["RELEASE_FILE"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        return first
    """
)


def start(spawn: Spawn, tmp_path: Path) -> Devserver:
    child = spawn("--port", "0", "--db", str(tmp_path / "shut.sqlite3"), "--app",
                  str(tmp_path / "shut_app.py"), "--no-reload")
    child.wait_banner()
    return child


class Senders:
    """Client threads that send events until told to stop, keeping the acknowledged ids."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.acked: dict[str, dict[str, Any]] = {}
        self.lock = threading.Condition()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(i,), daemon=True)
                        for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _send(self, index: int) -> None:
        conn = Http(self.url, timeout=5.0)
        n = index * 1_000_000
        while not self.stop.is_set():
            n += 1
            name = "shut/sync" if n % 50 == 1 else "shut/async"
            event = {"name": name, "data": {"n": n}, "sessions": {"worker": f"w{index}"}}
            try:
                status, body = conn.post_json("/e/key", [event])
            except (OSError, http.client.HTTPException, ValueError):
                break  # the server is going away: a request it did not answer isn't acked
            if status != 200:
                break
            with self.lock:
                self.acked[body["ids"][0]] = event
                self.lock.notify_all()
        conn.close()

    def wait_acked(self, count: int, timeout: float = RUN_TIMEOUT) -> None:
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.acked) >= count, timeout):
                pytest.fail(f"only {len(self.acked)} events acknowledged in {timeout}s")

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


class SlowPost:
    """One POST whose body trickles in: in flight when the signal comes."""

    def __init__(self, url: str, event: dict[str, Any], chunks: int, pause: float) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.body = __import__("json").dumps([event]).encode()
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        # The Host a client of this server sends (the guard refuses any other with a 403).
        self.sock.sendall(b"POST /e/key HTTP/1.1\r\nHost: %s:%d\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                          % (host.encode(), int(port), len(self.body)))
        self.sent_first = threading.Event()
        self.answer: bytes | None = None
        self.chunks, self.pause = chunks, pause
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        size = -(-len(self.body) // self.chunks)
        try:
            for i in range(0, len(self.body), size):
                self.sock.sendall(self.body[i:i + size])
                self.sent_first.set()
                time.sleep(self.pause)  # pacing a slow client, not synchronising
            answer = b""
            while chunk := self.sock.recv(65536):
                answer += chunk
            self.answer = answer
        except OSError:
            self.answer = b""
        finally:
            self.sent_first.set()
            self.sock.close()

    def status(self) -> int | None:
        self.thread.join(timeout=10)
        if not self.answer:
            return None
        return int(self.answer.split(b" ", 2)[1])


def refused(url: str) -> bool:
    """Whether a new connection is refused (a timeout or reset means: not yet)."""
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        pass
    time.sleep(0.01)  # poll interval: don't fill the listen backlog with probes
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_under_load_stops_cleanly_and_a_restart_finishes_every_run(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals,
) -> None:
    release = tmp_path / "release"
    monkeypatch.setenv("RELEASE_FILE", str(release))
    (tmp_path / "shut_app.py").write_text(SHUTDOWN_APP)
    server = start(spawn, tmp_path)
    senders = Senders(server.url, 3)
    try:
        senders.wait_acked(150)
        http = Http(server.url)
        deadline = time.monotonic() + RUN_TIMEOUT
        while not http.get_json("/api/runs", function_id="shut-stuck-sync",
                                status="Running")[1]["runs"]:
            assert time.monotonic() < deadline, "no sync run got stuck"
            time.sleep(0.02)  # poll interval
        http.close()
        slow = SlowPost(server.url, {"name": "shut/async", "data": {"n": -1},
                                     "sessions": {"worker": "slow"}}, chunks=4, pause=0.25)
        assert slow.sent_first.wait(5)

        signalled = time.monotonic()
        server.proc.send_signal(sig)
        # It stops accepting at once, while it still finishes the request it has.
        while not refused(server.url):
            assert server.proc.poll() is None, "exited before it stopped accepting"
            assert time.monotonic() - signalled < EXIT_TIMEOUT, "still accepting connections"
        code = server.proc.wait(timeout=EXIT_TIMEOUT)
        took = time.monotonic() - signalled
    finally:
        senders.finish()
    assert code == 0, server.stderr()
    assert took < EXIT_TIMEOUT
    slow_status = slow.status()
    assert slow_status in (200, None), slow.answer  # answered, or cut off: never an error
    assert "left behind" in server.stderr()  # the stuck sync function did not hold the exit
    server.kill()

    release.write_text("go")
    restarted = start(spawn, tmp_path)
    http = Http(restarted.url)
    for event_id, sent in senders.acked.items():
        status, stored = http.get_json(f"/v1/events/{event_id}")
        assert status == 200, f"acknowledged event {event_id} was lost: {stored}"
        assert stored["data"]["data"] == sent["data"]
    # Answered, it is stored; cut off (its body was still arriving), nothing of it is.
    slow_stored = http.get_json("/api/session", identifier="worker", value="slow")[0]
    assert slow_stored == (200 if slow_status == 200 else 404)

    deadline = time.monotonic() + 3 * RUN_TIMEOUT
    while True:
        runs = [run for status in ("Queued", "Running")
                for run in http.get_json("/api/runs", status=status, limit="500")[1]["runs"]]
        if not runs:
            break
        assert time.monotonic() < deadline, f"runs never finished after the restart: {runs[:3]}"
        time.sleep(0.05)  # poll interval
    for event_id, sent in senders.acked.items():
        status, doc = http.get_json(f"/v1/events/{event_id}/runs")
        assert [run["status"] for run in doc["data"]] == ["Completed"], (sent, doc)
        run = doc["data"][0]
        n = sent["data"]["n"]
        assert run["output"] == (n if sent["name"] == "shut/sync" else n + 1)
        assert run["status"] in FINAL_STATUSES
    http.close()
    assert restarted.stop() == 0
