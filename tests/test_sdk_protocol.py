"""The Inngest SDK protocol as plain data: step ids, the memo and call body, reading answers,
times in opcodes, seeded event ids, registrations. No server, no SDK process."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import warnings
from typing import Any

import pytest

from devserver.app import NonRetriableError, RetryAfterError
from devserver.errors import UserError
from devserver.ids import is_ulid, ulid_time_ms
from devserver.model.failures import (
    MAX_ERROR_CHARS,
    error_info,
    failure_event_error,
    reported_error,
    stored_error,
)
from devserver.model.metadata import op_metadata
from devserver.model.records import COMPLETED, FAILED, StepAttempt, StoredEvent
from devserver.model.triggers import CronTrigger
from devserver.sdk.apps import normalize_url
from devserver.sdk.callbody import call_body, encode_call, function_uuid
from devserver.sdk.gateway import canonical_header, gateway_answer, gateway_request
from devserver.sdk.protocol import (
    Op,
    ProtocolError,
    SdkError,
    SdkNonRetriableError,
    SdkRetryAfterError,
    call_url,
    error_doc,
    hash_step_id,
    memo_key,
    memo_value,
    parse_ops,
    parse_retry_after,
    read_reply,
    sdk_error,
    seeded_ids,
    sleep_until_ms,
    step_uid,
    timeout_seconds,
)
from devserver.sdk.registration import parse_registration

with warnings.catch_warnings():
    # inngest 0.5.19 declares pydantic models with v1-style `class Config` (deprecated).
    warnings.simplefilter("ignore", DeprecationWarning)
    from inngest._internal.server_lib import ServerRequest

NOW = 1_800_000_000_000
SDK = {"X-Inngest-SDK": "js:v4.24.0"}


class Headers(dict[str, str]):
    """Case-insensitive lookups, as aiohttp's response headers have."""

    def get(self, key: str, default: Any = None) -> Any:
        return next((v for k, v in self.items() if k.lower() == key.lower()), default)


def event(**sessions: str) -> StoredEvent:
    return StoredEvent(internal_id="01J0000000000000000000000A", env="dev", name="app/x",
                       event_id=None, ts=NOW, received_at=NOW, data={"k": 1}, v=None,
                       user=None, meta=None, sessions=sessions, duplicate=False)


def record(uid: str, kind: str = "run", output: Any = None,
           error: dict[str, Any] | None = None, ended: int = 2) -> StepAttempt:
    return StepAttempt(1, uid, kind, 0, FAILED if error else COMPLETED, 1, ended, output,
                       error, True)


# -- step ids ---------------------------------------------------------------------------------


def test_step_ids_are_sha1_and_repeats_hash_with_an_index() -> None:
    assert hash_step_id("a") == hashlib.sha1(b"a").hexdigest()
    assert memo_key("load") == hash_step_id("load")
    assert memo_key("load:2") == hash_step_id("load:2")
    raw = hash_step_id("x")
    assert memo_key(raw) == raw  # a step recorded under its hash keeps it


def test_a_step_is_recorded_under_the_users_id_verified_against_the_hash() -> None:
    assert step_uid(Op("StepRun", hash_step_id("load"), userland_id="load")) == "load"
    assert step_uid(Op("StepRun", hash_step_id("load:2"), display_name="load")) == "load:2"
    assert step_uid(Op("StepRun", hash_step_id("load:7"), userland_id="load",
                       userland_index=7)) == "load:7"
    unknown = hash_step_id("something else")
    assert step_uid(Op("StepRun", unknown, userland_id="load")) == unknown
    hexlike = "ab" * 20  # a user id that looks like a hash is kept as the hash
    assert step_uid(Op("StepRun", hash_step_id(hexlike), userland_id=hexlike)) == \
        hash_step_id(hexlike)
    for op in (Op("StepRun", hash_step_id("load:2"), userland_id="load"),
               Op("StepRun", unknown), Op("StepRun", hash_step_id(hexlike), name=hexlike)):
        assert memo_key(step_uid(op)) == op.id


