"""A real Inngest TypeScript SDK app (`inngest@4` from the npm registry, served by Node's http
server on 127.0.0.1) against a real devserver: syncing and re-syncing after a restart, steps,
parallel steps, sleeps, waits, invokes, retries to failure, onFailure, cancelOn, events sent
with `inngest.send` and `meta.sessions`, and the dashboard figures.

The test setup installs `inngest@4` with npm once into a cache directory
(`~/.cache/devserver-tests/npm`, or `$DEVSERVER_TEST_NPM_DIR`) and reuses it. Node 20+ and npm
are required: without them these tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any, Self

import aiohttp
import pytest
from aiohttp import web

from devserver.clock import VirtualClock
from devserver.ids import ulid_time_ms
from devserver.web.server import Server

from .helpers import (
    attempts,
    eventually,
    free_port,
    get,
    idle,
    run_doc,
    runs_of_event,
    runs_of_function,
    sdk_server,
    the_run,
    waiting_step,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.slow,
              pytest.mark.timeout(300)]  # the first npm install
APP_SCRIPT = Path(__file__).with_name("sdk_ts_app.cjs")
NPM_SPEC = "inngest@4"
NPM_DIR = Path(os.environ.get("DEVSERVER_TEST_NPM_DIR")
               or Path.home() / ".cache" / "devserver-tests" / "npm") / "inngest-4"
INSTALL_TIMEOUT = 280.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: the TypeScript SDK tests need Node.js 20+ and "
                    "npm (https://nodejs.org/)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """`inngest@4` installed from the npm registry (once; cached across runs)."""
    node = _tool("node")
    npm = _tool("npm")
    major = subprocess.run([node, "--version"], capture_output=True, text=True,
                           check=True).stdout.strip().lstrip("v").split(".")[0]
    if int(major) < 20:
        pytest.fail(f"inngest@4 needs Node.js 20 or newer, found {major}", pytrace=False)
    installed = NPM_DIR / "node_modules" / "inngest" / "package.json"
    NPM_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(NPM_DIR.parent / "inngest-4.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time across test processes
        if not installed.exists():
            staging = NPM_DIR.with_name(f"inngest-4.tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            (staging / "package.json").write_text('{"private": true}\n')
            done = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", NPM_SPEC],
                cwd=staging, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
            if done.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                pytest.fail(f"npm install {NPM_SPEC} failed:\n{done.stdout}\n{done.stderr}",
                            pytrace=False)
            shutil.rmtree(NPM_DIR, ignore_errors=True)
            staging.rename(NPM_DIR)
    version = json.loads(installed.read_text())["version"]
    assert version.startswith("4."), version
    return NPM_DIR / "node_modules"


class NodeApp:
    """The test app in a Node process, its output in a log file."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/inngest"

    @classmethod
    async def start(cls, node_modules: Path, server_url: str, log: Path, *, port: int = 0,
                    version: str = "1", script: Path = APP_SCRIPT) -> Self:
        """Start `script` (the test app, or another) knowing the server at `server_url`."""
        port = port or free_port()
        env = {**os.environ, "NODE_PATH": str(node_modules), "DEVSERVER_URL": server_url,
               "PORT": str(port), "APP_VERSION": version, "NODE_ENV": "development"}
        for name in ("INNGEST_DEV", "INNGEST_BASE_URL", "INNGEST_EVENT_KEY",
                     "INNGEST_SIGNING_KEY"):
            env.pop(name, None)
        out = _append(log)
        try:
            proc = await asyncio.create_subprocess_exec(
                _tool("node"), str(script), env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        app = cls(proc, port, log)

        async def listening() -> bool:
            if proc.returncode is not None:
                pytest.fail(f"the node app exited with {proc.returncode}:\n{app.output()}")
            return f"listening on {port}" in app.output()
        await eventually(listening, f"the node app to listen on {port}")
        return app

    def output(self) -> str:
        """What the node app printed so far."""
        return self.log.read_text(errors="replace")

    async def send(self, http: aiohttp.ClientSession, events: Any) -> list[str]:
        """Send with the SDK's `inngest.send()` (meta.sessions, status check, id seed)."""
        async with http.post(f"http://127.0.0.1:{self.port}/send", json=events) as resp:
            text = await resp.text()
            assert resp.status == 200, text
            return list(json.loads(text)["ids"])

    async def calls(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """What each call to the Inngest endpoint carried (see sdk_ts_app.cjs)."""
        async with http.get(f"http://127.0.0.1:{self.port}/calls") as resp:
            assert resp.status == 200
            return list(await resp.json())

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _append(path: Path) -> IO[str]:
    return open(path, "a")  # handed to the child process; the caller closes it


@contextlib.asynccontextmanager
async def node_app(node_modules: Path, server: Server, tmp_path: Path, *, sync: bool = True,
                   port: int = 0, version: str = "1") -> AsyncIterator[NodeApp]:
    app = await NodeApp.start(node_modules, server.url, tmp_path / "node.log", port=port,
                              version=version)
    try:
        if sync:
            result = await server.sdk.sync(app.url)
            assert result.ok, (result, app.output())
        yield app
    finally:
        await app.stop()


@pytest.fixture
def log_on_failure(tmp_path: Path) -> Iterator[None]:
    """Print the node app's output when a test fails (pytest shows captured output)."""
    yield
    log = tmp_path / "node.log"
    if log.exists():
        print(f"--- node app output ---\n{log.read_text()[-20_000:]}")


async def test_sync_steps_parallel_steps_sleep_and_sessions_from_meta(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    clock = VirtualClock()
    async with sdk_server(tmp_path, clock=clock) as server, \
            node_app(node_modules, server, tmp_path) as app:
        functions = {fn["id"]: fn for fn in (await get(http, server, "/api/functions"))
                     ["functions"]}
        assert {"shop-checkout", "shop-ship-failure", "shop-refund-request"} <= set(functions)
        assert functions["shop-checkout"]["retries"] == 2
        assert functions["shop-refund-request"]["triggers"] == [
            {"event": "shop/refund.requested", "expression": "event.data.amount > 0"}]
        [listed] = (await get(http, server, "/api/apps"))["apps"]
        assert (listed["id"], listed["sdk"]) == ("shop", "js:v" + json.loads(
            (node_modules / "inngest" / "package.json").read_text())["version"])

        start = clock.now_ms()
        [event_id] = await app.send(http, {
            "name": "shop/order.placed", "data": {"items": [10, 20]},
            "meta": {"sessions": {"conversation_id": 42, "tenant": "acme/east"}}})
        assert abs(ulid_time_ms(event_id) - start) < 60_000  # the SDK's seeded id
        await idle(server)
        run = await the_run(http, server, event_id)
        assert run["status"] == "Completed", run
        assert run["output"] == {"total": 30, "doubled": 60, "tax": 3, "shipping": 5}
        assert run["sessions"] == {"conversation_id": "42", "tenant": "acme/east"}
        steps = [(s["step_id"], s["kind"], s["status"]) for s in run["steps"]]
        assert steps[:3] == [("price", "run", "Completed"), ("price:1", "run", "Completed"),
                             ("cool-off", "sleep", "Completed")]
        assert sorted(steps[3:5]) == [("shipping", "run", "Completed"),
                                      ("tax", "run", "Completed")]
        assert steps[5] == ("receipt", "run", "Completed")
        assert run["steps"][2]["duration_ms"] == 3_600_000
        assert clock.now_ms() - start >= 3_600_000

        # step.sendEvent propagated the run's sessions to the event it sent.
        [receipt] = await runs_of_function(http, server, "shop-receipt")
        assert receipt["status"] == "Completed"
        receipt_run = await run_doc(http, server, receipt["run_id"])
        assert receipt_run["output"] == {"mailed": 30}
        assert receipt_run["sessions"] == {"conversation_id": "42", "tenant": "acme/east"}

        doc = await get(http, server, "/api/session", identifier="conversation_id", value="42")
        assert (doc["stats"]["runs"], doc["stats"]["failed_runs"]) == (2, 0)
        assert doc["stats"]["functions"] == ["shop-checkout", "shop-receipt"]
        values = (await get(http, server, "/api/sessions", identifier="tenant"))["sessions"]
        assert [v["value"] for v in values] == ["acme/east"]
        # The dashboard's pages show SDK runs like local ones.
        async with http.get(f"{server.url}/runs/{run['run_id']}") as resp:
            page = await resp.text()
            assert resp.status == 200
        assert all(text in page for text in ("shop-checkout", "price:1", "cool-off", "tax"))
        async with http.get(f"{server.url}/session", params={
                "identifier": "conversation_id", "value": "42"}) as resp:
            page = await resp.text()
            assert resp.status == 200
        assert "shop-receipt" in page
        assert run["run_id"] in page


async def test_retries_to_success_and_to_failure_on_failure_and_figures(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        meta = {"sessions": {"customer": "c_7"}}
        charge_id, ship_id, strict_id, bundle_id = await app.send(http, [
            {"name": "shop/charge", "meta": meta}, {"name": "shop/ship", "meta": meta},
            {"name": "shop/strict", "meta": meta}, {"name": "shop/bundle"}])
        await idle(server)

        # Parallel steps: one fails on every attempt, the other succeeds; the failing one
        # still gets exactly its attempts, then the run fails.
        bundle = await the_run(http, server, bundle_id)
        assert bundle["status"] == "Failed"
        assert attempts(bundle, "pack") == [(0, "Failed"), (1, "Failed")]
        assert attempts(bundle, "label") == [(0, "Completed")]
        assert bundle["error"]["message"] == "no boxes left"

        charge = await the_run(http, server, charge_id)
        assert (charge["status"], charge["output"]) == ("Completed", "charged")
        assert attempts(charge, "charge-card") == [(0, "Failed"), (1, "Failed"),
                                                   (2, "Completed")]
        assert charge["steps"][0]["error"]["message"] == "card declined (1)"
        assert "sdk_ts_app.cjs" in charge["steps"][0]["error"]["stack"]

        ship = await the_run(http, server, ship_id)
        assert ship["status"] == "Failed"
        assert attempts(ship, "call-carrier") == [(0, "Failed"), (1, "Failed")]
        assert ship["error"]["message"] == "carrier API is down"
        [handler] = await runs_of_function(http, server, "shop-ship-failure")
        assert (await run_doc(http, server, handler["run_id"]))["output"] == {
            "handled": "carrier API is down"}

        strict = await the_run(http, server, strict_id)
        assert strict["status"] == "Failed"
        assert attempts(strict, None) == [(0, "Failed")]  # no retries for NonRetriableError
        assert strict["error"]["message"] == "this order can never be processed"

        v1 = (await get(http, server, f"/v1/runs/{ship['run_id']}"))["data"]
        assert (v1["status"], v1["output"]["message"]) == ("Failed", "carrier API is down")
        stats = (await get(http, server, "/api/session", identifier="customer",
                           value="c_7"))["stats"]
        assert (stats["runs"], stats["failed_runs"]) == (4, 2)
        assert stats["failure_rate"] == pytest.approx(0.5)
        assert stats["functions"] == ["shop-charge", "shop-ship", "shop-ship-failure",
                                      "shop-strict"]


async def test_retry_after_wait_for_event_invoke_timeout_and_cancel_on(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    clock = VirtualClock()
    async with sdk_server(tmp_path, clock=clock) as server, \
            node_app(node_modules, server, tmp_path) as app:
        later_id, approved_id, skipped_id, unanswered_id, hold_id = await app.send(http, [
            {"name": "shop/later"},
            {"name": "shop/refund.requested", "data": {"refund_id": "r1", "amount": 3}},
            {"name": "shop/refund.requested", "data": {"refund_id": "r0", "amount": 0}},
            {"name": "shop/refund.requested", "data": {"refund_id": "r2", "amount": 4}},
            {"name": "shop/hold", "data": {"order_id": "o1"}},
        ])
        assert await runs_of_event(http, server, skipped_id) == []  # the trigger's `if`
        approved = (await runs_of_event(http, server, approved_id))[0]["run_id"]
        unanswered = (await runs_of_event(http, server, unanswered_id))[0]["run_id"]
        hold = (await runs_of_event(http, server, hold_id))[0]["run_id"]
        await waiting_step(http, server, approved, "approval")
        await waiting_step(http, server, unanswered, "approval")
        await waiting_step(http, server, hold, "hold")
        await app.send(http, [
            {"name": "shop/refund.approved", "data": {"refund_id": "zz", "amount": 9}},
            {"name": "shop/refund.approved", "data": {"refund_id": "r1", "amount": 3}},
            {"name": "shop/hold.released", "data": {"order_id": "o1"}},
        ])

        async def finished(run_id: str) -> bool:
            return (await run_doc(http, server, run_id))["status"] != "Running"
        await eventually(lambda: finished(approved), "the approved refund to finish")
        await eventually(lambda: finished(hold), "the hold to be cancelled")
        run = await run_doc(http, server, approved)
        assert (run["status"], run["output"]) == ("Completed", {"approved": True, "cents": 300})
        wait = next(s for s in run["steps"] if s["step_id"] == "approval")
        assert wait["output"]["data"] == {"refund_id": "r1", "amount": 3}
        assert next(s for s in run["steps"] if s["step_id"] == "refund")["output"] == 300
        [child] = await runs_of_function(http, server, "shop-refund")
        assert (child["event_name"], child["status"]) == ("inngest/function.invoked",
                                                          "Completed")
        assert (await run_doc(http, server, hold))["status"] == "Cancelled"

        await idle(server)  # r2 is never approved: its hour passes on the virtual clock
        assert (await run_doc(http, server, unanswered))["output"] == {"approved": False}
        later = await the_run(http, server, later_id)
        assert (later["status"], later["output"]) == ("Completed", 1)
        [first] = [s for s in later["steps"] if s["step_id"] is None]
        assert first["error"]["message"] == "rate limited"


async def test_an_app_that_restarts_with_new_code_is_resynced(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/inngest"
    async with sdk_server(tmp_path, sdk_urls=[url], poll_interval=0.1) as server:
        async def function_ids() -> set[str]:
            return {fn["id"] for fn in (await get(http, server, "/api/functions"))["functions"]}

        async with node_app(node_modules, server, tmp_path, sync=False, port=port):
            async def has(fn_id: str) -> bool:
                return fn_id in await function_ids()
            await eventually(lambda: has("shop-strict"), "version 1 to be synced")
        # The app is down: its functions stay registered, the sync says why it failed.
        async def unreachable() -> bool:
            urls = (await get(http, server, "/api/apps"))["urls"]
            return any(u["error"] and "could not reach" in u["error"] for u in urls)
        await eventually(unreachable, "the failed sync to show")
        assert "shop-strict" in await function_ids()

        async with node_app(node_modules, server, tmp_path, sync=False, port=port,
                            version="2") as app:
            async def replaced() -> bool:
                ids = await function_ids()
                return "shop-added" in ids and "shop-strict" not in ids
            await eventually(replaced, "version 2 to replace version 1")
            # 30 functions and the onFailure handlers of ship and coded
            assert len(await function_ids()) == 32
            [event_id] = await app.send(http, {"name": "shop/added"})
            await idle(server)
            assert (await the_run(http, server, event_id))["output"] == "new in version 2"
            [state] = (await get(http, server, "/api/apps"))["apps"]
            assert "shop-added" in state["functions"]


async def test_a_run_waiting_in_an_sdk_function_survives_a_devserver_restart(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    port = free_port()  # the same URL for both servers: the app knows only that one
    db = tmp_path / "kept"
    db.mkdir()
    async with sdk_server(db, port=port) as server:
        app = await NodeApp.start(node_modules, server.url, tmp_path / "node.log")
        try:
            assert (await server.sdk.sync(app.url)).ok
            [hold_id] = await app.send(http, {"name": "shop/hold", "data": {"order_id": "o9"}})
            run_id = (await runs_of_event(http, server, hold_id))[0]["run_id"]
            await waiting_step(http, server, run_id, "hold")
        except BaseException:
            await app.stop()
            raise
    try:
        # A new server on the same database: the run waits until the app registers again
        # (synced at start), then its day-long sleep passes on the virtual clock.
        async with sdk_server(db, port=port, sdk_urls=[app.url]) as server:
            await server.sdk.wait_synced()
            await idle(server)
            run = await run_doc(http, server, run_id)
            assert (run["status"], run["output"]) == ("Completed", "held a day")
            assert [(s["step_id"], s["status"]) for s in run["steps"]] == [
                ("hold", "Completed")]
    finally:
        await app.stop()


async def test_errors_verbatim_non_retriable_steps_call_data_and_invoke(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        coded_id, no_retry_id, call_id, invoker_id, caused_id = await app.send(http, [
            {"name": "shop/coded", "data": {"order": 1}}, {"name": "shop/step-no-retry"},
            {"name": "shop/call-data"}, {"name": "shop/invoker"}, {"name": "shop/caused"}])
        await idle(server)

        # The error body the SDK sent, its own `code` too, as the run's error everywhere.
        coded = await the_run(http, server, coded_id)
        assert coded["status"] == "Failed"
        error = coded["error"]
        assert (error["name"], error["message"], error["code"]) == (
            "CodedError", "a coded failure", "E_CODED")
        assert "sdk_ts_app.cjs" in error["stack"]
        v1 = (await get(http, server, f"/v1/runs/{coded['run_id']}"))["data"]
        assert v1["output"] == error
        # onFailure got Inngest's function.failed event: the trigger with its real id and
        # the error in Inngest's shape.
        [handler] = await runs_of_function(http, server, "shop-coded-failure")
        failed = (await run_doc(http, server, handler["run_id"]))["output"]["failed"]
        assert failed["event"]["id"] == coded_id
        assert failed["event"]["data"] == {"order": 1}
        assert failed["error"] == {"error": "invalid status code: 400", "name": "CodedError",
                                   "message": "a coded failure", "stack": error["stack"]}

        # A step's NonRetriableError: its 3 retries are not used, and the SDK raises its
        # error in the function at once.
        no_retry = await the_run(http, server, no_retry_id)
        assert attempts(no_retry, "never") == [(0, "Failed")]
        assert no_retry["output"]["message"] == "this step never works"

        call = await the_run(http, server, call_id)
        step, fn = call["output"]["step"], call["output"]["fn"]
        assert step["requestId"]
        assert fn["requestId"]
        assert step["requestId"] != fn["requestId"]  # one per call
        assert step["jobId"] == fn["jobId"] == f"{call['run_id']}:step"

        # The memo of a failed step gives the error back as the SDK sent it: its nested
        # `cause` reaches the StepError the function catches.
        caused = await the_run(http, server, caused_id)
        assert caused["output"] == {"name": "Error", "message": "outer failure",
                                    "cause": "inner failure"}
        stored = caused["steps"][0]["error"]
        assert (stored["cause"]["name"], stored["cause"]["code"]) == ("CodedError", "E_CODED")

        invoked = await the_run(http, server, invoker_id)
        assert invoked["status"] == "Completed", invoked
        seen = invoked["output"]["seen"]
        assert seen["total"] == 7
        assert seen["_inngest"]["fn_id"] == "shop-echo"
        assert seen["_inngest"]["correlation_id"].startswith(f"{invoked['run_id']}.")
        assert invoked["output"]["timeout"] == [
            "InngestInvokeTimeoutError", "Timed out waiting for invoked function to complete"]
        # An invoke of a function no app registered fails its step at once, with the error
        # Inngest resolves it with (no stack), which the SDK raises as it is.
        missing = "could not find function with ID: shop-nobody"
        assert invoked["output"]["missing"] == ["Error", missing]
        assert attempts(invoked, "nobody") == [(0, "Failed")]
        [nobody] = [s for s in invoked["steps"] if s["step_id"] == "nobody"]
        assert nobody["error"] == {"name": "Error", "message": missing}


async def test_metadata_the_sdk_attaches_to_a_run_and_a_step_is_in_the_run_document(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        [event_id] = await app.send(http, {"name": "shop/call-data"})
        await idle(server)
        run_id = (await the_run(http, server, event_id))["run_id"]

        async def attach(body: dict[str, Any]) -> None:
            async with http.post(f"http://127.0.0.1:{app.port}/metadata", json=body) as resp:
                assert resp.status == 200, await resp.text()
        await attach({"runId": run_id, "values": {"progress": 0.5}, "kind": "progress"})
        await attach({"runId": run_id, "stepId": "first", "values": {"rows": 3}})
        assert (await run_doc(http, server, run_id))["metadata"] == [
            {"scope": "run", "step_id": None, "step_attempt": None,
             "kind": "userland.progress", "op": "set", "values": {"progress": 0.5}},
            {"scope": "step", "step_id": "first", "step_attempt": None,
             "kind": "userland.default", "op": "set", "values": {"rows": 3}}]

        # step.metadata() inside a run ships with the step's opcode instead.
        [measured_id] = await app.send(http, {"name": "shop/measured"})
        await idle(server)
        measured = await the_run(http, server, measured_id)
        assert measured["output"] == "measured"
        assert measured["metadata"] == [
            {"scope": "run", "step_id": None, "step_attempt": None, "kind": "userland.stats",
             "op": "set", "values": {"rows": 5}}]

        # An unknown run: the SDK's call fails, saying why.
        async with http.post(f"http://127.0.0.1:{app.port}/metadata", json={
                "runId": "01J0000000000000000000000Z", "values": {"a": 1}}) as resp:
            assert resp.status == 500
            assert "no run with id" in await resp.text()


async def test_step_ai_infer_is_requested_by_the_server_and_its_answer_is_the_steps_data(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    """AIGateway: devserver makes the request the opcode describes (here to a local mock of
    the model's API) and memoizes the answer as the step's data."""
    seen: list[tuple[str, dict[str, str], Any]] = []
    answers = [web.json_response({"choices": [{"message": {"content": "forty-two"}}]}),
               web.json_response({"error": {"message": "overloaded"}}, status=503),
               web.json_response({"error": {"message": "overloaded"}}, status=503)]

    async def model(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.headers), await request.json()))
        return answers[min(len(seen), len(answers)) - 1]

    mock = web.Application()
    mock.router.add_post("/v1/chat/completions", model)
    runner = web.AppRunner(mock)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}/v1/"
    try:
        async with sdk_server(tmp_path) as server, \
                node_app(node_modules, server, tmp_path) as app:
            [ok_id] = await app.send(http, {"name": "shop/ask",
                                            "data": {"baseUrl": base, "question": "why?"}})
            await idle(server)
            run = await the_run(http, server, ok_id)
            assert (run["status"], run["output"]) == (
                "Completed", {"choices": [{"message": {"content": "forty-two"}}]})
            [(path, headers, body)] = seen
            assert path == "/v1/chat/completions"
            assert headers["Authorization"] == "Bearer sk-test"
            assert body == {"model": "gpt-test",
                            "messages": [{"role": "user", "content": "why?"}]}
            assert [(s["step_id"], s["status"]) for s in run["steps"]] == [
                ("ask-model", "Completed")]

            # The model fails: a step error, retried with the step's attempts, then raised.
            [bad_id] = await app.send(http, {"name": "shop/ask",
                                             "data": {"baseUrl": base, "question": "again?"}})
            await idle(server)
            failed = await the_run(http, server, bad_id)
            assert failed["status"] == "Failed"
            assert attempts(failed, "ask-model") == [(0, "Failed"), (1, "Failed")]
            error = failed["steps"][0]["error"]
            assert error["name"] == "Error making AI request: unsuccessful status code: 503"
            assert "overloaded" in error["message"]
            assert len(seen) == 3
    finally:
        await runner.cleanup()


async def test_a_deferred_run_starts_when_the_run_that_deferred_it_ends(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    """DeferAdd / DeferAbort (`defer()` of `createDefer` functions): recorded with the run,
    told back to the SDK as `defers`, and started by an inngest/deferred.schedule event when
    the run ends; an aborted one never starts."""
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        [event_id] = await app.send(http, {"name": "shop/deferring",
                                           "meta": {"sessions": {"customer": "c_9"}}})
        await idle(server)
        run = await the_run(http, server, event_id)
        assert (run["status"], run["output"]) == ("Completed", 7)
        defers = {s["step_id"]: s["output"] for s in run["steps"] if s["kind"] == "defer"}
        assert defers["score-it"]["aborted"] is False
        assert defers["drop-it"]["aborted"] is True  # the latest record of it
        [scored] = await runs_of_function(http, server, "shop-scorer")
        scorer = await run_doc(http, server, scored["run_id"])
        assert scorer["status"] == "Completed", scorer
        assert scorer["output"] == {"got": {"points": 3}, "parents": [
            {"fnSlug": "shop-deferring", "runId": run["run_id"]}]}
        assert scorer["events"][0]["name"] == "inngest/deferred.schedule"
        assert scorer["sessions"] == {"customer": "c_9"}
        assert scorer["events"][0]["internal_id"] in run["emitted_events"]


async def test_batch_events_reach_the_sdk_with_the_sessions_they_share(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    async with sdk_server(tmp_path) as server, \
            node_app(node_modules, server, tmp_path) as app:
        ids = await app.send(http, [
            {"name": "shop/viewed", "data": {"page": p},
             "meta": {"sessions": {"conversation_id": "c1", "user": u}}}
            for p, u in [("a", "u1"), ("b", "u2"), ("c", "u1"), ("d", "u1")]])
        await idle(server)  # the 10 minute timeout of the last batch passes at once
        runs = [await run_doc(http, server, r["run_id"])
                for r in reversed(await runs_of_function(http, server, "shop-batched"))]
        assert [r["status"] for r in runs] == ["Completed", "Completed"]
        # ctx.sessions: what the batch's events agree on, as the SDK computes it from them.
        assert runs[0]["output"] == {"first": "a", "pages": ["a", "b", "c"],
                                     "sessions": {"conversation_id": "c1"}}
        assert runs[1]["output"] == {"first": "d", "pages": ["d"],
                                     "sessions": {"conversation_id": "c1", "user": "u1"}}
        assert runs[0]["sessions"] == {"conversation_id": "c1"}
        assert [e["internal_id"] for e in runs[0]["events"]] == ids[:3]
        # The batched run counts once in every session any of its events carries.
        figures = {}
        for ident, value in [("conversation_id", "c1"), ("user", "u1"), ("user", "u2")]:
            doc = await get(http, server, "/api/session", identifier=ident, value=value)
            figures[value] = doc["stats"]["runs"]
        assert figures == {"c1": 2, "u1": 2, "u2": 1}
        outcome = (await get(http, server, f"/api/events/{ids[1]}"))["flow"]
        assert [(o["action"], o["run_id"]) for o in outcome] == [("batched", runs[0]["run_id"])]


def _hash(step_id: str) -> str:
    return hashlib.sha1(step_id.encode()).hexdigest()


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "plain"])
async def test_planned_steps_run_at_once_each_with_the_memo_of_their_planning(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
    checkpointing: bool,
) -> None:
    # Each of the three parts waits at a barrier that opens only once all three have begun:
    # called one after another, the first would time out and the run would fail.
    name = "fan-out" if checkpointing else "fan-out-plain"
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        [event_id] = await app.send(http, {"name": f"shop/{name}", "data": {"key": "k1"}})
        await idle(server)
        run = await the_run(http, server, event_id)
        assert run["status"] == "Completed", run
        assert run["output"]["joined"] == "abc"
        steps = [(s["step_id"], s["status"]) for s in run["steps"]]
        assert sorted(steps[:3]) == [("part-a", "Completed"), ("part-b", "Completed"),
                                     ("part-c", "Completed")]
        assert steps[3] == ("join", "Completed")

        calls = [c for c in await app.calls(http) if c["fnId"] == f"shop-{name}"]
        parts = {_hash(f"part-{p}") for p in "abc"}
        discovery, *planned, after = calls[:5]
        assert (discovery["stepId"], discovery["disable"], discovery["steps"]) == (
            "step", False, [])
        # One call per planned step, at once, none seeing the others' results.
        assert {c["stepId"] for c in planned} == parts
        assert len(planned) == 3
        assert all(c["disable"] is True and c["steps"] == [] for c in planned)
        # The discovery after the group: every part memoized, immediate execution allowed.
        assert (after["stepId"], after["disable"], set(after["steps"])) == ("step", False, parts)
        if checkpointing:  # "join" ran and was checkpointed within that call, which finished
            assert len(calls) == 5
        else:  # "join" ran in that call and was answered with 206; one more call finishes
            [last] = calls[5:]
            assert (last["stepId"], set(last["steps"])) == ("step", {*parts, _hash("join")})
        assert all(c["ctxFnId"] and c["useApi"] is False for c in calls)


async def test_a_group_that_ends_with_its_sleep_keeps_planning_until_the_next_step_is_done(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    # As Inngest's ForceStepPlan: a group's step result that ends the group lets the SDK run
    # steps at once again, but a group that ends when its sleep ends does not, and the flag
    # outlives the pause (the run's next invocation).
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        [event_id] = await app.send(http, {"name": "shop/napping-group"})
        await idle(server)
        run = await the_run(http, server, event_id)
        assert (run["status"], run["output"]) == ("Completed", "worked, then napped"), run
        calls = [(c["stepId"], c["disable"], set(c["steps"]))
                 for c in await app.calls(http) if c["fnId"] == "shop-napping-group"]
        work, nap, after = _hash("work"), _hash("nap"), _hash("after-nap")
        assert calls == [
            ("step", False, set()),  # plans the group: "work" and the sleep
            (work, True, set()),  # "work" on its own; the sleep still pending
            ("step", True, {work, nap}),  # the sleep is over: "after-nap" is planned...
            (after, True, {work, nap}),  # ... and run on its own
            ("step", False, {work, nap, after}),  # a step ended the group: back to normal
        ]


async def test_race_mode_goes_on_as_soon_as_the_first_branch_is_done(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    # "slow" passes its barrier only once "after-race" (after the race) has begun: without
    # race mode the function would wait for "slow" and "slow" would time out.
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        [event_id] = await app.send(http, {"name": "shop/race", "data": {"key": "r1"}})
        await idle(server)
        run = await the_run(http, server, event_id)
        assert run["status"] == "Completed", run
        assert run["output"] == {"winner": "fast", "after": "after fast"}
        done = {s["step_id"]: s for s in run["steps"]}
        assert done["fast"]["status"] == done["after-race"]["status"] == "Completed"
        # "slow" overlapped "after-race": it ended after "after-race" began.
        assert done["slow"]["ended_at"] >= done["after-race"]["started_at"]


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "plain"])
async def test_steps_in_a_row_checkpointed_within_one_call_or_answered_one_by_one(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
    checkpointing: bool,
) -> None:
    name = "in-a-row" if checkpointing else "in-a-row-plain"
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        [event_id] = await app.send(http, {"name": f"shop/{name}"})
        await idle(server)
        run = await the_run(http, server, event_id)
        assert (run["status"], run["output"]) == ("Completed", "abc"), run
        assert [(s["step_id"], s["status"], s["output"]) for s in run["steps"]] == [
            ("a", "Completed", "a"), ("b", "Completed", "ab"), ("c", "Completed", "abc")]
        calls = [c for c in await app.calls(http) if c["fnId"] == f"shop-{name}"]
        assert all(c["stepId"] == "step" and c["ctxFnId"] for c in calls)
        # Checkpointing: one call ran all three (each step committed through
        # /v1/checkpoint/{run}/async as it ended); else one call per step, and one to end.
        assert len(calls) == (1 if checkpointing else 4)


async def test_a_checkpointed_step_survives_a_devserver_restart_mid_call(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    port = free_port()  # the same URL for both servers: the app knows only that one
    db = tmp_path / "kept"
    db.mkdir()
    app = None
    try:
        async with sdk_server(db, port=port) as server:
            app = await NodeApp.start(node_modules, server.url, tmp_path / "node.log")
            assert (await server.sdk.sync(app.url)).ok
            [event_id] = await app.send(http, {"name": "shop/hold-checkpoint"})
            run_id = (await runs_of_event(http, server, event_id))[0]["run_id"]

            async def first_committed() -> bool:
                steps = (await run_doc(http, server, run_id))["steps"]
                return any(s["step_id"] == "first" and s["status"] == "Completed"
                           for s in steps)
            # Committed while the call is still in flight ("held" waits): by a checkpoint.
            await eventually(first_committed, "the first step to be checkpointed")
            calls = [c for c in await app.calls(http) if c["fnId"] == "shop-holder"]
            assert len(calls) == 1
        async with http.post(f"http://127.0.0.1:{app.port}/release") as resp:
            assert resp.status == 200
        async with sdk_server(db, port=port, sdk_urls=[app.url]) as server:
            await server.sdk.wait_synced()

            async def finished() -> dict[str, Any] | None:
                run = await run_doc(http, server, run_id)
                return run if run["status"] != "Running" else None
            run = await eventually(finished, "the resumed run to finish")
            assert run["status"] == "Completed", run
            # "first" replayed from the memo: it ran once, before the restart.
            assert run["output"] == {"first": "first", "held": "held", "firstRuns": 1}
            assert [s["step_id"] for s in run["steps"] if s["status"] == "Completed"] == [
                "first", "held"]
    finally:
        if app is not None:
            await app.stop()


async def test_a_memo_over_10_mib_reaches_an_app_with_an_8_mib_body_limit_through_the_api(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        [event_id] = await app.send(http, {"name": "shop/big"})
        await idle(server)
        run = await the_run(http, server, event_id)
        size = int(3.5 * 1024 * 1024)
        assert run["status"] == "Completed", run["error"]
        assert run["output"] == [f"o:{size}", f"t:{size}", f"t:{size}"]
        calls = [c for c in await app.calls(http) if c["fnId"] == "shop-big"]
        # Once the memo passes 4 MiB the calls leave it out and say use_api.
        assert calls[0]["useApi"] is False
        assert calls[-1]["useApi"] is True
        assert calls[-1]["steps"] == []
        async with http.get(f"{server.url}/v0/runs/{run['run_id']}/actions") as resp:
            memo = await resp.json()
        assert len(memo) == 4
        assert memo[_hash("sizes")] == {"data": run["output"]}


async def test_a_durable_endpoint_records_its_run_and_steps_through_checkpoints(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession, log_on_failure: None,
) -> None:
    async with sdk_server(tmp_path) as server, node_app(node_modules, server, tmp_path) as app:
        async with http.get(f"http://127.0.0.1:{app.port}/endpoint?q=1") as resp:
            text = await resp.text()
            assert resp.status == 200, (text, app.output())
            assert json.loads(text) == {"answer": 42}

        async def recorded() -> list[dict[str, Any]]:
            return [r for r in (await get(http, server, "/api/runs"))["runs"]
                    if r["status"] == "Completed" and r["event_name"] == "inngest/http.request"]
        # The run ends with a checkpoint the SDK sends once the response is on its way.
        [listed] = await eventually(recorded, "the endpoint's run to complete")
        run = await run_doc(http, server, listed["run_id"])
        assert [(s["step_id"], s["status"], s["output"]) for s in run["steps"]] == [
            ("look-up", "Completed", 20), ("add", "Completed", 21)]
        assert run["output"]["status"] == 200
        assert run["function_id"] == "GET /endpoint"  # named as Inngest names it
        trigger = run["events"][0]["data"]  # the request, as the SDK described it
        assert (trigger["method"], trigger["path"], trigger["query_params"]) == (
            "GET", "/endpoint", "q=1")
        async with http.get(f"{server.url}/runs/{run['run_id']}") as resp:
            page = await resp.text()
            assert resp.status == 200
        assert "look-up" in page
