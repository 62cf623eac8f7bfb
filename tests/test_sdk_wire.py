"""Wire fidelity with the real Inngest Python SDK (inngest 0.5.19), served by Flask and by
FastAPI on uvicorn: errors kept exactly as the SDK sent them (the run, `/v1/runs/{id}`, the
`inngest/function.failed` event), `X-Inngest-No-Retry` on a 206, the call headers behind
`ctx.request_id` / `ctx.job_id`, an invoked run's `_inngest` data, Inngest's invoke timeout
error, `GET /dev` in Inngest's shape, and a call on a pooled connection that uvicorn closed
while idle.

The same functions run under both frameworks: sync ones under Flask, async ones under
FastAPI (as the SDK's own suite does).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import fastapi
import flask
import pytest
import pytest_asyncio
import uvicorn
from aiohttp import web

from devserver.clock import Clock, WallClock
from devserver.model.records import FAILED
from devserver.web.server import Server

from .helpers import (
    ServedFlask,
    attempts,
    close_sdk_client,
    eventually,
    get,
    idle,
    run_doc,
    runs_of_function,
    sdk_server,
)

with warnings.catch_warnings():
    # inngest 0.5.19 declares pydantic models with v1-style `class Config` (deprecated).
    warnings.simplefilter("ignore", DeprecationWarning)
    import inngest
    import inngest.experimental.ai.anthropic
    import inngest.fast_api
    import inngest.flask

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]  # real SDK apps over HTTP
APP = "wire"
FRAMEWORKS = ["flask", "fastapi"]


class MyError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The functions under test, sync (Flask) or async (FastAPI)


def build_functions(client: inngest.Inngest, is_async: bool) -> list[inngest.Function[Any]]:
    """The functions every test serves; `is_async` picks the async variants."""

    def unserializable() -> object:
        class Foo:
            pass
        return Foo()

    def never() -> None:
        raise inngest.NonRetriableError("this step can never work")

    def adapter(ctx: inngest.Context | inngest.ContextSync) -> Any:
        base_url: str = ctx.event.data["base_url"]  # type: ignore[assignment]
        return inngest.experimental.ai.anthropic.Adapter(
            auth_key="sk-ant-test", base_url=base_url, model="claude-test")

    def on_failure_sync(ctx: inngest.ContextSync) -> None:
        return None

    async def on_failure_async(ctx: inngest.Context) -> None:
        return None

    if not is_async:
        @client.create_function(fn_id="fails", retries=0, on_failure=on_failure_sync,
                                trigger=inngest.TriggerEvent(event="wire/fails"))
        def fails(ctx: inngest.ContextSync) -> None:
            raise MyError("intentional failure")

        @client.create_function(fn_id="unserializable", retries=0,
                                trigger=inngest.TriggerEvent(event="wire/unserializable"))
        def bad_output(ctx: inngest.ContextSync) -> None:
            ctx.step.run("step_1", unserializable)  # type: ignore[arg-type]

        @client.create_function(fn_id="no-retry-step", retries=3,
                                trigger=inngest.TriggerEvent(event="wire/no-retry-step"))
        def no_retry_step(ctx: inngest.ContextSync) -> None:
            ctx.step.run("never", never)

        @client.create_function(fn_id="nested", retries=3,
                                trigger=inngest.TriggerEvent(event="wire/nested"))
        def nested(ctx: inngest.ContextSync) -> None:
            ctx.step.run("outer", lambda: ctx.step.run("inner", lambda: 1))

        @client.create_function(fn_id="call-data", trigger=inngest.TriggerEvent(event="wire/call"))
        def call_data(ctx: inngest.ContextSync) -> dict[str, Any]:
            first = ctx.step.run("first", lambda: {"request_id": ctx.request_id,
                                               "job_id": ctx.job_id})
            return {"step": first, "fn": {"request_id": ctx.request_id, "job_id": ctx.job_id}}

        @client.create_function(fn_id="invokee", trigger=inngest.TriggerEvent(event="never"))
        def invokee(ctx: inngest.ContextSync) -> dict[str, Any]:
            return dict(ctx.event.data)

        @client.create_function(fn_id="slow-invokee", retries=0,
                                trigger=inngest.TriggerEvent(event="never"))
        def slow_invokee(ctx: inngest.ContextSync) -> None:
            ctx.step.sleep("sleep", dt.timedelta(minutes=1))

        @client.create_function(fn_id="invoker", retries=0,
                                trigger=inngest.TriggerEvent(event="wire/invoke"))
        def invoker(ctx: inngest.ContextSync) -> dict[str, Any]:
            seen = ctx.step.invoke("child", function=invokee, data={"x": 1},
                               timeout=dt.timedelta(hours=1))
            try:
                ctx.step.invoke("late", function=slow_invokee, timeout=dt.timedelta(seconds=1))
            except inngest.StepError as exc:
                return {"seen": seen, "timeout": [exc.name, exc.message]}
            return {"seen": seen, "timeout": None}

        @client.create_function(fn_id="invoke-timeout", retries=0,
                                trigger=inngest.TriggerEvent(event="wire/invoke-timeout"))
        def invoke_timeout(ctx: inngest.ContextSync) -> None:
            ctx.step.invoke("late", function=slow_invokee, timeout=dt.timedelta(seconds=1))

        @client.create_function(fn_id="ask", trigger=inngest.TriggerEvent(event="wire/ask"))
        def ask(ctx: inngest.ContextSync) -> dict[str, object]:
            return ctx.step.ai.infer("ask-model", adapter=adapter(ctx), body={
                "max_tokens": 8, "messages": [{"role": "user", "content": "why?"}]})

        @client.create_function(fn_id="napper", trigger=inngest.TriggerEvent(event="wire/nap"))
        def napper(ctx: inngest.ContextSync) -> int:
            before = ctx.step.run("before", lambda: 1)
            ctx.step.sleep("nap", dt.timedelta(seconds=1))
            return before + ctx.step.run("after", lambda: 1)

        return [fails, bad_output, no_retry_step, nested, call_data, invokee, slow_invokee,
                invoker, invoke_timeout, ask, napper]

    async def unserializable_async() -> object:
        return unserializable()

    async def never_async() -> None:
        never()

    async def one() -> int:
        return 1

    @client.create_function(fn_id="fails", retries=0, on_failure=on_failure_async,
                            trigger=inngest.TriggerEvent(event="wire/fails"))
    async def fails_a(ctx: inngest.Context) -> None:
        raise MyError("intentional failure")

    @client.create_function(fn_id="unserializable", retries=0,
                            trigger=inngest.TriggerEvent(event="wire/unserializable"))
    async def bad_output_a(ctx: inngest.Context) -> None:
        await ctx.step.run("step_1", unserializable_async)  # type: ignore[arg-type]

    @client.create_function(fn_id="no-retry-step", retries=3,
                            trigger=inngest.TriggerEvent(event="wire/no-retry-step"))
    async def no_retry_step_a(ctx: inngest.Context) -> None:
        await ctx.step.run("never", never_async)

    @client.create_function(fn_id="nested", retries=3,
                            trigger=inngest.TriggerEvent(event="wire/nested"))
    async def nested_a(ctx: inngest.Context) -> None:
        async def outer() -> int:
            return await ctx.step.run("inner", one)
        await ctx.step.run("outer", outer)

    @client.create_function(fn_id="call-data", trigger=inngest.TriggerEvent(event="wire/call"))
    async def call_data_a(ctx: inngest.Context) -> dict[str, Any]:
        async def first() -> dict[str, Any]:
            return {"request_id": ctx.request_id, "job_id": ctx.job_id}
        seen = await ctx.step.run("first", first)
        return {"step": seen, "fn": {"request_id": ctx.request_id, "job_id": ctx.job_id}}

    @client.create_function(fn_id="invokee", trigger=inngest.TriggerEvent(event="never"))
    async def invokee_a(ctx: inngest.Context) -> dict[str, Any]:
        return dict(ctx.event.data)

    @client.create_function(fn_id="slow-invokee", retries=0,
                            trigger=inngest.TriggerEvent(event="never"))
    async def slow_invokee_a(ctx: inngest.Context) -> None:
        await ctx.step.sleep("sleep", dt.timedelta(minutes=1))

    @client.create_function(fn_id="invoker", retries=0,
                            trigger=inngest.TriggerEvent(event="wire/invoke"))
    async def invoker_a(ctx: inngest.Context) -> dict[str, Any]:
        seen = await ctx.step.invoke("child", function=invokee_a, data={"x": 1},
                                 timeout=dt.timedelta(hours=1))
        try:
            await ctx.step.invoke("late", function=slow_invokee_a, timeout=dt.timedelta(seconds=1))
        except inngest.StepError as exc:
            return {"seen": seen, "timeout": [exc.name, exc.message]}
        return {"seen": seen, "timeout": None}

    @client.create_function(fn_id="invoke-timeout", retries=0,
                            trigger=inngest.TriggerEvent(event="wire/invoke-timeout"))
    async def invoke_timeout_a(ctx: inngest.Context) -> None:
        await ctx.step.invoke("late", function=slow_invokee_a, timeout=dt.timedelta(seconds=1))

    @client.create_function(fn_id="ask", trigger=inngest.TriggerEvent(event="wire/ask"))
    async def ask_a(ctx: inngest.Context) -> dict[str, object]:
        return await ctx.step.ai.infer("ask-model", adapter=adapter(ctx), body={
            "max_tokens": 8, "messages": [{"role": "user", "content": "why?"}]})

    @client.create_function(fn_id="napper", trigger=inngest.TriggerEvent(event="wire/nap"))
    async def napper_a(ctx: inngest.Context) -> int:
        before = await ctx.step.run("before", one)
        await ctx.step.sleep("nap", dt.timedelta(seconds=1))
        return before + await ctx.step.run("after", one)

    return [fails_a, bad_output_a, no_retry_step_a, nested_a, call_data_a, invokee_a,
            slow_invokee_a, invoker_a, invoke_timeout_a, ask_a, napper_a]


# ---------------------------------------------------------------------------------------------
# The apps


class SdkApp(Protocol):
    client: inngest.Inngest

    @property
    def url(self) -> str: ...

    async def close(self) -> None: ...


def _client(base_url: str) -> inngest.Inngest:
    return inngest.Inngest(app_id=APP, is_production=False, api_base_url=base_url,
                           event_api_base_url=base_url)


class FlaskApp:
    """Sync functions in a Flask app, served by werkzeug on 127.0.0.1 from a thread."""

    def __init__(self, base_url: str) -> None:
        self.client = _client(base_url)
        app = flask.Flask(APP)
        inngest.flask.serve(app, self.client, build_functions(self.client, is_async=False))
        self._served = ServedFlask(app, "flask-wire-app", 0)

    @property
    def url(self) -> str:
        return self._served.url

    async def close(self) -> None:
        self._served.stop()
        await close_sdk_client(self.client)


class FastApiApp:
    """Async functions in a FastAPI app, served by uvicorn on 127.0.0.1 from a thread (its
    own event loop), with uvicorn's idle keep-alive timeout `keep_alive` seconds."""

    def __init__(self, base_url: str, keep_alive: int = 5) -> None:
        self.client = _client(base_url)
        app = fastapi.FastAPI()
        inngest.fast_api.serve(app, self.client, build_functions(self.client, is_async=True))
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                timeout_keep_alive=keep_alive, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name="uvicorn-wire-app")
        self._thread.start()

    async def started(self) -> FastApiApp:
        await eventually(lambda: asyncio.sleep(0, self._server.started), "uvicorn to start")
        return self

    @property
    def url(self) -> str:
        [server] = self._server.servers
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/api/inngest"

    async def close(self) -> None:
        self._server.should_exit = True
        await asyncio.to_thread(self._thread.join, 10)
        # The SDK's async HTTP client belongs to uvicorn's loop, now closed: only the sync
        # one can still be closed from here.
        self.client._http_client._http_client_sync.close()