# -- memo and call body -----------------------------------------------------------------------


def test_memo_shapes_per_step_kind() -> None:
    assert memo_value(record("a", output={"x": 1})) == {"data": {"x": 1}}
    assert memo_value(record("a", output=None)) == {"data": None}
    # A failed step's error goes back as stored: every key the SDK sent, none added...
    sent = {"name": "StepError", "message": "no", "stack": "s", "code": "step_errored",
            "cause": {"name": "ValueError", "message": "inner"}}
    assert memo_value(record("a", error=sent)) == {"error": sent}
    assert memo_value(record("a", error={"name": "E", "message": "m"})) == {
        "error": {"name": "E", "message": "m"}}  # no "stack": null
    # ...but with the name and message both SDKs require.
    assert memo_value(record("a", error={"code": "x"})) == {
        "error": {"code": "x", "name": "Error", "message": ""}}
    assert memo_value(record("nap", kind="sleep")) is None
    assert memo_value(record("w", kind="wait_for_event")) is None
    waited = {"name": "app/ok", "data": {"a": 1}, "id": "", "ts": NOW, "v": None, "user": {},
              "sessions": {"c": "1"}, "internal_id": "01J0000000000000000000000C"}
    assert memo_value(record("w", kind="wait_for_event", output=waited)) == {
        "name": "app/ok", "data": {"a": 1}, "id": "01J0000000000000000000000C", "ts": NOW,
        "user": {}, "meta": {"sessions": {"c": "1"}}}
    assert memo_value(record("i", kind="invoke", output=5)) == {"data": 5}


def test_call_body_is_exactly_what_the_sdks_expect() -> None:
    memo = {"second": record("second", output=2, ended=9),
            "first": record("first", output=1, ended=5)}
    body = call_body(events=[event(conversation_id="c1")], memo=memo, run_id="RUN",
                     attempt=2, max_attempts=5, disable_immediate_execution=True,
                     fn_id=function_uuid("app-fn"), qi_id="CALL")
    assert set(body) == {"event", "events", "steps", "ctx", "version", "use_api"}
    assert body["version"] == -1
    assert body["use_api"] is False
    assert body["event"] == {"name": "app/x", "data": {"k": 1},
                             "id": "01J0000000000000000000000A", "ts": NOW, "user": {},
                             "meta": {"sessions": {"conversation_id": "c1"}}}
    assert body["events"] == [body["event"]]
    order = [hash_step_id("first"), hash_step_id("second")]  # completion order
    assert list(body["steps"]) == order
    assert body["ctx"] == {
        "run_id": "RUN", "attempt": 2, "max_attempts": 5, "env": "",
        "stack": {"stack": order, "current": 2}, "disable_immediate_execution": True,
        "use_api": False, "fn_id": function_uuid("app-fn"), "step_id": "step",
        "qi_id": "CALL"}  # fn_id and qi_id: the TypeScript SDK checkpoints with them
    assert function_uuid("app-fn") == function_uuid("app-fn") != function_uuid("app-gn")


