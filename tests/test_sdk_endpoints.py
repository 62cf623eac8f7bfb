"""Durable endpoints that go asynchronous (TypeScript SDK v4's `inngest.endpoint`), with the
real SDK in a Node app (`sdk_ts_endpoints.cjs`) against a real devserver: a sleep switches
the run to async and the caller is redirected to the run's output, which the server
produces by continuing the run (calling the endpoint again with its memo); step retries,
a step failing for good, a NonRetriableError, a waitForEvent fulfilled by an event, the
SDK's streaming client following the redirect, parallel steps, a restart in the middle, a
synchronous run the SDK went quiet on (before and across a restart), cancelling, and the
lifecycle event an endpoint's run emits.

Uses the `inngest@4` install of `test_sdk_ts.py` (npm, cached).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.clock import VirtualClock
from devserver.sdk.endpoint_calls import run_token
from devserver.sdk.endpoints import QUIET_MS
from devserver.web.server import Server

from .helpers import eventually, free_port, get, idle, run_doc, sdk_server
from .test_sdk_ts import (  # noqa: F401 - fixtures: the npm install, the app's log
    NodeApp,
    log_on_failure,
    node_modules,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.usefixtures("log_on_failure")]
APP_SCRIPT = Path(__file__).with_name("sdk_ts_endpoints.cjs")


class EndpointApp(NodeApp):
    """The Node app serving the endpoints (`sdk_ts_endpoints.cjs`), its output in a log file."""

    def at(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def calls(self, http: aiohttp.ClientSession) -> dict[str, int]:
        async with http.get(self.at("/calls")) as resp:
            return dict(await resp.json())


@asynccontextmanager
async def endpoint_app(modules: Path, server_url: str, log: Path) -> AsyncIterator[EndpointApp]:
    app = await EndpointApp.start(modules, server_url, log, script=APP_SCRIPT)
    try:
        yield app
    finally:
        await app.stop()


async def redirected(http: aiohttp.ClientSession, app: EndpointApp, path: str,
                     **kwargs: Any) -> str:
    """Request an endpoint that goes async; the URL it redirects to."""
    method = "POST" if "json" in kwargs else "GET"
    async with http.request(method, app.at(path), allow_redirects=False, **kwargs) as resp:
        text = await resp.text()
        assert resp.status == 302, (resp.status, text, app.output())
        return resp.headers["Location"]


async def output(http: aiohttp.ClientSession, location: str) -> Any:
    async with http.get(location) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def run_id_of(location: str) -> str:
    return location.split("/runs/")[1].split("/")[0]


async def a_run_ended(http: aiohttp.ClientSession, server: Server,
                      run_id: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        run = await run_doc(http, server, run_id)
        return run if run["status"] not in ("Queued", "Running") else None
    return dict(await eventually(ended, f"run {run_id} to end"))


def response_of(doc: dict[str, Any]) -> Any:
    """The endpoint's response body in an output document, parsed. After the switch to
    async, the TypeScript SDK (4.24) reports a returned `Response` as status 200 with its
    body text JSON-encoded once more (Inngest's own tests note it as a bug to fix): the
    server keeps what the SDK sent."""
    data = doc["data"]
    assert data["status"] == 200, data
    return json.loads(json.loads(data["body"]))


async def test_a_sleep_redirects_the_caller_and_the_server_finishes_the_run(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/sleepy?q=1")
        run_id = run_id_of(location)
        assert location.startswith(f"{server.url}/v1/http/runs/{run_id}/output?token=")
        # Waiting on the output while the server sleeps through the 30 minutes.
        reading = asyncio.create_task(output(http, location))
        await idle(server)
        doc = await reading
        assert response_of(doc) == {"a": "a:1", "b": "b", "method": "GET"}
        run = await a_run_ended(http, server, run_id)
        assert run["status"] == "Completed"
        assert run["function_id"] == "GET /sleepy"
        assert [(s["step_id"], s["status"]) for s in run["steps"]] == [
            ("before", "Completed"), ("nap", "Completed"), ("after", "Completed")]
        # The request, then the continuation: a call that runs "after", one that returns.
        assert (await app.calls(http))["/sleepy"] == 3
        listed = (await get(http, server, "/api/functions"))["functions"]
        endpoint = next(fn for fn in listed if fn["id"] == "GET /sleepy")
        assert endpoint["endpoint"] is True
        async with http.get(f"{server.url}/runs/{run_id}") as resp:
            assert resp.status == 200
            assert "nap" in await resp.text()
        # Its runs start at its URL: no Invoke form, and the API refuses to invoke it.
        async with http.get(f"{server.url}/functions") as resp:
            page = await resp.text()
        assert "A durable endpoint: its runs start when its URL is requested" in page
        async with http.post(f"{server.url}/api/functions/GET%20%2Fsleepy/invoke",
                             json={"data": {}}) as resp:
            assert resp.status == 400
            assert "durable endpoint" in (await resp.json())["error"]


async def test_the_continuation_is_the_same_request_again(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/echo?q=x%20y", json={"n": 7})
        await idle(server)
        assert response_of(await output(http, location)) == {
            "q": "x y", "method": "POST", "again": "x y"}


async def test_a_failed_step_is_retried_by_the_server_then_succeeds(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    # Inngest's backoff (virtual time): the retry comes 15 s (plus jitter) after the failure.
    async with sdk_server(tmp_path, retry_interval=None) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/flaky")
        await idle(server)
        assert response_of(await output(http, location)) == {"value": 2}
        run = await a_run_ended(http, server, run_id_of(location))
        assert [(s["step_id"], s["status"], s["attempt"]) for s in run["steps"]] == [
            ("flaky", "Failed", 1), ("flaky", "Completed", 2)]
        assert run["steps"][0]["error"]["message"] == "not yet"
        failed, retried = (datetime.fromisoformat(s["started_at"]) for s in run["steps"])
        assert 15 <= (retried - failed).total_seconds() <= 46


async def test_a_step_failing_for_good_fails_the_run_with_its_error(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/doomed")
        await idle(server)
        doc = await output(http, location)
        run = await a_run_ended(http, server, run_id_of(location))
        assert run["status"] == "Failed"
        # The SDK's default 3 retries: 4 attempts, each error stored as the SDK sent it.
        failed = [s for s in run["steps"] if s["step_id"] == "doomed"]
        assert [s["error"]["message"] for s in failed] == [
            f"doomed attempt {n}" for n in range(1, 5)]
        assert run["error"]["message"] == "doomed attempt 4"
        assert doc == run["error"]  # the output URL answers the error verbatim


async def test_a_non_retriable_error_after_the_switch_fails_the_run_at_once(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/fatal")
        await idle(server)
        doc = await output(http, location)
        assert (doc["name"], doc["message"]) == ("NonRetriableError", "fatal after async")


async def test_a_wait_for_event_is_fulfilled_by_an_event(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/approval?order=o-1")
        run_id = run_id_of(location)

        async def waiting() -> bool:
            steps = (await run_doc(http, server, run_id))["steps"]
            return any(s["step_id"] == "approved" and s["status"] == "Waiting" for s in steps)
        await eventually(waiting, "the endpoint to wait for its approval")
        async with http.post(f"{server.url}/e/key", json=[
                {"name": "shop/approved", "data": {"order": "o-2", "by": "nobody"}},
                {"name": "shop/approved", "data": {"order": "o-1", "by": "ann"}}]) as resp:
            assert resp.status == 200
        await idle(server)
        assert response_of(await output(http, location)) == {"order": "o-1", "by": "ann"}


async def test_the_sdk_client_streams_across_the_switch_to_async(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        calling = asyncio.create_task(http.get(app.at("/via-client?path=/streamy")))

        async def napping() -> bool:
            for listed in (await get(http, server, "/api/runs"))["runs"]:
                steps = (await run_doc(http, server, listed["run_id"]))["steps"]
                if any(s["step_id"] == "nap" and s["status"] == "Waiting" for s in steps):
                    return True
            return False
        await eventually(napping, "the streaming endpoint's run to sleep")
        await idle(server)
        async with await calling as resp:
            got = await resp.json()
        assert got["status"] == 200, got
        assert json.loads(got["body"]) == "streamed"
        assert got["chunks"] == ["chunk a", "chunk b"]


async def test_an_async_run_survives_a_devserver_restart(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    port = free_port()  # the app knows the server by this URL only
    db = tmp_path / "kept"
    db.mkdir()
    async with endpoint_app(node_modules, f"http://127.0.0.1:{port}",
                            tmp_path / "node.log") as app:
        async with sdk_server(db, port=port) as server:
            location = await redirected(http, app, "/sleepy?q=2")
            run_id = run_id_of(location)

            async def napping() -> bool:
                steps = (await run_doc(http, server, run_id))["steps"]
                return any(s["step_id"] == "nap" and s["status"] == "Waiting" for s in steps)
            await eventually(napping, "the endpoint's run to sleep")
        async with sdk_server(db, port=port) as again:
            await idle(again)
            assert response_of(await output(http, location)) == {
                "a": "a:2", "b": "b", "method": "GET"}
            run = await a_run_ended(http, again, run_id)
            assert [s["step_id"] for s in run["steps"]] == ["before", "nap", "after"]
        assert (await app.calls(http))["/sleepy"] == 3


async def test_the_output_needs_the_runs_token(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/sleepy?q=3")
        run_id = run_id_of(location)
        other = run_token("01J00000000000000000000000")
        for url in (f"{server.url}/v1/http/runs/{run_id}/output?token={other}",
                    f"{server.url}/v1/http/runs/{run_id}/output?token=x",
                    f"{server.url}/v1/http/runs/{run_id}/output"):
            async with http.get(url) as resp:
                assert resp.status == 401, url
        await idle(server)
        assert (await output(http, f"{server.url}/v1/checkpoint/{run_id}/output?token="
                             f"{run_token(run_id)}"))["data"]["status"] == 200


async def test_a_function_error_in_the_request_hands_the_run_over(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/throws-once")
        await idle(server)
        assert response_of(await output(http, location)) == {"second": True}
        assert (await app.calls(http))["/throws-once"] == 2


async def test_a_synchronous_run_gone_quiet_is_continued_by_the_server(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    clock = VirtualClock()
    async with sdk_server(tmp_path, clock=clock) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        hanging = asyncio.create_task(http.get(app.at("/hang")))
        try:
            async def first_step() -> str | None:
                for listed in (await get(http, server, "/api/runs"))["runs"]:
                    steps = (await run_doc(http, server, listed["run_id"]))["steps"]
                    if [(s["step_id"], s["status"]) for s in steps] == [("a", "Completed")]:
                        return str(listed["run_id"])
                return None
            run_id = await eventually(first_step, "the hanging endpoint's first step")
            assert (await run_doc(http, server, run_id))["status"] == "Running"
            clock.advance(QUIET_MS - 1)
            await idle(server)
            assert (await run_doc(http, server, run_id))["status"] == "Running"
            clock.advance(1)
            run = await a_run_ended(http, server, run_id)
            assert run["status"] == "Completed", run
            assert json.loads(json.loads(run["output"]["body"])) == {"a": "a", "resumed": True}
            assert (await app.calls(http))["/hang"] >= 2
        finally:
            hanging.cancel()


async def test_parallel_steps_in_an_endpoint_are_called_by_the_server(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        location = await redirected(http, app, "/parallel")
        await idle(server)
        assert response_of(await output(http, location)) == {"x": "x", "y": "y"}
        run = await a_run_ended(http, server, run_id_of(location))
        assert sorted(s["step_id"] for s in run["steps"]) == ["x", "y"]


async def test_a_streamed_step_retried_by_the_server_streams_again(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    async with sdk_server(tmp_path) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        async with http.get(app.at("/via-client?path=/stream-retry")) as resp:
            got = await resp.json()
        await idle(server)
        assert got["status"] == 200, got
        assert json.loads(got["body"]) == {"n": 2}
        # The client saw the failed attempt's chunk (and its rollback), then the retry's.
        assert got["chunks"] == ["partial 1", "partial 2"]


async def test_an_endpoint_run_ends_like_any_run_and_can_be_cancelled(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    watcher = devserver.App("watch")
    seen: list[dict[str, Any]] = []

    @watcher.function(trigger="inngest/function.finished")
    async def finished(ctx: devserver.Context) -> None:
        seen.append(dict(ctx.event.data))

    async with sdk_server(tmp_path, functions=watcher.functions) as server, \
            endpoint_app(node_modules, server.url, tmp_path / "node.log") as app:
        async with http.get(app.at("/quick")) as resp:  # ends within the request
            assert resp.status == 200
            assert await resp.json() == {"quick": 1}
        location = await redirected(http, app, "/sleepy?q=4")
        run_id = run_id_of(location)
        async with http.delete(f"{server.url}/v1/runs/{run_id}") as resp:
            assert resp.status == 200, await resp.text()
        assert (await output(http, location))["status"] == "cancelled"
        await idle(server)
        ended = {(doc["function_id"], "result" in doc) for doc in seen}
        assert ended == {("GET /quick", True), ("GET /sleepy", False)}


async def test_a_quiet_synchronous_runs_deadline_survives_a_restart(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,  # noqa: F811
) -> None:
    port = free_port()
    db = tmp_path / "kept"
    db.mkdir()
    async with endpoint_app(node_modules, f"http://127.0.0.1:{port}",
                            tmp_path / "node.log") as app:
        hanging = asyncio.create_task(http.get(app.at("/hang")))
        try:
            async with sdk_server(db, port=port) as server:
                async def first_step() -> str | None:
                    for listed in (await get(http, server, "/api/runs"))["runs"]:
                        steps = (await run_doc(http, server, listed["run_id"]))["steps"]
                        if [s["status"] for s in steps] == ["Completed"]:
                            return str(listed["run_id"])
                    return None
                run_id = await eventually(first_step, "the hanging endpoint's first step")
            clock = VirtualClock()
            async with sdk_server(db, port=port, clock=clock) as again:
                assert (await run_doc(http, again, run_id))["status"] == "Running"
                clock.advance(QUIET_MS)  # the stored deadline has passed on this clock
                run = await a_run_ended(http, again, run_id)
                assert run["status"] == "Completed", run
        finally:
            hanging.cancel()