@pytest_asyncio.fixture
async def apps() -> AsyncIterator[list[SdkApp]]:
    started: list[SdkApp] = []
    yield started
    for app in started:
        await app.close()


async def start_app(framework: str, server: Server, apps: list[SdkApp],
                    **options: Any) -> SdkApp:
    app: SdkApp
    if framework == "flask":
        app = FlaskApp(server.url)
    else:
        app = await FastApiApp(server.url, **options).started()
    apps.append(app)
    result = await server.sdk.sync(app.url)
    assert result.ok, result
    return app


async def send(http: aiohttp.ClientSession, server: Server, name: str,
               data: dict[str, Any] | None = None) -> str:
    """Send one event as the SDK does (a JSON array to /e/{key}); returns its id."""
    async with http.post(f"{server.url}/e/NO_EVENT_KEY_SET",
                         json=[{"name": name, "data": data or {}}]) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return str(body["ids"][0])


async def settled(server: Server, http: aiohttp.ClientSession, event_id: str,
                  done: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The one run `event_id` started, once it has ended (its document). On a virtual clock
    the server's timers are run first (`idle`)."""
    await idle(server)

    async def probe() -> dict[str, Any] | None:
        runs = (await get(http, server, f"/v1/events/{event_id}/runs"))["data"]
        if len(runs) != 1:
            return None
        run = await run_doc(http, server, runs[0]["run_id"])
        ended = run["status"] in ("Completed", "Failed", "Cancelled")
        return run if ended and (done is None or done(run)) else None
    return dict(await eventually(probe, f"the run of event {event_id} to end"))


# ---------------------------------------------------------------------------------------------
# Errors, verbatim


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_function_error_is_kept_verbatim_and_the_failed_event_is_inngests(
    framework: str, tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        await start_app(framework, server, apps)
        event_id = await send(http, server, "wire/fails", {"foo": 1})
        run = await settled(server, http, event_id)
        assert run["status"] == FAILED
        # The error body the SDK sent, every key (its `code` too), nothing added.
        error = run["error"]
        assert set(error) == {"code", "message", "name", "stack"}, error
        assert (error["code"], error["name"], error["message"]) == (
            "unknown", "MyError", "intentional failure")
        assert error["stack"].startswith("Traceback (most recent call last):")
        v1 = (await get(http, server, f"/v1/runs/{run['run_id']}"))["data"]
        assert v1["output"] == error

        # The on_failure handler's trigger: Inngest's inngest/function.failed event.
        [handler] = await eventually(
            lambda: runs_of_function(http, server, f"{APP}-fails-failure"),
            "the on_failure handler to run")
        failed = (await run_doc(http, server, handler["run_id"]))["events"][0]
        assert failed["name"] == "inngest/function.failed"
        data = failed["data"]
        assert data["error"] == {"error": "invalid status code: 500",
                                 "message": "intentional failure", "name": "MyError",
                                 "stack": error["stack"]}
        assert (data["function_id"], data["run_id"]) == (f"{APP}-fails", run["run_id"])
        assert data["event"]["id"] == event_id  # the trigger, with its real id
        assert (data["event"]["name"], data["event"]["data"]) == ("wire/fails", {"foo": 1})
        assert isinstance(data["event"]["ts"], int)
        assert data["events"] == [data["event"]]


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_an_error_without_a_stack_gets_none_added(
    framework: str, tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        await start_app(framework, server, apps)
        run = await settled(server, http, await send(http, server, "wire/unserializable"))
        expected = {"code": "output_unserializable", "name": "OutputUnserializableError",
                    "message": '"step_1" returned unserializable data'}
        assert run["error"] == expected
        v1 = (await get(http, server, f"/v1/runs/{run['run_id']}"))["data"]
        assert v1["output"] == expected


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_non_retriable_step_error_fails_at_once_verbatim(
    framework: str, tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    """Python 0.5.19 answers a step's NonRetriableError with 500 + X-Inngest-No-Retry (the
    TypeScript SDK's 206 form is in test_sdk_ts.py)."""
    async with sdk_server(tmp_path) as server:
        await start_app(framework, server, apps)
        run = await settled(server, http, await send(http, server, "wire/no-retry-step"))
        assert run["status"] == FAILED
        assert attempts(run, None) == [(0, "Failed")]  # 3 retries configured, none used
        assert run["error"]["code"] == "non_retriable_error"
        assert run["error"]["message"] == "this step can never work"


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_no_retry_on_a_206_fails_the_step_at_once(
    framework: str, tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    """A nested step: the SDK answers 206 with a `StepError` (`code: "step_nested"`) and
    `X-Inngest-No-Retry: true`, so the step fails for good at its first attempt."""
    async with sdk_server(tmp_path) as server:
        await start_app(framework, server, apps)
        run = await settled(server, http, await send(http, server, "wire/nested"))
        assert run["status"] == FAILED
        assert attempts(run, "outer") == [(0, "Failed")]  # 3 retries configured, none used
        outer = run["steps"][0]["error"]
        assert (outer["code"], outer["message"]) == ("step_nested",
                                                     "Nested steps are not supported.")
        # The SDK raised the memoized error in the function: the run fails with it.
        assert (run["error"]["name"], run["error"]["message"]) == (
            "CodedError", "Nested steps are not supported.")


# ---------------------------------------------------------------------------------------------
# Call data


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_calls_carry_a_request_id_and_a_job_id(
    framework: str, tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        await start_app(framework, server, apps)
        run = await settled(server, http, await send(http, server, "wire/call"))
        assert run["status"] == "Completed", run
        step, fn = run["output"]["step"], run["output"]["fn"]
        # One request id per call: the step ran in the first call, the return in the next.
        assert step["request_id"]
        assert fn["request_id"]
        assert step["request_id"] != fn["request_id"]
        assert step["job_id"] == fn["job_id"] == f"{run['run_id']}:step"


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_an_invoked_run_sees_inngests_data_and_a_timeout_raises_inngests_error(
    framework: str, tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        await start_app(framework, server, apps)
        run = await settled(server, http, await send(http, server, "wire/invoke"))
        assert run["status"] == "Completed", run
        seen = run["output"]["seen"]
        assert seen["x"] == 1
        meta = seen["_inngest"]
        assert (meta["fn_id"], meta["source_fn_id"], meta["source_app_id"]) == (
            f"{APP}-invokee", f"{APP}-invoker", APP)
        assert meta["correlation_id"].startswith(f"{run['run_id']}.")
        assert meta["expire"] > 0
        # The SDK raises Inngest's invoke timeout error as is.
        assert run["output"]["timeout"] == [
            "InngestInvokeTimeoutError", "Timed out waiting for invoked function to complete"]
        late = next(s for s in run["steps"] if s["step_id"] == "late")
        assert late["error"] == {"name": "InngestInvokeTimeoutError",
                                 "message": "Timed out waiting for invoked function to complete"}



@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_an_uncaught_invoke_timeout_fails_the_run_as_the_sdks_suite_expects(
    framework: str, tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    # Its own server: the SDK dates its sleeps by the wall clock, and another test's hour on
    # the virtual clock would end the invoked run's sleep at once.
    async with sdk_server(tmp_path) as server:
        await start_app(framework, server, apps)
        failed = await settled(server, http, await send(http, server, "wire/invoke-timeout"))
        assert failed["status"] == FAILED
        assert failed["error"] == {
            "code": "step_errored", "name": "InngestInvokeTimeoutError", "stack": None,
            "message": "Timed out waiting for invoked function to complete"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_step_ai_infer_is_made_by_the_server(
    framework: str, tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    """AIGateway from the Python SDK (Anthropic's format: the key in `x-api-key`), against a
    local mock of the model's API. Header names arrive as Inngest's Go client writes them
    (`X-Api-Key`): the SDK's own suite looks them up with that spelling."""
    seen: list[tuple[str, dict[str, str], Any]] = []

    async def model(request: web.Request) -> web.Response:
        # The names exactly as they came over the wire (request.headers ignores case).
        raw = {name.decode(): value.decode() for name, value in request.raw_headers}
        seen.append((request.path, raw, await request.json()))
        return web.json_response({"content": [{"type": "text", "text": "because"}]})

    mock = web.Application()
    mock.router.add_post("/v1/messages", model)
    runner = web.AppRunner(mock)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with sdk_server(tmp_path) as server:
            await start_app(framework, server, apps)
            run = await settled(server, http, await send(
                http, server, "wire/ask", {"base_url": f"http://127.0.0.1:{port}/v1"}))
            assert (run["status"], run["output"]) == (
                "Completed", {"content": [{"type": "text", "text": "because"}]})
            [(path, headers, body)] = seen
            assert (path, headers["X-Api-Key"]) == ("/v1/messages", "sk-ant-test")
            assert headers["Anthropic-Version"]  # the adapter's own header, canonicalised
            assert headers["Content-Type"] == "application/json"
            assert body["model"] == "claude-test"
            assert body["messages"] == [{"role": "user", "content": "why?"}]
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------
# GET /dev


async def test_dev_lists_functions_in_inngests_shape(
    tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        app = await start_app("flask", server, apps)
        info = await get(http, server, "/dev")
        fns = {fn["id"]: fn for fn in info["functions"]}
        napper = fns[f"{APP}-napper"]
        assert napper["slug"] == f"{APP}-napper"
        assert napper["triggers"] == [{"event": "wire/nap"}]
        [step] = napper["steps"]
        assert (step["id"], step["name"]) == ("step", "step")
        assert step["uri"].startswith(f"{app.url}?fnId={APP}-napper")


# ---------------------------------------------------------------------------------------------
# Keep-alive


async def test_sleeps_as_long_as_uvicorns_keep_alive_never_fail_an_attempt(
    tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    """uvicorn closes a connection idle for its keep-alive timeout; a 1 s sleep with a 1 s
    timeout makes the server reuse pooled connections just as uvicorn closes them."""
    clock: Clock = WallClock()
    async with sdk_server(tmp_path, clock=clock) as server:
        await start_app("fastapi", server, apps, keep_alive=1)
        ids = [await send(http, server, "wire/nap") for _ in range(8)]
        runs = [await settled(server, http, event_id) for event_id in ids]
        failed_attempts = [s for run in runs for s in run["steps"] if s["status"] == "Failed"]
        assert failed_attempts == []
        assert [run["output"] for run in runs] == [2] * 8


async def test_the_run_page_shows_every_key_of_an_sdk_error(
    tmp_path: Path, apps: list[SdkApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path) as server:
        await start_app("flask", server, apps)
        run = await settled(server, http, await send(http, server, "wire/unserializable"))
        async with http.get(f"{server.url}/runs/{run['run_id']}") as resp:
            page = await resp.text()
        assert resp.status == 200
        assert "output_unserializable" in page
        assert "OutputUnserializableError" in page