def test_a_call_says_use_api_once_its_memo_or_its_body_passes_the_limit() -> None:
    def encode(memo: dict[str, StepAttempt], events: int = 1) -> tuple[dict[str, Any], bool]:
        raw, use_api = encode_call(
            events=[event(conversation_id="c1")] * events, memo=memo, run_id="RUN",
            attempt=0, max_attempts=1, disable_immediate_execution=False, fn_id="F",
            qi_id="Q", max_bytes=10_000)
        doc = json.loads(raw)
        assert doc["use_api"] is doc["ctx"]["use_api"] is use_api
        return doc, use_api

    small = {"a": record("a", output="x" * 100)}
    doc, use_api = encode(small)
    assert not use_api
    assert doc == call_body(events=[event(conversation_id="c1")], memo=small, run_id="RUN",
                            attempt=0, max_attempts=1, disable_immediate_execution=False,
                            fn_id="F", qi_id="Q")
    # A memo over the limit (less 1 KiB) stays out; the stack and the events stay in.
    doc, use_api = encode({"a": record("a", output="x" * 9_500)})
    assert use_api
    assert doc["steps"] == {}
    assert doc["ctx"]["stack"]["stack"] == [hash_step_id("a")]
    assert len(doc["events"]) == 1
    # A body still too large (many events) leaves the events out too, but not `event`.
    doc, use_api = encode(small, events=100)
    assert use_api
    assert (doc["steps"], doc["events"]) == ({}, [])
    assert doc["event"]["name"] == "app/x"


def test_the_call_body_passes_the_python_sdks_own_validation() -> None:
    memo = {"load": record("load", output={"ok": 1})}
    body = call_body(events=[event(conversation_id="c1")], memo=memo, run_id="RUN",
                     attempt=1, max_attempts=5, disable_immediate_execution=False)
    request = ServerRequest.from_raw(body)
    assert not isinstance(request, Exception), request
    assert request.event.id == "01J0000000000000000000000A"
    assert request.event.ts == NOW
    assert request.ctx.attempt == 1
    assert request.ctx.max_attempts == 5
    assert request.steps == {hash_step_id("load"): {"data": {"ok": 1}}}


def test_call_url_sets_the_step_id() -> None:
    url = "http://127.0.0.1:3000/api/inngest?fnId=app-fn&stepId=step"
    assert call_url(url, "step") == url
    assert call_url(url, "abc") == "http://127.0.0.1:3000/api/inngest?fnId=app-fn&stepId=abc"
    assert call_url("http://h/api?fnId=a%20b", "x") == "http://h/api?fnId=a+b&stepId=x"


# -- answers ----------------------------------------------------------------------------------


def test_200_is_the_output_and_206_the_opcodes() -> None:
    assert read_reply(200, Headers(SDK), b'{"ok":true}', NOW).output == {"ok": True}
    assert read_reply(200, Headers(SDK), b"", NOW).output is None
    reply = read_reply(206, Headers(SDK), b'''[{"op":"StepRun","id":"h","name":"load",
        "displayName":"Load","data":{"a":1},"userland":{"id":"load","index":2},"extra":1}]''',
                       NOW)
    assert reply.ops == [Op("StepRun", "h", "load", "Load", {}, {"a": 1}, None, "load", 2)]
    assert read_reply(206, Headers(SDK), b'{"op":"RunComplete","id":"h","data":3}',
                      NOW).ops == [Op("RunComplete", "h", data=3)]


def test_answers_that_are_not_from_an_sdk_or_not_usable_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="without an X-Inngest-SDK header") as missing:
        read_reply(200, Headers(), b"{}", NOW)
    assert missing.value.retriable
    with pytest.raises(ProtocolError, match="not valid JSON"):
        read_reply(206, Headers(SDK), b"<html>", NOW)
    with pytest.raises(ProtocolError, match="has no 'op'"):
        parse_ops([{"id": "x"}])
    with pytest.raises(ProtocolError, match="has no step 'id'"):
        parse_ops([{"op": "StepRun"}])
    with pytest.raises(ProtocolError, match="JSON array of opcodes"):
        parse_ops("nope")


