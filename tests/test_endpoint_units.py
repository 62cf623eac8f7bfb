"""The plain pieces of durable endpoints: the request that continues a run, the run token,
the stream relay's buffer (`devserver.sdk.streams`), and the output document."""

from __future__ import annotations

import json

import pytest

from devserver.model.records import COMPLETED, FAILED, RUNNING, RunRecord
from devserver.sdk.endpoint_calls import (
    DEFAULT_ENDPOINT_RETRIES,
    endpoint_function,
    endpoint_function_id,
    endpoint_request,
    run_token,
    token_run,
)
from devserver.sdk.streams import RunStreams, result_event, sse_event
from devserver.web.endpoint_routes import output_doc

REQUEST = {"domain": "http://127.0.0.1:3000", "method": "POST", "path": "/api/x",
           "query_params": "a=1&b=%20", "body": '{"n": 1}', "content_type": "application/json",
           "fn": ""}


def test_the_continuation_is_the_request_that_started_the_run() -> None:
    req = endpoint_request(REQUEST, "step", force_plan=False)
    assert (req.method, req.url, req.body) == (
        "POST", "http://127.0.0.1:3000/api/x?a=1&b=%20", b'{"n": 1}')
    assert req.headers == {"X-Inngest-Signature": "", "X-Inngest-Force-Step-Plan": "false",
                           "Content-Type": "application/json"}
    planned = endpoint_request({**REQUEST, "method": "get", "query_params": ""}, "abc123",
                               force_plan=True)
    assert (planned.method, planned.url, planned.body) == (
        "GET", "http://127.0.0.1:3000/api/x", None)
    assert planned.headers["X-Inngest-Step-Id"] == "abc123"
    assert planned.headers["X-Inngest-Force-Step-Plan"] == "true"
    with pytest.raises(ValueError, match="no usable domain"):
        endpoint_request({"path": "/x"}, "step", force_plan=False)


def test_endpoint_functions_are_named_and_retried_as_the_sdk_says() -> None:
    assert endpoint_function_id(REQUEST) == "POST /api/x"
    assert endpoint_function_id({**REQUEST, "fn": "checkout"}) == "checkout"
    assert endpoint_function_id({}) == "GET /"
    fn = endpoint_function("POST /api/x", REQUEST, 5)
    assert (fn.endpoint, fn.retries, fn.remote, fn.triggers) == (
        True, 5, "http://127.0.0.1:3000", ())
    for bad in (None, -1, "3", 99, True):
        assert endpoint_function("f", REQUEST, bad).retries == DEFAULT_ENDPOINT_RETRIES


def test_a_token_names_its_run_and_no_other() -> None:
    token = run_token("01J0000000000000000000000A")
    assert token_run(token) == "01J0000000000000000000000A"
    assert token_run(run_token("01J0000000000000000000000B")) != "01J0000000000000000000000A"
    forged = "01J0000000000000000000000A." + "0" * 32
    for bad in ("", "x", "01J0000000000000000000000A", forged, token + "0"):
        assert token_run(bad) is None


def test_the_relay_hands_out_whole_events_up_to_the_result() -> None:
    streams = RunStreams()
    with streams.publishing("r"):
        assert streams.open("r")
        data = sse_event("inngest.stream", {"data": "a"})
        streams.publish("r", data[:10])
        assert streams.read("r", 0) == (b"", 0, False)  # half an event: nothing yet
        streams.publish("r", data[10:])
        chunk, offset, answered = streams.read("r", 0)
        assert (chunk, answered) == (data, False)
        result = sse_event("inngest.response", {"status": "succeeded"})
        streams.publish("r", result + sse_event("inngest.stream", {"data": "late"}))
        chunk, offset, answered = streams.read("r", offset)
        assert (chunk, answered) == (result, True)  # nothing after the result
        assert streams.read("r", offset) == (b"", offset, True)
    assert not streams.open("r")
    assert streams.read("unknown", 0) == (b"", 0, False)


def test_the_relay_is_bounded() -> None:
    streams = RunStreams(max_channels=2, max_bytes=100)
    event = sse_event("inngest.stream", {"data": "x" * 40})
    streams.publish("a", event)
    streams.publish("a", event)  # past 100 bytes: dropped
    assert streams.read("a", 0)[0] == event
    streams.publish("b", event)
    streams.publish("c", event)  # a third run: the oldest is forgotten
    assert streams.read("a", 0)[0] == b""
    assert streams.read("c", 0)[0] == event


def _run(status: str, output: object = None, error: dict[str, object] | None = None,
         ) -> RunRecord:
    return RunRecord(
        run_id="R", env="dev", function_id="GET /x", event_id="E", event_name="e",
        status=status, attempt=0, queued_at=0, started_at=0, ended_at=0, next_at=None,
        output=output,
        error=error, sessions={})


def test_the_output_and_the_result_event_of_a_run() -> None:
    response = {"status": 202, "headers": {"x-a": "1"}, "body": '"ok"'}
    done = _run(COMPLETED, response)
    assert output_doc(done, 300) == {"data": response}
    event = result_event(done).decode()
    assert event.startswith("event: inngest.response\n")
    assert json.loads(event.split("data: ")[1]) == {"status": "succeeded", "response": {
        "body": '"ok"', "headers": {"x-a": "1"}, "statusCode": 202}}
    error = {"name": "Error", "message": "boom", "stack": "at x"}
    failed = _run(FAILED, error=error)
    assert output_doc(failed, 300) == error
    assert json.loads(json.loads(result_event(failed).decode().split("data: ")[1])
                      ["response"]["body"]) == error
    assert output_doc(_run(RUNNING), 300)["status"] == "running"
