"""`/v0/gql`, queried the way the official SDKs' test harnesses query Inngest's dev server
(the query strings below are those of inngest-py's `test_core.helper`, verbatim)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.clock import VirtualClock
from devserver.web.server import Server

from .helpers import MakeServer, idle, sdk_server, send
from .test_sdk_python import FlaskApp, apps, inngest, synced_app
from .test_sdk_ts import node_app, node_modules

__all__ = ["apps", "node_modules"]  # fixtures, used by name

pytestmark = pytest.mark.asyncio

GET_RUN_IDS = """
        query GetRunFromEventID($event_id: ID!) {
            event(query: {eventId: $event_id}) {
                functionRuns {
                    id
                }
            }
        }
        """

GET_RUN = """
        query GetRun($run_id: String!) {
            run(runID: $run_id) {
                output
                status
            }
            runTrigger(runID: $run_id) {
                payloads
            }
        }
        """

GET_STEPS = """
        query GetHistory($run_id: String!) {
            run(runID: $run_id) {
                trace {
                    childrenSpans {
                        name
                        outputID
                    }
                }
            }
        }
        """

GET_OUTPUT = """
        query GetHistory($output_id: String!) {
            runTraceSpanOutputByID(outputID: $output_id) {
                data
                error {
                    message
                    name
                    stack
                }
            }
        }
        """


# The TypeScript SDK's harness (inngest-js `src/test/helpers.ts`, `fetchRunResult`): it finds
# the span whose stepType is FINALIZATION and reads the run's result from its output.
TS_FIND_FINALIZATION = """query ($runId: String!) {
          run(runID: $runId) {
            trace(preview: true) {
              stepType outputID status
              childrenSpans {
                stepType outputID status
                childrenSpans { stepType outputID status }
              }
            }
          }
        }"""

TS_READ_OUTPUT = """query ($outputId: String!) {
        runTraceSpanOutputByID(outputID: $outputId) {
          data
          error { name message stack cause }
        }
      }"""


def finalization_output_id(span: dict[str, Any]) -> str | None:
    """The harness's search: depth first, the first FINALIZATION span with an output."""
    if span.get("stepType") == "FINALIZATION" and span.get("outputID"):
        return str(span["outputID"])
    for child in span.get("childrenSpans") or []:
        found = finalization_output_id(child)
        if found:
            return found
    return None


async def ts_run_result(http: aiohttp.ClientSession, server: Server,
                        run_id: str) -> dict[str, Any]:
    """A run's result the way the TypeScript harness reads it: `data` or `error`."""
    trace = (await data(http, server, TS_FIND_FINALIZATION, {"runId": run_id}))["run"]["trace"]
    output_id = finalization_output_id(trace)
    assert output_id, trace
    got = await data(http, server, TS_READ_OUTPUT, {"outputId": output_id})
    return dict(got["runTraceSpanOutputByID"])