def test_errors_no_retry_and_retry_after() -> None:
    python = read_reply(500, Headers({**SDK, "x-inngest-no-retry": "true"}),
                        b'{"code":"non_retriable_error","message":"no","name":"NonRetriableError",'
                        b'"stack":"Traceback"}', NOW)
    assert python.error == {"code": "non_retriable_error", "message": "no",
                            "name": "NonRetriableError", "stack": "Traceback"}  # verbatim
    assert python.reason == "invalid status code: 500"
    assert python.no_retry
    ts = read_reply(500, Headers({**SDK, "X-Inngest-No-Retry": "false", "Retry-After": "30"}),
                    b'{"name":"Error","message":"later","__serialized":true}', NOW)
    assert (ts.no_retry, ts.retry_at_ms) == (False, NOW + 30_000)
    plain = read_reply(502, Headers(), b"Bad Gateway", NOW)
    assert plain.error == {"name": "Error", "message": "the app answered HTTP 502: Bad Gateway"}
    assert error_doc({"error": "boom"}) == {"error": "boom"}
    assert error_doc({"code": "output_unserializable", "message": "m", "name": "E"}) == {
        "code": "output_unserializable", "message": "m", "name": "E"}  # no stack added
    # X-Inngest-No-Retry counts on a 206 too (a StepError the SDK says not to retry).
    step = read_reply(206, Headers({**SDK, "x-inngest-no-retry": "true"}),
                      b'[{"op":"StepError","id":"h","error":{"name":"E","message":"m",'
                      b'"code":"step_nested"}}]', NOW)
    assert step.no_retry
    assert step.ops is not None
    assert step.ops[0].error == {"name": "E", "message": "m", "code": "step_nested"}
    later_step = read_reply(206, Headers({**SDK, "Retry-After": "5"}),
                            b'[{"op":"StepError","id":"h","error":{}}]', NOW)
    assert (later_step.no_retry, later_step.retry_at_ms) == (False, NOW + 5000)


def test_retry_after_in_seconds_http_dates_and_iso_dates() -> None:
    assert parse_retry_after("2", NOW) == NOW + 2000
    assert parse_retry_after("2.5", NOW) == NOW + 2500
    later = dt.datetime.fromtimestamp(NOW / 1000 + 3600, tz=dt.UTC)
    assert parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT"), NOW) == NOW + 3_600_000
    assert parse_retry_after(later.isoformat().replace("+00:00", "Z"), NOW) == NOW + 3_600_000
    assert parse_retry_after("2000-01-01T00:00:00Z", NOW) == NOW  # past: at once
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("1e308", NOW) is None
    assert parse_retry_after("nan", NOW) is None
    assert parse_retry_after(None, NOW) is None


def test_the_python_sdks_streamed_answer_is_unwrapped() -> None:
    inner = b'{"status": 206, "headers": {"x-inngest-no-retry": "false"}, ' \
            b'"body": "[{\\"op\\": \\"Sleep\\", \\"id\\": \\"h\\", \\"name\\": \\"1s\\"}]"}'
    reply = read_reply(201, Headers(SDK), b"   " + inner, NOW)
    assert reply.ops == [Op("Sleep", "h", "1s")]


def test_sdk_errors_become_the_exceptions_the_runner_retries_by() -> None:
    doc = {"name": "E", "message": "m", "stack": None}
    assert type(sdk_error(doc, no_retry=False, retry_at_ms=None)) is SdkError
    final = sdk_error(doc, no_retry=True, retry_at_ms=NOW)
    assert isinstance(final, SdkNonRetriableError)
    assert isinstance(final, NonRetriableError)
    later = sdk_error(doc, no_retry=False, retry_at_ms=NOW + 5000)
    assert isinstance(later, SdkRetryAfterError)
    assert isinstance(later, RetryAfterError)
    assert later.retry_at_ms(NOW) == NOW + 5000
    assert error_info(later) == doc  # stored as the SDK reported it


# -- times ------------------------------------------------------------------------------------


