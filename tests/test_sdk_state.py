"""The routes an SDK reads and checkpoints a run's state through (`devserver.web.sdk_state`),
driven over HTTP against a real server: `/v0/runs/{id}/actions` and `/batch` in the shape the
SDKs parse, a checkpoint for a call not in flight refused with 409, bad bodies refused with
the one error shape, unknown runs 404. The real SDKs use them in test_sdk_ts.py and
test_sdk_parallel.py."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
import pytest

import devserver

from .helpers import MakeServer, get_json, idle, post, send, the_run

pytestmark = pytest.mark.asyncio


async def test_actions_and_batch_serve_a_runs_memo_and_events_as_the_sdks_read_them(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    app = devserver.App("st")

    @app.function(trigger="st/go", retries=0)
    async def go(ctx: devserver.Context) -> Any:
        first = await ctx.step.run("first", lambda: {"n": 1})
        return [first, await ctx.step.run("first", lambda: 2)]

    server = await make_server(app)
    event_id = await send(http, server, "st/go", {"k": "v"}, sessions={"conversation_id": "c1"})
    await idle(server)
    run = await the_run(http, server, event_id)
    status, memo = await get_json(http, server, f"/v0/runs/{run['run_id']}/actions")
    assert status == 200
    sha = [hashlib.sha1(text.encode()).hexdigest() for text in ("first", "first:1")]
    assert memo == {sha[0]: {"data": {"n": 1}}, sha[1]: {"data": 2}}
    status, batch = await get_json(http, server, f"/v0/runs/{run['run_id']}/batch")
    assert status == 200
    [event] = batch
    assert (event["name"], event["data"], event["meta"]) == (
        "st/go", {"k": "v"}, {"sessions": {"conversation_id": "c1"}})
    assert isinstance(event["ts"], int)

    for path in ("/v0/runs/NOPE/actions", "/v0/runs/NOPE/batch"):
        status, body = await get_json(http, server, path)
        assert (status, body["status"]) == (404, 404)
        assert "NOPE" in body["error"]


async def test_checkpoints_for_calls_not_in_flight_and_bad_bodies_are_refused(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    server = await make_server()
    step = {"op": "StepRun", "id": "a" * 40, "data": 1}
    status, body = await post(http, server, "/v1/checkpoint/01J0000000000000000000000R/async",
                              {"qi_id": "CALL", "steps": [step]})
    assert status == 409  # the SDK stops there: StaleDispatchError
    assert "not in flight" in body["error"]
    for bad, says in (([], "JSON object"), ({"steps": [step]}, "qi_id"),
                      ({"qi_id": "CALL", "steps": [{"op": "StepRun"}]}, "'steps'")):
        status, body = await post(http, server, "/v1/checkpoint/R/async", bad)
        assert status == 400, body
        assert says in body["error"]
    status, body = await post(http, server, "/v1/checkpoint/01J0000000000000000000000R/steps",
                              {"steps": [step]})
    assert status == 404
    status, body = await post(http, server, "/v1/checkpoint", {"run_id": "nope", "event": {}})
    assert status == 400
    assert "run_id" in body["error"]