async def gql(http: aiohttp.ClientSession, server: Server, query: str,
              variables: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """POST a GraphQL request as the harnesses do (`{"query", "variables"}`)."""
    async with http.post(f"{server.url}/v0/gql",
                         json={"query": query, "variables": variables}) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def data(http: aiohttp.ClientSession, server: Server, query: str,
               variables: dict[str, Any] | None = None) -> dict[str, Any]:
    status, body = await gql(http, server, query, variables)
    assert status == 200, body
    assert "errors" not in body, body
    return dict(body["data"])


def retrying_app() -> tuple[devserver.App, dict[str, int]]:
    app = devserver.App("gql")
    calls = {"flaky": 0}

    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionError(f"try {calls['flaky']}")
        return "ok"

    @app.function(trigger="app/go", retries=2)
    async def fn(ctx: devserver.Context) -> dict[str, Any]:
        first = await ctx.step.run("first", lambda: {"n": ctx.event.data["n"]})
        second = await ctx.step.run("flaky", flaky)
        return {"first": first, "second": second}

    def broken() -> None:
        raise KeyError("missing")

    @app.function(trigger="app/fail", retries=1)
    async def failing(ctx: devserver.Context) -> None:
        await ctx.step.run("broken", broken)

    return app, calls


async def test_harness_queries_read_runs_steps_outputs_and_triggers(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app, calls = retrying_app()
    server = await make_server(app)
    event_id = await send(http, server, "app/go", {"n": 7})

    # Read-your-writes: the event and its run are there as soon as the send is answered.
    got = await data(http, server, GET_RUN_IDS, {"event_id": event_id})
    runs = got["event"]["functionRuns"]
    assert len(runs) == 1
    run_id = runs[0]["id"]

    await idle(server)
    got = await data(http, server, GET_RUN, {"run_id": run_id})
    assert got["run"]["status"] == "COMPLETED"
    assert json.loads(got["run"]["output"]) == {"first": {"n": 7}, "second": "ok"}
    (payload,) = got["runTrigger"]["payloads"]
    event = json.loads(payload)
    assert (event["name"], event["data"], event["id"]) == ("app/go", {"n": 7}, event_id)
    assert isinstance(event["ts"], int)

    spans = (await data(http, server, GET_STEPS, {"run_id": run_id}))["run"]["trace"][
        "childrenSpans"]
    # The steps in order, then the run's finalization (its result).
    assert [s["name"] for s in spans] == ["first", "flaky", "Finalization"]
    outputs = [(await data(http, server, GET_OUTPUT, {"output_id": s["outputID"]}))[
        "runTraceSpanOutputByID"] for s in spans]
    assert [json.loads(o["data"]) for o in outputs] == [
        {"n": 7}, "ok", {"first": {"n": 7}, "second": "ok"}]
    assert [o["error"] for o in outputs] == [None, None, None]
    assert calls["flaky"] == 3


async def test_trace_has_attempts_under_steps_and_failures_carry_their_error(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app, _ = retrying_app()
    server = await make_server(app)
    ok_event = await send(http, server, "app/go", {"n": 1})
    fail_event = await send(http, server, "app/fail")
    await idle(server)
    query = """
    query Trace($ok: ID!, $bad: ID!) {
      good: event(query: {eventId: $ok}) { name functionRuns { id status function { name } } }
      bad: event(query: {eventId: $bad}) { functionRuns { id status } }
    }
    """
    got = await data(http, server, query, {"ok": ok_event, "bad": fail_event})
    assert got["good"]["name"] == "app/go"
    (good,) = got["good"]["functionRuns"]
    assert good["status"] == "COMPLETED"
    assert good["function"]["name"]
    (bad,) = got["bad"]["functionRuns"]
    assert bad["status"] == "FAILED"

    trace_query = """
    fragment SpanFields on RunTraceSpan {
      name status outputID stepID spanID stepType attempts isRoot
      metadata { scope kind values updatedAt }
    }
    query($runID: String!) {
      run(runID: $runID) {
        status
        trace(preview: true) {
          ...SpanFields
          childrenSpans { ...SpanFields childrenSpans { ...SpanFields } }
        }
      }
    }
    """
    root = (await data(http, server, trace_query, {"runID": good["id"]}))["run"]["trace"]
    assert root["isRoot"] is True
    assert root["status"] == "COMPLETED"
    assert [(s["name"], s["stepID"], s["stepType"], s["status"], s["attempts"])
            for s in root["childrenSpans"]] == [
        ("first", "first", "RUN", "COMPLETED", 1), ("flaky", "flaky", "RUN", "COMPLETED", 3),
        ("Finalization", None, "FINALIZATION", "COMPLETED", None)]
    flaky = root["childrenSpans"][1]
    assert [a["status"] for a in flaky["childrenSpans"]] == ["FAILED", "FAILED", "COMPLETED"]
    assert len({a["spanID"] for a in flaky["childrenSpans"]}) == 3
    first_try = (await data(http, server, GET_OUTPUT,
                            {"output_id": flaky["childrenSpans"][0]["outputID"]}))
    error = first_try["runTraceSpanOutputByID"]["error"]
    assert (error["name"], error["message"]) == ("ConnectionError", "try 1")
    assert first_try["runTraceSpanOutputByID"]["data"] is None
    # The root span's output is the run's.
    run_output = await data(http, server, GET_OUTPUT, {"output_id": root["outputID"]})
    assert json.loads(run_output["runTraceSpanOutputByID"]["data"])["second"] == "ok"

    failed = (await data(http, server, trace_query, {"runID": bad["id"]}))["run"]
    assert failed["status"] == "FAILED"
    broken, final = failed["trace"]["childrenSpans"]
    assert (final["stepType"], final["status"]) == ("FINALIZATION", "FAILED")
    final_out = (await data(http, server, GET_OUTPUT, {"output_id": final["outputID"]}))[
        "runTraceSpanOutputByID"]
    assert (final_out["data"], final_out["error"]["name"]) == (None, "KeyError")
    assert (broken["name"], broken["status"], broken["attempts"]) == ("broken", "FAILED", 2)
    out = (await data(http, server, GET_OUTPUT, {"output_id": broken["outputID"]}))[
        "runTraceSpanOutputByID"]
    assert out["data"] is None
    assert out["error"]["name"] == "KeyError"
    assert "broken" in out["error"]["stack"]


async def test_event_lists_stream_and_event_v2(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app, _ = retrying_app()
    server = await make_server(app)
    first = await send(http, server, "app/go", {"n": 1}, id="my-key")
    second = await send(http, server, "app/other", {"x": True})
    await idle(server)

    got = await data(http, server, "{ events(query: {}) { id name payload } }")
    listed = [(e["id"], e["name"], json.loads(e["payload"])) for e in got["events"]]
    assert (second, "app/other", {"x": True}) in listed
    assert (first, "app/go", {"n": 1}) in listed
    assert [e[0] for e in listed] == sorted((e[0] for e in listed), reverse=True)

    query = """query($limit: Int!) {
      stream(query: {limit: $limit, includeInternalEvents: false}) {
        id trigger runs { id function { name } }
      }
    }"""
    items = (await data(http, server, query, {"limit": 1}))["stream"]
    assert [(i["id"], i["trigger"], i["runs"]) for i in items] == [(second, "app/other", [])]
    items = (await data(http, server, query, {"limit": 10_000}))["stream"]
    assert len(items) <= 100
    (go,) = [i for i in items if i["id"] == first]
    assert len(go["runs"]) == 1

    got = await data(http, server, """query($id: ULID!) {
      eventV2(id: $id) { idempotencyKey name raw runs { id status function { name } } }
    }""", {"id": first})
    v2 = got["eventV2"]
    assert (v2["idempotencyKey"], v2["name"]) == ("my-key", "app/go")
    assert json.loads(v2["raw"])["data"] == {"n": 1}
    assert [r["status"] for r in v2["runs"]] == ["COMPLETED"]

    # GET with query= answers the same.
    async with http.get(f"{server.url}/v0/gql",
                        params={"query": "query($id: ULID!) { eventV2(id: $id) { name } }",
                                "variables": json.dumps({"id": second})}) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"]["eventV2"]["name"] == "app/other"


async def test_unknown_run_is_null_with_an_error_and_bad_queries_are_graphql_errors(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    status, body = await gql(http, server, "query($id: String!) { run(runID: $id) { status } }",
                             {"id": "01NOPE"})
    assert status == 200
    assert body["data"] == {"run": None}
    assert "01NOPE" in body["errors"][0]["message"]
    assert body["errors"][0]["path"] == ["run"]

    # A non-null field (runTrigger) makes its parent null, as GraphQL says.
    status, body = await gql(http, server, GET_RUN, {"run_id": "01NOPE"})
    assert status == 200
    assert body["data"] is None
    assert len(body["errors"]) == 2

    status, body = await gql(http, server, "{ run(runID: \"x\") { status nope } }")
    assert status == 200
    assert "data" not in body
    assert "nope" in body["errors"][0]["message"]
    assert "locations" in body["errors"][0]

    status, body = await gql(http, server, GET_OUTPUT, {"output_id": "not-an-id!"})
    assert status == 200
    assert body["data"] is None
    assert "not an output id" in body["errors"][0]["message"]

    status, body = await gql(http, server, GET_RUN_IDS)  # a required variable missing
    assert status == 200
    assert "event_id" in body["errors"][0]["message"]

    async with http.post(f"{server.url}/v0/gql", data=b"{not json",
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert "not JSON" in (await resp.json())["errors"][0]["message"]
    async with http.get(f"{server.url}/v0/gql") as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["message"]


@pytest.mark.slow  # a real Inngest Python SDK app over HTTP
async def test_a_real_python_sdk_run_read_the_way_its_harness_reads_it(
    tmp_path: Path, apps: list[FlaskApp], http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path, clock=VirtualClock()) as server:
        app = await synced_app(server, apps)
        [event_id] = await app.client.send(inngest.Event(name="shop/order.placed",
                                                         data={"items": [5, 7]}))
        runs = (await data(http, server, GET_RUN_IDS, {"event_id": event_id}))["event"][
            "functionRuns"]
        await idle(server)
        got = await data(http, server, GET_RUN, {"run_id": runs[0]["id"]})
        assert got["run"]["status"] == "COMPLETED"
        assert json.loads(got["run"]["output"]) == {"total": 12, "doubled": 24}
        trigger = inngest.Event.model_validate_json(got["runTrigger"]["payloads"][0])
        assert (trigger.id, trigger.data) == (event_id, {"items": [5, 7]})

        spans = (await data(http, server, GET_STEPS, {"run_id": runs[0]["id"]}))["run"][
            "trace"]["childrenSpans"]
        # A repeated step id is one span per repeat, each named by the id (the harness's
        # `get_step_output(step_id="price", index=1)` counts them by name).
        assert [s["name"] for s in spans] == ["price", "price", "cool-off", "receipt",
                                              "Finalization"]
        outputs = [(await data(http, server, GET_OUTPUT, {"output_id": s["outputID"]}))[
            "runTraceSpanOutputByID"]["data"] for s in spans[:2]]
        assert [json.loads(o) for o in outputs] == [12, 24]


async def test_a_post_from_another_origin_is_refused_by_the_guard(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    async with http.post(f"{server.url}/v0/gql", json={"query": "{ events(query: {}) { id } }"},
                         headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
    status, body = await gql(http, server, "{ events(query: {}) { id } }")
    assert (status, body) == (200, {"data": {"events": []}})


async def test_the_typescript_harness_reads_a_result_or_an_error_from_the_finalization_span(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app, _ = retrying_app()
    server = await make_server(app)
    ok_event = await send(http, server, "app/go", {"n": 3})
    bad_event = await send(http, server, "app/fail")
    await idle(server)
    (ok_run,) = (await data(http, server, GET_RUN_IDS, {"event_id": ok_event}))["event"][
        "functionRuns"]
    (bad_run,) = (await data(http, server, GET_RUN_IDS, {"event_id": bad_event}))["event"][
        "functionRuns"]

    result = await ts_run_result(http, server, ok_run["id"])
    assert result["error"] is None
    assert json.loads(result["data"]) == {"first": {"n": 3}, "second": "ok"}

    result = await ts_run_result(http, server, bad_run["id"])
    assert result["data"] is None
    assert (result["error"]["name"], result["error"]["message"]) == ("KeyError", "'missing'")
    assert "broken" in result["error"]["stack"]

    # A run still going has no finalization span yet (the harness polls until it has).
    gate = devserver.App("gate")

    @gate.function(trigger="app/wait")
    async def waits(ctx: devserver.Context) -> None:
        await ctx.step.wait_for_event("hold", event="app/never", timeout="1h")

    waiting = await make_server(gate)
    event_id = await send(http, waiting, "app/wait")
    (run,) = (await data(http, waiting, GET_RUN_IDS, {"event_id": event_id}))["event"][
        "functionRuns"]
    trace = (await data(http, waiting, TS_FIND_FINALIZATION, {"runId": run["id"]}))["run"][
        "trace"]
    assert finalization_output_id(trace) is None
    assert trace["status"] == "RUNNING"


async def test_run_trace_functions_and_function_by_slug(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app, _ = retrying_app()
    server = await make_server(app)
    event_id = await send(http, server, "app/go", {"n": 1})
    await idle(server)
    (run,) = (await data(http, server, GET_RUN_IDS, {"event_id": event_id}))["event"][
        "functionRuns"]
    fns = (await data(http, server, "{ functions { id name slug url triggers { type value } } }"))[
        "functions"]
    by_id = {f["id"]: f for f in fns}
    assert set(by_id) == {"gql-fn", "gql-failing"}
    assert by_id["gql-fn"]["triggers"] == [{"type": "EVENT", "value": "app/go"}]
    assert by_id["gql-fn"]["url"] == ""  # a local function has no SDK URL
    got = await data(http, server, """query($slug: String!, $run: String!) {
      functionBySlug(query: {functionSlug: $slug}) { id name }
      none: functionBySlug(query: {functionSlug: "nope"}) { id }
      runTrace(runID: $run) { isRoot name childrenSpans { name stepOp } }
      run(runID: $run) { function { id name slug } }
    }""", {"slug": "gql-fn", "run": run["id"]})
    assert got["functionBySlug"] == {"id": "gql-fn", "name": by_id["gql-fn"]["name"]}
    assert got["none"] is None
    assert got["runTrace"]["isRoot"] is True
    assert [(c["name"], c["stepOp"]) for c in got["runTrace"]["childrenSpans"]] == [
        ("first", "RUN"), ("flaky", "RUN"), ("Finalization", None)]
    assert got["run"]["function"] == {"id": "gql-fn", "name": by_id["gql-fn"]["name"],
                                      "slug": "gql-fn"}

    status, body = await gql(http, server, '{ runTrace(runID: "01NOPE") { name } }')
    assert (status, body["data"]) == (200, None)
    assert "01NOPE" in body["errors"][0]["message"]


async def test_stream_pages_before_and_after_an_event_and_unknown_event_v2(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    ids = [await send(http, server, "app/tick", {"i": i}) for i in range(5)]
    query = """query($before: ID, $after: ID) {
      stream(query: {limit: 2, before: $before, after: $after}) { id }
    }"""
    page = [i["id"] for i in (await data(http, server, query))["stream"]]
    assert page == [ids[4], ids[3]]
    page = [i["id"] for i in (await data(http, server, query, {"before": ids[3]}))["stream"]]
    assert page == [ids[2], ids[1]]
    page = [i["id"] for i in (await data(http, server, query, {"after": ids[1]}))["stream"]]
    assert page == [ids[3], ids[2]]  # the two just newer, newest first
    got = await data(http, server, "query($last: ID) { events(query: {lastEventId: $last}) "
                                   "{ id } }", {"last": ids[2]})
    assert [e["id"] for e in got["events"]] == [ids[1], ids[0]]

    status, body = await gql(http, server, '{ eventV2(id: "01NOPE") { name } }')
    assert (status, body["data"]) == (200, None)  # EventV2! is non-null, as in Inngest's
    assert "01NOPE" in body["errors"][0]["message"]


@pytest.mark.slow  # a real Inngest TypeScript SDK app (inngest@4 on Node)
@pytest.mark.timeout(300)  # the first npm install
async def test_a_real_typescript_sdk_run_read_the_way_its_harness_reads_it(
    node_modules: Path, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    async with sdk_server(tmp_path, clock=VirtualClock()) as server, \
            node_app(node_modules, server, tmp_path) as app:
        ok_id, bad_id = await app.send(http, [
            {"name": "shop/order.placed", "data": {"items": [1, 2]}}, {"name": "shop/strict"}])
        await idle(server)
        (ok_run,) = (await data(http, server, GET_RUN_IDS, {"event_id": ok_id}))["event"][
            "functionRuns"]
        (bad_run,) = (await data(http, server, GET_RUN_IDS, {"event_id": bad_id}))["event"][
            "functionRuns"]
        result = await ts_run_result(http, server, ok_run["id"])
        assert result["error"] is None
        assert json.loads(result["data"]) == {"total": 3, "doubled": 6, "tax": 0.3,
                                              "shipping": 5}
        result = await ts_run_result(http, server, bad_run["id"])
        assert result["data"] is None
        assert result["error"]["name"] == "NonRetriableError"
        assert result["error"]["message"] == "this order can never be processed"


async def test_metadata_attached_to_a_run_and_a_step_is_on_their_spans(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app, _ = retrying_app()
    server = await make_server(app)
    event_id = await send(http, server, "app/go", {"n": 2})
    await idle(server)
    (run,) = (await data(http, server, GET_RUN_IDS, {"event_id": event_id}))["event"][
        "functionRuns"]
    for target, values in (({}, {"progress": 1}), ({"step_id": "flaky"}, {"rows": 3})):
        async with http.post(f"{server.url}/v1/runs/{run['id']}/metadata", json={
                "target": target,
                "metadata": [{"kind": "progress", "op": "set", "values": values}]}) as resp:
            assert resp.status == 200, await resp.text()
    got = await data(http, server, """query($id: String!) { run(runID: $id) { trace {
      metadata { scope kind values updatedAt }
      childrenSpans { name metadata { scope kind values } }
    } } }""", {"id": run["id"]})
    trace = got["run"]["trace"]
    (run_meta,) = trace["metadata"]
    assert (run_meta["scope"], run_meta["kind"], run_meta["values"]) == (
        "run", "progress", {"progress": 1})
    assert run_meta["updatedAt"]
    by_name = {s["name"]: s["metadata"] for s in trace["childrenSpans"]}
    assert by_name["flaky"] == [{"scope": "step", "kind": "progress", "values": {"rows": 3}}]
    assert by_name["first"] == []