def test_sleep_ends_from_durations_and_dates() -> None:
    assert sleep_until_ms(Op("Sleep", "h", name="3s"), NOW) == NOW + 3000
    assert sleep_until_ms(Op("Sleep", "h", name="1h30m"), NOW) == NOW + 5_400_000
    assert sleep_until_ms(Op("Sleep", "h", name="x", opts={"duration": "1d"}), NOW) == \
        NOW + 86_400_000
    assert sleep_until_ms(Op("Sleep", "h", name="2027-01-15T08:00:00.000Z"), NOW) == \
        int(dt.datetime(2027, 1, 15, 8, tzinfo=dt.UTC).timestamp() * 1000)
    with pytest.raises(ProtocolError, match="can't tell when it ends"):
        sleep_until_ms(Op("Sleep", "h", name="whenever"), NOW)
    assert timeout_seconds("1h", NOW, "t") == 3600
    assert timeout_seconds(None, NOW, "t") is None
    assert timeout_seconds(dt.datetime.fromtimestamp(NOW / 1000 + 60, tz=dt.UTC).isoformat(),
                           NOW, "t") == 60
    with pytest.raises(ProtocolError, match="not a duration or a date"):
        timeout_seconds("later", NOW, "t")


# -- seeded event ids -------------------------------------------------------------------------


def test_seeded_ids_are_ulids_of_the_seed_and_differ_per_event() -> None:
    seed = f"{NOW},{base64.b64encode(bytes([0] * 6 + [255] * 4)).decode()}"
    ids = seeded_ids(seed, 3)
    assert ids is not None
    assert ids == seeded_ids(seed, 3)
    assert len(set(ids)) == 3
    assert all(is_ulid(i) and ulid_time_ms(i) == NOW for i in ids)
    assert ids[1] < ids[0]  # the index is added to the last 4 bytes, wrapping like Inngest's
    for bad in (None, "", "abc", f"{NOW}", f"{NOW},notbase64!", f"0,{seed.split(',')[1]}",
                f"{NOW},{base64.b64encode(b'short').decode()}"):
        assert seeded_ids(bad, 1) is None


def test_app_urls_compare_by_their_usual_spellings() -> None:
    assert normalize_url("http://localhost:3000/api/inngest/") == \
        normalize_url("HTTP://127.0.0.1:3000/api/inngest?x=1")
    assert normalize_url("http://127.0.0.1:80/") == "http://127.0.0.1/"
    assert normalize_url("http://a:3000/x") != normalize_url("http://a:3001/x")


# -- registration -----------------------------------------------------------------------------


def config(fn_id: str = "app-fn", **extra: Any) -> dict[str, Any]:
    return {"id": fn_id, "name": "Fn", "triggers": [{"event": "app/x"}],
            "steps": {"step": {"id": "step", "name": "step",
                               "runtime": {"type": "http",
                                           "url": f"http://h/api?fnId={fn_id}&stepId=step"}}},
            **extra}


def registration(*functions: dict[str, Any], name_key: str = "appName") -> dict[str, Any]:
    return {"url": "http://h/api", name_key: "app", "sdk": "js:v4.24.0", "framework": "nodehttp",
            "functions": list(functions), "deployType": "ping", "v": "0.1"}


def test_a_registration_becomes_remote_functions() -> None:
    failure = {**config("app-fn-failure"), "triggers": [
        {"event": "inngest/function.failed", "expression": "event.data.function_id == 'app-fn'"}]}
    reg = parse_registration(registration(
        config(retries=None, cancel=[{"event": "app/stop", "if": "event.data.id == async.data.id",
                                      "timeout": "1h"}], concurrency=[{"limit": 1}],
               triggers=[{"event": "app/*", "expression": "event.data.n > 1"},
                         {"cron": "TZ=Europe/Paris 0 9 * * *", "jitter": "1m"}]),
        failure, name_key="appname"))
    assert (reg.app_id, reg.sdk, reg.framework) == ("app", "js:v4.24.0", "nodehttp")
    fn, handler = reg.functions
    assert (fn.id, fn.app_id, fn.retries, fn.remote) == (
        "app-fn", "app", 4, "http://h/api?fnId=app-fn&stepId=step")
    assert [t.doc() for t in fn.triggers] == [
        {"event": "app/*", "expression": "event.data.n > 1"},
        {"cron": "TZ=Europe/Paris 0 9 * * *"}]
    assert isinstance(fn.triggers[1], CronTrigger)
    assert fn.cancel_on[0].event.event == "app/stop"
    assert reg.ignored == {}  # flow control is emulated: nothing is ignored
    assert fn.flow is not None
    assert [(c.limit, c.scope) for c in fn.flow.concurrency] == [
        (1, "fn")]
    assert handler.triggers[0].accepts({"name": "inngest/function.failed",
                                        "data": {"function_id": "app-fn"}})
    assert parse_registration(registration(config())).checksum == \
        parse_registration(registration(config())).checksum
    assert parse_registration(registration(config())).checksum != reg.checksum


def test_retries_come_from_the_step_config() -> None:
    cfg = config()
    cfg["steps"]["step"]["retries"] = {"attempts": 0}
    assert parse_registration(registration(cfg)).functions[0].max_attempts == 1


@pytest.mark.parametrize(("body", "message"), [
    ([], "must be a JSON object"),
    ({"url": "http://h"}, re.escape("'appname' (or 'appName')")),
    ({"appName": "a", "url": "ftp://h"}, re.escape("'url' must be the app's http(s) URL")),
    (registration(config(triggers=[{"event": "a*b"}])), r"functions\[0\].triggers\[0\]: .*"
                                                         "wildcard"),
    (registration(config(triggers=[{"cron": "99 * * * *"}])), "invalid cron"),
    (registration(config(triggers=[{"event": "a", "expression": "event.data. =="}])),
     "invalid expression"),
    (registration(config(steps={})), r"functions\[0\].steps.step: missing"),
    (registration(config(), config()), "two functions have the id 'app-fn'"),
    (registration({**config(), "steps": {"step": {"runtime": {"url": "http://h",
                                                               "type": "http"},
                                                   "retries": {"attempts": 21}}}}),
     "from 0 to 20"),
    (registration(config(cancel=[{"if": "x"}])), r"cancel\[0\]: must be an object with an "),
])
def test_bad_registrations_say_what_and_where(body: Any, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_registration(body)


def test_the_failed_events_error_is_inngests_shape() -> None:
    sent = {"code": "unknown", "message": "boom", "name": "MyError", "stack": "Traceback..."}
    assert failure_event_error(sent, "invalid status code: 500") == {
        "error": "invalid status code: 500", "message": "boom", "name": "MyError",
        "stack": "Traceback..."}  # no `code`: Inngest's four keys
    # No stack: none added; no reason: the error's own words.
    assert failure_event_error({"name": "E", "message": "m"}) == {
        "error": "E: m", "name": "E", "message": "m"}
    # An error's own `error` string wins; one nested under `error` or `body` is read.
    assert failure_event_error({"error": "kaput", "message": "m"}, "invalid status code: 502")[
        "error"] == "kaput"
    assert failure_event_error({"body": '{"name": "Inner", "message": "deep"}'}, "r") == {
        "error": "r", "name": "Inner", "message": "deep"}
    assert failure_event_error({}, "invalid status code: 500") == {
        "error": "invalid status code: 500", "name": "Error",
        "message": "invalid status code: 500"}


def test_a_reported_error_is_kept_but_its_text_is_capped() -> None:
    huge = "x" * (MAX_ERROR_CHARS * 2)
    kept = reported_error({"name": "E", "message": huge, "stack": huge, "code": 7,
                           "cause": {"name": "C", "message": "inner"}}, "fallback")
    assert (kept["name"], kept["code"], kept["cause"]) == ("E", 7, {"name": "C",
                                                                      "message": "inner"})
    assert len(kept["message"]) < len(huge)
    assert len(kept["stack"]) < len(huge)
    assert reported_error("plain text", "fallback") == {"name": "Error", "message": "plain text"}
    assert reported_error(None, "fallback") == {"name": "Error", "message": "fallback"}
    assert stored_error("E", "m") == {"name": "E", "message": "m"}


def test_an_ai_gateway_opcode_becomes_the_request_inngest_makes() -> None:
    opts = {"url": "https://models.test/v1/chat", "auth_key": "k", "format": "openai-chat",
            "headers": {"x-extra": "1"}, "body": {"model": "m", "messages": []}}
    request = gateway_request(opts)
    assert (request.url, request.body) == ("https://models.test/v1/chat",
                                           b'{"model": "m", "messages": []}')
    assert request.headers == {"Content-Type": "application/json", "Authorization": "Bearer k",
                               "X-Extra": "1"}
    assert gateway_request({**opts, "format": "anthropic"}).headers["X-Api-Key"] == "k"
    # Names as Go's net/http writes them; a name that is not a token is left alone.
    assert [canonical_header(n) for n in ("x-my-header", "ANTHROPIC-VERSION", "etag", "a b")] \
        == ["X-My-Header", "Anthropic-Version", "Etag", "a b"]
    assert gateway_request({**opts, "format": "bedrock"}).headers["Authorization"] == "k"
    gemini = gateway_request({**opts, "url": "https://g.test/m?alt=sse", "format": "gemini"})
    assert gemini.url == "https://g.test/m?alt=sse&key=k"
    assert "Authorization" not in gemini.headers
    with pytest.raises(ProtocolError, match=r"opts\.url"):
        gateway_request({"body": {}})
    assert gateway_answer(200, '{"a": 1}').data == {"a": 1}
    assert gateway_answer(200, "plain").data == "plain"
    assert gateway_answer(429, "").error == {
        "name": "Error making AI request: unsuccessful status code: 429",
        "message": '{"error":"Error making AI request"}'}
    assert gateway_answer(None, "", "connection refused").error == {
        "name": "Error making AI request: connection refused",
        "message": '{"error":"Error making AI request"}'}


def test_deferred_runs_are_told_as_defers_not_steps() -> None:
    memo = {
        "work": record("work", output=7, ended=1),
        "score-it": record("score-it", kind="defer", ended=2, output={
            "fn_slug": "app-scorer", "input": {"points": 3}, "aborted": False}),
        "drop-it": record("drop-it", kind="defer", ended=3, output={
            "fn_slug": "app-scorer", "input": {}, "aborted": True}),
    }
    body = call_body(events=[], memo=memo, run_id="r", attempt=0, max_attempts=1,
                     disable_immediate_execution=False)
    assert list(body["steps"]) == [hash_step_id("work")]
    assert body["ctx"]["stack"]["stack"] == [hash_step_id("work")]
    assert body["defers"] == {hash_step_id("score-it"): {"abortable": True}}
    plain = call_body(events=[], memo={"work": memo["work"]}, run_id="r", attempt=0,
                      max_attempts=1, disable_immediate_execution=False)
    assert "defers" not in plain  # only sent when there are some


def test_metadata_riding_an_opcode_is_read_by_the_apis_rules() -> None:
    entries = [{"kind": "userland.a", "scope": "step", "op": "set", "values": {"x": 1}},
               {"kind": "userland.b", "scope": "run", "op": "merge", "values": {}},
               {"kind": "inngest.secret", "scope": "run", "op": "set", "values": {}},
               {"kind": "userland.c", "op": "set", "values": "not an object"}, "junk"]
    assert [u.doc() for u in op_metadata(entries, "work", 2)] == [
        {"scope": "step", "step_id": "work", "step_attempt": 2, "kind": "userland.a",
         "op": "set", "values": {"x": 1}},
        {"scope": "run", "step_id": None, "step_attempt": None, "kind": "userland.b",
         "op": "merge", "values": {}}]
    assert op_metadata(None, "work", 0) == []
    [op] = parse_ops([{"op": "StepRun", "id": "h", "metadata": entries[:1]}])
    assert op.metadata == entries[:1]
