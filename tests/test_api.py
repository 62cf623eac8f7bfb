"""HTTP-level tests of the event API and the JSON API (SPEC 2.1-2.3, 5) against a real server.

Every test starts its own server (`make_server`: port 0, its own SQLite file) and talks to it
over HTTP with aiohttp. Rejected requests are checked three ways: the status, the JSON body,
and that nothing was stored (no environment, no session, no run, no function call).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import re
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from devserver import App, Context
from devserver.web.server import Server

from .helpers import (
    MakeServer,
    get,
    get_json,
    idle,
    post_events,
    run_doc,
    runs_of_event,
    session_doc,
)

ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
TS_MIN_MS = 315_532_800_000  # 1980-01-01T00:00:00Z
TS_MAX_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z, excluded
MAX_EVENT_BYTES = 3 * 1024 * 1024
NO_FUNCTION = "test/none"  # an event name no function listens to

pytestmark = pytest.mark.asyncio


# ---------------------------------------------------------------------------------------------
# Functions


class Calls:
    """What the test app's functions did, recorded by the functions themselves."""

    def __init__(self) -> None:
        self.invocations: list[tuple[str, str]] = []  # (function, event internal id)
        self.wobbles: dict[str, int] = {}  # run id -> attempts of the flaky step
        self.lock = threading.Lock()

    def record(self, function: str, ctx: Context) -> None:
        with self.lock:
            self.invocations.append((function, ctx.event.internal_id))

    def count(self, function: str | None = None) -> int:
        return sum(1 for fn, _ in self.invocations if function in (None, fn))


def make_app() -> tuple[App, Calls]:
    """A small app: async + step, failing (1 retry), sync + step, and a step that fails once."""
    app = App("api")
    calls = Calls()

    def double(n: int) -> int:
        return n * 2

    def in_thread() -> str:
        return "from-thread"

    def wobble(run_id: str) -> str:
        with calls.lock:
            calls.wobbles[run_id] = calls.wobbles.get(run_id, 0) + 1
            first = calls.wobbles[run_id] == 1
        if first:
            raise RuntimeError("first try fails")
        return "steady"

    @app.function(trigger="test/ok", retries=0)
    async def ok(ctx: Context) -> dict[str, Any]:
        calls.record("ok", ctx)
        doubled = await ctx.step.run("double", double, ctx.event.data.get("n", 1))
        return {"doubled": doubled, "sessions": ctx.sessions}

    @app.function(trigger="test/boom", retries=1)
    async def boom(ctx: Context) -> None:
        calls.record("boom", ctx)
        raise ValueError(f"boom {ctx.event.data.get('why', '')}".strip())

    @app.function(trigger="test/sync")
    def sync_job(ctx: Context) -> dict[str, Any]:
        calls.record("sync", ctx)
        step = ctx.step.run("in-thread", in_thread)
        return {"step": step, "main_thread": threading.current_thread() is threading.main_thread()}

    @app.function(trigger="test/flaky", retries=2)
    async def flaky(ctx: Context) -> dict[str, Any]:
        calls.record("flaky", ctx)
        return {"result": await ctx.step.run("wobble", wobble, ctx.run_id)}

    return app, calls


# ---------------------------------------------------------------------------------------------
# Helpers


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


async def start(make_server: MakeServer) -> tuple[Server, Calls]:
    app, calls = make_app()
    return await make_server(app), calls


async def post_large(
    http: aiohttp.ClientSession, server: Server, raw: bytes
) -> tuple[int, dict[str, Any]]:
    """POST a large raw body as a stream (aiohttp warns about large bytes bodies)."""
    async with http.post(f"{server.url}/e/test-key", data=io.BytesIO(raw),
                         headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


async def post_ok(
    http: aiohttp.ClientSession, server: Server, body: Any = None, *, env: str | None = None,
    raw: bytes | None = None,
) -> list[str]:
    """POST events that must be accepted; returns their ids."""
    if raw is not None and len(raw) > 1024 * 1024:
        status, doc = await post_large(http, server, raw)
    else:
        status, doc = await post_events(http, server, body, env=env, raw=raw)
    assert status == 200, doc
    assert doc["status"] == 200, doc
    assert set(doc) == {"ids", "status"}, doc
    return list(doc["ids"])


async def post_rejected(
    http: aiohttp.ClientSession, server: Server, body: Any = None, *, raw: bytes | None = None,
    status: int = 400, fragments: Sequence[str] = (), env: str | None = None,
) -> str:
    """POST a request that must be refused with `status` and the event API's error shape."""
    if raw is not None and len(raw) > 1024 * 1024:
        code, doc = await post_large(http, server, raw)
    else:
        code, doc = await post_events(http, server, body, raw=raw, env=env)
    assert code == status, doc
    assert doc["ids"] == [], doc
    assert doc["status"] == status, doc
    assert isinstance(doc["error"], str), doc
    assert doc["error"], doc
    for fragment in fragments:
        assert fragment in doc["error"], (fragment, doc["error"])
    return str(doc["error"])


async def api_error(
    http: aiohttp.ClientSession, server: Server, path: str, status: int, **params: str
) -> str:
    """GET that must fail with `status` and `{"status": N, "error": "..."}`."""
    code, doc = await get_json(http, server, path, **params)
    assert code == status, (path, params, doc)
    assert doc["status"] == status, doc
    assert isinstance(doc["error"], str), doc
    assert doc["error"], doc
    return str(doc["error"])


async def environments(http: aiohttp.ClientSession, server: Server) -> dict[str, int]:
    """env -> number of events stored there."""
    doc = await get(http, server, "/api/environments")
    return {e["env"]: e["events"] for e in doc["environments"]}


async def identifiers(
    http: aiohttp.ClientSession, server: Server, env: str = "dev"
) -> dict[str, int]:
    """identifier -> number of session values, in `env`."""
    doc = await get(http, server, "/api/sessions", env=env)
    return {i["identifier"]: i["sessions"] for i in doc["identifiers"]}


async def session_rows(
    http: aiohttp.ClientSession, server: Server, identifier: str, **params: str
) -> list[dict[str, Any]]:
    doc = await get(http, server, "/api/sessions", identifier=identifier, **params)
    assert doc["identifier"] == identifier
    return list(doc["sessions"])


async def event(http: aiohttp.ClientSession, server: Server, internal_id: str) -> dict[str, Any]:
    doc = await get(http, server, f"/v1/events/{internal_id}")
    return dict(doc["data"])


async def only_run_id(http: aiohttp.ClientSession, server: Server, internal_id: str) -> str:
    runs = await runs_of_event(http, server, internal_id)
    assert len(runs) == 1, runs
    return str(runs[0]["run_id"])


async def assert_nothing_stored(
    http: aiohttp.ClientSession, server: Server, calls: Calls
) -> None:
    """No event, environment, session or run exists; then a valid event is the only one."""
    await idle(server)
    assert await environments(http, server) == {}
    assert await identifiers(http, server) == {}
    assert calls.count() == 0
    (ev_id,) = await post_ok(http, server, {"name": "test/ok", "sessions": {"after": "a"}})
    await idle(server)
    assert await environments(http, server) == {"dev": 1}
    assert await identifiers(http, server) == {"after": 1}
    assert calls.invocations == [("ok", ev_id)]
    assert (await session_doc(http, server, "after", "a"))["stats"]["runs"] == 1


def cursor_of(key: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


# ---------------------------------------------------------------------------------------------
# POST /e/{key}, /health


async def test_health(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server, _ = await start(make_server)
    assert await get_json(http, server, "/health") == (200, {"status": 200, "message": "OK"})


async def test_one_event_and_an_array(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server, calls = await start(make_server)
    (single,) = await post_ok(http, server, {"name": "test/ok", "data": {"n": 1}})
    assert ULID.match(single)

    names = ["test/ok", NO_FUNCTION, "test/sync", "app/other"]
    ids = await post_ok(http, server, [{"name": n, "data": {"i": i}} for i, n in enumerate(names)])
    assert len(ids) == 4
    assert all(ULID.match(i) for i in ids)
    assert len(set(ids) | {single}) == 5
    assert ids == sorted(ids)  # ULIDs made in order sort in order
    for i, (ev_id, name) in enumerate(zip(ids, names, strict=True)):
        got = await event(http, server, ev_id)
        assert (got["internal_id"], got["name"], got["data"]) == (ev_id, name, {"i": i})
    await idle(server)
    assert sorted(calls.invocations) == sorted([("ok", single), ("ok", ids[0]),
                                                ("sync", ids[2])])
    assert await environments(http, server) == {"dev": 5}


@pytest.mark.parametrize("key", ["k", "test-key", "KEY_with.dots-123", "a%20b"])
async def test_any_non_empty_event_key(
    make_server: MakeServer, http: aiohttp.ClientSession, key: str
) -> None:
    server, _ = await start(make_server)
    url = URL(f"{server.url}/e/{key}", encoded=True)
    async with http.post(url, data=b'{"name":"test/none"}') as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["status"] == 200
    assert len(doc["ids"]) == 1


async def test_event_fields_stored_as_given(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    body = {"name": NO_FUNCTION, "data": {"a": [1, 2.5, None, {"b": "c"}]}, "id": "user-key",
            "ts": 1_700_000_000_123, "v": "2024-01-01.1", "user": {"id": 7}}
    (ev_id,) = await post_ok(http, server, body)
    got = await event(http, server, ev_id)
    assert got["data"] == body["data"]
    assert (got["id"], got["ts"], got["v"], got["user"]) == (
        "user-key", 1_700_000_000_123, "2024-01-01.1", {"id": 7})
    assert got["sessions"] == {}

    (bare,) = await post_ok(http, server, {"name": NO_FUNCTION})
    got = await event(http, server, bare)
    assert got["data"] == {}  # default
    assert got["id"] is None
    assert isinstance(got["ts"], int)  # default: receive time
    received = dt.datetime.fromisoformat(got["received_at"].replace("Z", "+00:00"))
    assert got["ts"] == int(received.timestamp() * 1000)



async def test_a_function_changing_its_event_changes_nothing_stored_or_retried(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """A new run's first attempt gets the event as decoded from the request (not decoded
    again from what was stored): what it does to it reaches neither the stored event, nor
    its retry, nor the other function the event started."""
    app = App("mutating")
    seen: list[tuple[str, Any, Any, Any, Any]] = []

    async def record(name: str, ctx: Context) -> None:
        ev = ctx.event  # copied: the function changes it next
        seen.append((name, *json.loads(json.dumps([ev.data, ev.v, ev.user])), ctx.attempt))

    @app.function(trigger="test/mutate", retries=1)
    async def mutate(ctx: Context) -> None:
        await record("mutate", ctx)
        ctx.event.data["a"].append("changed")
        ctx.event.data["new"] = True
        ctx.event.user["id"] = -1
        if ctx.attempt == 0:
            raise RuntimeError("again")

    @app.function(trigger="test/mutate")
    async def read(ctx: Context) -> None:
        await record("read", ctx)

    server = await make_server(app)
    body = {"name": "test/mutate", "data": {"a": [1, 2.5, None, {"b": "c"}], "k": "\u00e9"},
            "v": "1", "user": {"id": 7}, "sessions": {"conversation_id": "conv_1"}}
    (ev_id,) = await post_ok(http, server, body)
    await idle(server)
    original = (body["data"], "1", {"id": 7})
    assert sorted(seen, key=lambda row: (row[0], row[4])) == [
        ("mutate", *original, 0), ("mutate", *original, 1), ("read", *original, 0)]
    assert (await event(http, server, ev_id))["data"] == body["data"]

async def test_event_api_without_key_is_400_json(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, calls = await start(make_server)
    async with http.post(f"{server.url}/e/", data=b'{"name":"test/ok"}') as resp:
        assert resp.status == 400
        doc = await resp.json()
    assert doc["ids"] == []
    assert doc["status"] == 400
    assert isinstance(doc["error"], str)
    assert doc["error"]
    await assert_nothing_stored(http, server, calls)


# ---------------------------------------------------------------------------------------------
# Atomic validation


async def test_batch_with_invalid_middle_event_stores_nothing(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, calls = await start(make_server)
    batch = [
        {"name": "test/ok", "id": "first", "sessions": {"conv": "c-0"}},
        {"name": "test/ok", "id": "second", "sessions": {"conv": "x" * 513}},
        {"name": "test/boom", "id": "third", "sessions": {"conv": "c-2"}},
    ]
    error = await post_rejected(http, server, batch, fragments=["sessions"])
    assert re.search(r"(?<!\d)1(?!\d)", error), error  # names index 1
    await idle(server)
    assert calls.count() == 0
    await api_error(http, server, "/api/sessions", 404, identifier="conv")
    # The valid events of the rejected batch can be sent again: their ids were not recorded.
    ids = await post_ok(http, server, [batch[0], batch[2]])
    await idle(server)
    assert len(await runs_of_event(http, server, ids[0])) == 1
    assert len(await runs_of_event(http, server, ids[1])) == 1
    assert await environments(http, server) == {"dev": 2}
    assert {r["value"] for r in await session_rows(http, server, "conv")} == {"c-0", "c-2"}


async def test_batch_with_invalid_middle_name_names_index_and_field(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, calls = await start(make_server)
    batch = [{"name": "test/ok"}, {"name": ""}, {"name": "test/ok"}]
    error = await post_rejected(http, server, batch, fragments=["name"])
    assert re.search(r"(?<!\d)1(?!\d)", error), error
    await assert_nothing_stored(http, server, calls)


# ---------------------------------------------------------------------------------------------
# SPEC 2.1 field rules


def _ev(**fields: Any) -> bytes:
    return compact({"name": "test/ok", **fields})


REJECTED_EVENTS: list[Any] = [
    # name
    pytest.param(compact({"name": "inngest/function.finished"}), ("name",), id="reserved"),
    pytest.param(compact({"name": "INNGEST/x"}), ("name",), id="reserved-upper"),
    pytest.param(compact({"name": "Inngest/Function.Failed"}), ("name",), id="reserved-mixed"),
    pytest.param(compact({"data": {}}), ("name",), id="name-missing"),
    pytest.param(compact({"name": ""}), ("name",), id="name-empty"),
    pytest.param(compact({"name": 5}), ("name",), id="name-number"),
    pytest.param(compact({"name": None}), ("name",), id="name-null"),
    pytest.param(compact({"name": ["test/ok"]}), ("name",), id="name-array"),
    # data
    pytest.param(_ev(data=[1]), ("data",), id="data-array"),
    pytest.param(_ev(data="x"), ("data",), id="data-string"),
    pytest.param(_ev(data=5), ("data",), id="data-number"),
    pytest.param(_ev(data=True), ("data",), id="data-bool"),
    # id
    pytest.param(_ev(id=5), ("id",), id="id-number"),
    pytest.param(_ev(id={"k": 1}), ("id",), id="id-object"),
    # ts
    pytest.param(_ev(ts=TS_MIN_MS - 1), ("ts",), id="ts-before-1980"),
    pytest.param(_ev(ts=TS_MAX_MS), ("ts",), id="ts-2100"),
    pytest.param(_ev(ts=0), ("ts",), id="ts-zero"),
    pytest.param(_ev(ts=-1), ("ts",), id="ts-negative"),
    pytest.param(_ev(ts=1_700_000_000), ("ts",), id="ts-seconds"),
    pytest.param(_ev(ts="1700000000000"), ("ts",), id="ts-string"),
    pytest.param(_ev(ts=1_700_000_000_000.5), ("ts",), id="ts-fraction"),
    pytest.param(_ev(ts=True), ("ts",), id="ts-bool"),
    pytest.param(b'{"name":"test/ok","ts":1e400}', (), id="ts-overflow"),
    # meta
    pytest.param(_ev(meta=[]), ("meta",), id="meta-array"),
    pytest.param(_ev(meta="x"), ("meta",), id="meta-string"),
    # malformed JSON
    pytest.param(b'{"name": "test/ok"', (), id="truncated"),
    pytest.param(b'{"name": "test/ok",}', (), id="trailing-comma"),
    pytest.param(b"{'name': 'test/ok'}", (), id="single-quotes"),
    pytest.param(b'{"name":"test/ok"} {"name":"test/ok"}', (), id="two-documents"),
    pytest.param(b'[{"name":"test/ok"},', (), id="truncated-array"),
    pytest.param(b"nope", (), id="not-json"),
    pytest.param(b'{"name":"test/ok","data":{"x":NaN}}', (), id="nan-literal"),
    pytest.param(b'{"name":"test/ok","data":{"x":Infinity}}', (), id="infinity-literal"),
    pytest.param(b'{"name":"test/ok","data":{"x":-Infinity}}', (), id="minus-infinity"),
    pytest.param(b'{"name":"test/ok","data":{"x":[1e400]}}', (), id="number-overflow"),
    pytest.param(b"NaN", (), id="bare-nan"),
    pytest.param(b'{"name":"test/\xff"}', (), id="invalid-utf8"),
    pytest.param(b'{"name":"test/ok","data":{"s":"\xc3\x28"}}', (), id="invalid-utf8-data"),
    pytest.param(b'{"name":"test/ok","data":{"s":"\xed\xa0\x80"}}', (), id="utf8-surrogate"),
    pytest.param(b"\xff\xfe{", (), id="utf16-bom"),
    pytest.param(b"", (), id="empty-body"),
    pytest.param(b"  \n\t ", (), id="blank-body"),
    # wrong top-level shapes
    pytest.param(b'"test/ok"', (), id="top-string"),
    pytest.param(b"42", (), id="top-number"),
    pytest.param(b"null", (), id="top-null"),
    pytest.param(b"[1]", (), id="array-of-number"),
    pytest.param(b'[{"name":"test/ok"},"x"]', (), id="array-with-string"),
    pytest.param(b'[{"name":"test/ok"},null]', (), id="array-with-null"),
]


@pytest.mark.parametrize(("raw", "fragments"), REJECTED_EVENTS)
async def test_invalid_event_is_400_and_stores_nothing(
    make_server: MakeServer, http: aiohttp.ClientSession, raw: bytes, fragments: tuple[str, ...]
) -> None:
    server, calls = await start(make_server)
    await post_rejected(http, server, raw=raw, fragments=fragments)
    await assert_nothing_stored(http, server, calls)


@pytest.mark.parametrize(
    "name", ["inngestx/foo", "app/inngest/foo", "inngest", "inngest-app/x", "ínngest/x"]
)
async def test_names_that_are_not_reserved(
    make_server: MakeServer, http: aiohttp.ClientSession, name: str
) -> None:
    server, _ = await start(make_server)
    (ev_id,) = await post_ok(http, server, {"name": name})
    assert (await event(http, server, ev_id))["name"] == name


@pytest.mark.parametrize("ts", [TS_MIN_MS, TS_MAX_MS - 1, 1_700_000_000_000])
async def test_ts_boundaries_accepted(
    make_server: MakeServer, http: aiohttp.ClientSession, ts: int
) -> None:
    server, _ = await start(make_server)
    (ev_id,) = await post_ok(http, server, {"name": NO_FUNCTION, "ts": ts})
    assert (await event(http, server, ev_id))["ts"] == ts


async def test_request_limits_5000_events(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, calls = await start(make_server)
    too_many = [{"name": "test/ok", "sessions": {"bulk": f"b{i % 3}"}} for i in range(5001)]
    await post_rejected(http, server, too_many, status=413)
    await idle(server)
    assert await environments(http, server) == {}
    assert await identifiers(http, server) == {}
    assert calls.count() == 0

    ids = await post_ok(http, server, [{"name": NO_FUNCTION}] * 5000)
    assert len(ids) == 5000
    assert len(set(ids)) == 5000
    assert await environments(http, server) == {"dev": 5000}


async def test_event_over_3_mib_is_413(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, calls = await start(make_server)
    base = len(compact({"name": NO_FUNCTION, "data": {"blob": ""}}))
    at_limit = compact({"name": NO_FUNCTION, "data": {"blob": "x" * (MAX_EVENT_BYTES - base)}})
    over = compact({"name": NO_FUNCTION, "data": {"blob": "x" * (MAX_EVENT_BYTES - base + 1)}})
    assert len(at_limit) == MAX_EVENT_BYTES
    assert len(over) == MAX_EVENT_BYTES + 1

    await post_rejected(http, server, raw=over, status=413)
    batch = b'[{"name":"test/ok","sessions":{"big":"b"}},' + over + b"]"
    error = await post_rejected(http, server, raw=batch, status=413)
    assert re.search(r"(?<!\d)1(?!\d)", error), error
    await assert_nothing_stored(http, server, calls)

    (ev_id,) = await post_ok(http, server, raw=at_limit)
    assert len((await event(http, server, ev_id))["data"]["blob"]) == MAX_EVENT_BYTES - base


# ---------------------------------------------------------------------------------------------
# SPEC 2.2 sessions rules


def _sessions(n: int, prefix: str = "s") -> dict[str, str]:
    return {f"{prefix}{i}": f"v{i}" for i in range(n)}


REJECTED_SESSIONS: list[Any] = [
    pytest.param({"sessions": _sessions(6)}, id="six"),
    pytest.param({"sessions": _sessions(3), "meta": {"sessions": _sessions(3, "m")}},
                 id="six-after-merging-meta"),
    pytest.param({"sessions": _sessions(4), "meta": {"propagated_sessions": _sessions(2, "p")}},
                 id="six-after-merging-propagated"),
    pytest.param({"meta": {"sessions": _sessions(6)}}, id="six-in-meta"),
    pytest.param({"sessions": {"i" * 129: "v"}}, id="identifier-129"),
    pytest.param({"meta": {"sessions": {"i" * 129: "v"}}}, id="identifier-129-meta"),
    pytest.param({"sessions": {"": "v"}}, id="identifier-empty"),
    pytest.param({"sessions": {"k": "v" * 513}}, id="value-513"),
    pytest.param({"meta": {"sessions": {"k": "v" * 513}}}, id="value-513-meta"),
    pytest.param({"meta": {"propagated_sessions": {"k": "v" * 513}}}, id="value-513-propagated"),
    pytest.param({"sessions": {"k": 10 ** 513}}, id="value-number-513-digits"),
    pytest.param({"sessions": {"k": ""}}, id="value-empty"),
    pytest.param({"meta": {"sessions": {"k": ""}}}, id="value-empty-meta"),
    pytest.param({"sessions": {"k": None}}, id="value-null"),
    pytest.param({"meta": {"propagated_sessions": {"k": None}}}, id="value-null-propagated"),
    pytest.param({"sessions": {"k": {"a": 1}}}, id="value-object"),
    pytest.param({"sessions": {"k": [1]}}, id="value-array"),
    pytest.param({"sessions": {"k": []}}, id="value-empty-array"),
    pytest.param({"meta": {"sessions": {"k": {"a": 1}}}}, id="value-object-meta"),
    pytest.param({"meta": {"propagated_sessions": {"k": ["x"]}}}, id="value-array-propagated"),
    pytest.param({"sessions": {"k": "a"}, "meta": {"sessions": {"k": "b"}}}, id="conflict"),
    pytest.param({"sessions": {"k": 1}, "meta": {"sessions": {"k": 2}}}, id="conflict-numbers"),
    pytest.param({"sessions": ["k"]}, id="sessions-array"),
    pytest.param({"sessions": "k=v"}, id="sessions-string"),
    pytest.param({"meta": {"sessions": ["k"]}}, id="meta-sessions-array"),
    pytest.param({"meta": {"propagated_sessions": "k"}}, id="propagated-string"),
]


@pytest.mark.parametrize("fields", REJECTED_SESSIONS)
async def test_invalid_sessions_are_400_and_store_nothing(
    make_server: MakeServer, http: aiohttp.ClientSession, fields: dict[str, Any]
) -> None:
    server, calls = await start(make_server)
    await post_rejected(http, server, {"name": "test/ok", **fields}, fragments=["sessions"])
    await assert_nothing_stored(http, server, calls)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"name":"test/ok","sessions":{"k":1e400}}', id="overflow"),
        pytest.param(b'{"name":"test/ok","sessions":{"k":-1e400}}', id="minus-overflow"),
        pytest.param(b'{"name":"test/ok","sessions":{"k":NaN}}', id="nan"),
        pytest.param(b'{"name":"test/ok","sessions":{"k":Infinity}}', id="infinity"),
        pytest.param(b'{"name":"test/ok","meta":{"sessions":{"k":NaN}}}', id="nan-meta"),
    ],
)
async def test_non_finite_session_values_are_400(
    make_server: MakeServer, http: aiohttp.ClientSession, raw: bytes
) -> None:
    server, calls = await start(make_server)
    await post_rejected(http, server, raw=raw)
    await assert_nothing_stored(http, server, calls)


ACCEPTED_SESSIONS: list[Any] = [
    pytest.param({"sessions": _sessions(5)}, _sessions(5), id="five"),
    pytest.param({"meta": {"sessions": _sessions(5)}}, _sessions(5), id="five-in-meta"),
    pytest.param({"sessions": {"i" * 128: "v"}}, {"i" * 128: "v"}, id="identifier-128"),
    pytest.param({"sessions": {"k": "v" * 512}}, {"k": "v" * 512}, id="value-512"),
    pytest.param({"sessions": {"k": "é" * 512}}, {"k": "é" * 512}, id="value-512-unicode"),
    pytest.param({"meta": {"sessions": {"conv": "m-1"}}}, {"conv": "m-1"}, id="meta-form"),
    pytest.param({"sessions": {"a": "1"}, "meta": {"sessions": {"b": "2"}}},
                 {"a": "1", "b": "2"}, id="both-forms-merged"),
    pytest.param({"sessions": {"a": "1"}, "meta": {"sessions": {"a": "1"}}}, {"a": "1"},
                 id="same-value-in-both"),
    pytest.param({"sessions": {"a": 1}, "meta": {"sessions": {"a": "1"}}}, {"a": "1"},
                 id="same-string-form-in-both"),
    pytest.param({"sessions": {"a": "x"}, "meta": {"propagated_sessions": {"a": "p", "b": "p"}}},
                 {"a": "x", "b": "p"}, id="propagated-explicit-wins"),
    pytest.param({"meta": {"sessions": {"a": "m"}, "propagated_sessions": {"a": "p"}}},
                 {"a": "m"}, id="propagated-meta-wins"),
    pytest.param({"meta": {"propagated_sessions": {"a": "p"}}}, {"a": "p"}, id="propagated-only"),
    pytest.param({"meta": {"sessions": {"a": None}, "propagated_sessions": {"a": "p", "b": "q"}}},
                 {"b": "q"}, id="tombstone"),
    pytest.param({"meta": {"sessions": {"gone": None}}}, {}, id="tombstone-of-nothing"),
    pytest.param({"meta": {"sessions": {"p5": None}, "propagated_sessions": _sessions(6, "p")}},
                 _sessions(5, "p"), id="six-propagated-one-tombstoned"),
    pytest.param(
        {"sessions": {"a": "1", "b": "2", "c": "3"},
         "meta": {"sessions": {"c": "3", "d": "4"}, "propagated_sessions": {"a": "old", "e": "5"}}},
        {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}, id="five-after-merging-overlaps"),
    pytest.param({"sessions": {}}, {}, id="empty-object"),
]


@pytest.mark.parametrize(("fields", "expected"), ACCEPTED_SESSIONS)
async def test_valid_sessions_are_stored_merged(
    make_server: MakeServer, http: aiohttp.ClientSession, fields: dict[str, Any],
    expected: dict[str, str],
) -> None:
    server, calls = await start(make_server)
    (ev_id,) = await post_ok(http, server, {"name": "test/ok", **fields})
    await idle(server)
    assert (await event(http, server, ev_id))["sessions"] == expected
    assert await identifiers(http, server) == dict.fromkeys(expected, 1)
    run_id = await only_run_id(http, server, ev_id)
    detail = await run_doc(http, server, run_id)
    assert detail["sessions"] == expected
    assert detail["output"]["sessions"] == expected  # what ctx.sessions saw
    for identifier, value in expected.items():
        doc = await session_doc(http, server, identifier, value)
        assert doc["value"] == value
        assert doc["stats"]["runs"] == 1
        assert [r["run_id"] for r in doc["runs"]] == [run_id]
    if "propagated_sessions" in fields.get("meta", {}):
        for identifier in set(fields["meta"]["propagated_sessions"]) - set(expected):
            await api_error(http, server, "/api/sessions", 404, identifier=identifier)
    assert calls.count() == 1


async def test_session_value_types_stored_as_strings(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    raw = (b'[{"name":"test/none","sessions":{"t":true,"f":false,"i":2,"d":2.5,"o":1.0}},'
           b'{"name":"test/none","sessions":{"big":1e21,"neg":-0.5,"tiny":1e-7,"z":-0,'
           b'"e":2e0}},'
           b'{"name":"test/none","sessions":{"huge":12345678901234567890,"int21":1000000000000000000000,'
           b'"int20":100000000000000000000,"small":0.000001,"smaller":0.0000001}},'
           b'{"name":"test/none","meta":{"sessions":{"t":true,"o":1.0},'
           b'"propagated_sessions":{"big":1e21}}}]')
    first, second, numbers, meta_form = await post_ok(http, server, raw=raw)
    expected_first = {"t": "true", "f": "false", "i": "2", "d": "2.5", "o": "1"}
    expected_second = {"big": "1e+21", "neg": "-0.5", "tiny": "1e-7", "z": "0", "e": "2"}
    expected_numbers = {"huge": "12345678901234567000", "int21": "1e+21",
                       "int20": "100000000000000000000", "small": "0.000001", "smaller": "1e-7"}
    assert (await event(http, server, first))["sessions"] == expected_first
    assert (await event(http, server, second))["sessions"] == expected_second
    assert (await event(http, server, meta_form))["sessions"] == {
        "t": "true", "o": "1", "big": "1e+21"}
    assert (await event(http, server, numbers))["sessions"] == expected_numbers
    for identifier, value in {**expected_first, **expected_second, **expected_numbers}.items():
        rows = await session_rows(http, server, identifier)
        assert [r["value"] for r in rows] == [value]


async def test_number_and_its_string_are_one_session(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    await post_ok(http, server, [{"name": "test/ok", "sessions": {"n": 2}},
                                 {"name": "test/ok", "sessions": {"n": "2"}},
                                 {"name": "test/ok", "sessions": {"n": 2.0}}])
    await idle(server)
    rows = await session_rows(http, server, "n")
    assert [(r["value"], r["runs"]) for r in rows] == [("2", 3)]


# ---------------------------------------------------------------------------------------------
# Environments


async def test_environments_are_separate(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    (staged,) = await post_ok(http, server, {"name": "test/ok", "sessions": {"conv": "env-s"}},
                              env="staging")
    (dev,) = await post_ok(http, server, {"name": "test/ok", "sessions": {"conv": "env-d"}})
    await post_ok(http, server, {"name": "test/ok", "sessions": {"conv": "shared"}})
    await post_ok(http, server, {"name": "test/boom", "sessions": {"conv": "shared"}},
                  env="staging")
    await post_ok(http, server, {"name": NO_FUNCTION, "sessions": {"only": "staging"}},
                  env="staging")
    await idle(server)

    assert await environments(http, server) == {"dev": 2, "staging": 3}
    assert await identifiers(http, server) == {"conv": 2}
    assert await identifiers(http, server, env="staging") == {"conv": 2, "only": 1}
    assert await identifiers(http, server, env="dev") == {"conv": 2}

    dev_rows = {r["value"]: r for r in await session_rows(http, server, "conv")}
    staging_rows = {r["value"]: r for r in await session_rows(http, server, "conv", env="staging")}
    assert set(dev_rows) == {"env-d", "shared"}
    assert set(staging_rows) == {"env-s", "shared"}
    assert (dev_rows["shared"]["runs"], dev_rows["shared"]["failed_runs"]) == (1, 0)
    assert (staging_rows["shared"]["runs"], staging_rows["shared"]["failed_runs"]) == (1, 1)
    assert dev_rows["shared"]["functions"] == ["api-ok"]
    assert staging_rows["shared"]["functions"] == ["api-boom"]

    await api_error(http, server, "/api/session", 404, identifier="conv", value="env-s")
    await api_error(http, server, "/api/sessions", 404, identifier="only")
    await api_error(http, server, "/api/session", 404, identifier="conv", value="env-d",
                    env="staging")
    doc = await session_doc(http, server, "conv", "env-s", env="staging")
    assert doc["env"] == "staging"
    assert doc["stats"]["runs"] == 1
    assert (await event(http, server, staged))["sessions"] == {"conv": "env-s"}
    staged_run = await only_run_id(http, server, staged)
    assert (await run_doc(http, server, staged_run))["env"] == "staging"
    assert (await run_doc(http, server, await only_run_id(http, server, dev)))["env"] == "dev"


# ---------------------------------------------------------------------------------------------
# Idempotency


async def test_same_event_id_is_stored_but_starts_no_run(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, calls = await start(make_server)
    body = {"name": "test/ok", "id": "dedupe-1", "sessions": {"conv": "idem"}}
    (first,) = await post_ok(http, server, body)
    await idle(server)
    (second,) = await post_ok(http, server, body)
    await idle(server)
    assert first != second
    got = await event(http, server, second)
    assert (got["internal_id"], got["id"], got["name"]) == (second, "dedupe-1", "test/ok")
    assert len(await runs_of_event(http, server, first)) == 1
    assert await runs_of_event(http, server, second) == []
    assert calls.invocations == [("ok", first)]
    assert (await session_doc(http, server, "conv", "idem"))["stats"]["runs"] == 1
    assert await environments(http, server) == {"dev": 2}

    # The same id in another environment is another event.
    (other,) = await post_ok(http, server, body, env="staging")
    await idle(server)
    assert len(await runs_of_event(http, server, other)) == 1
    assert (await session_doc(http, server, "conv", "idem", env="staging"))["stats"]["runs"] == 1
    assert (await session_doc(http, server, "conv", "idem"))["stats"]["runs"] == 1

    # A different id, or no id, starts runs as usual.
    (fresh,) = await post_ok(http, server, {**body, "id": "dedupe-2"})
    (no_id,) = await post_ok(http, server, {k: v for k, v in body.items() if k != "id"})
    await idle(server)
    assert len(await runs_of_event(http, server, fresh)) == 1
    assert len(await runs_of_event(http, server, no_id)) == 1
    assert (await session_doc(http, server, "conv", "idem"))["stats"]["runs"] == 3


async def test_same_event_id_twice_in_one_request(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, calls = await start(make_server)
    body = {"name": "test/ok", "id": "twin", "sessions": {"conv": "twins"}}
    first, second = await post_ok(http, server, [body, body])
    await idle(server)
    assert len(await runs_of_event(http, server, first)) == 1
    assert await runs_of_event(http, server, second) == []
    assert (await event(http, server, second))["id"] == "twin"
    assert calls.count() == 1
    assert (await session_doc(http, server, "conv", "twins"))["stats"]["runs"] == 1


# ---------------------------------------------------------------------------------------------
# Session figures (SPEC 2.3)


async def test_session_figures(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server, calls = await start(make_server)
    sessions = {"conv": "fig"}
    ok1, ok2, boom, none = await post_ok(http, server, [
        {"name": "test/ok", "sessions": sessions},
        {"name": "test/ok", "data": {"n": 5}, "sessions": sessions},
        {"name": "test/boom", "sessions": sessions},
        {"name": NO_FUNCTION, "sessions": sessions},
    ])
    (zero,) = await post_ok(http, server, {"name": NO_FUNCTION, "sessions": {"conv": "zero"}})
    (multi,) = await post_ok(http, server, {"name": "test/ok",
                                            "sessions": {"conv": "multi", "user": "u-1"}})
    (plain,) = await post_ok(http, server, {"name": "test/ok"})  # sessions never change runs
    await idle(server)
    assert calls.count("ok") == 4
    assert calls.count("boom") == 2  # retries=1: two attempts

    run_ids = {ev: await only_run_id(http, server, ev) for ev in (ok1, ok2, boom, multi, plain)}
    assert await runs_of_event(http, server, none) == []
    runs = {ev: await run_doc(http, server, rid) for ev, rid in run_ids.items()}
    assert [runs[e]["status"] for e in (ok1, ok2, boom)] == ["Completed", "Completed", "Failed"]

    doc = await session_doc(http, server, "conv", "fig")
    assert (doc["env"], doc["identifier"], doc["value"]) == ("dev", "conv", "fig")
    stats = doc["stats"]
    assert stats["runs"] == 3
    assert stats["failed_runs"] == 1
    assert stats["failure_rate"] == pytest.approx(1 / 3)
    assert sorted(stats["functions"]) == ["api-boom", "api-ok"]
    assert len(stats["functions"]) == 2
    assert stats["last_active"] == max(runs[e]["ended_at"] for e in (ok1, ok2, boom))
    assert {r["run_id"] for r in doc["runs"]} == {run_ids[ok1], run_ids[ok2], run_ids[boom]}
    by_id = {r["run_id"]: r for r in doc["runs"]}
    assert by_id[run_ids[boom]]["status"] == "Failed"
    assert by_id[run_ids[boom]]["function_id"] == "api-boom"
    assert by_id[run_ids[boom]]["event_name"] == "test/boom"
    assert by_id[run_ids[ok2]]["status"] == "Completed"
    assert doc["next_cursor"] is None

    # The list page shows the same figures.
    rows = {r["value"]: r for r in await session_rows(http, server, "conv")}
    assert set(rows) == {"fig", "zero", "multi"}
    assert {k: rows["fig"][k] for k in stats} == stats

    # A session with no runs exists as soon as an event carries it.
    zero_doc = await session_doc(http, server, "conv", "zero")
    assert zero_doc["stats"]["runs"] == 0
    assert zero_doc["stats"]["failed_runs"] == 0
    assert zero_doc["stats"]["failure_rate"] == 0
    assert zero_doc["stats"]["functions"] == []
    assert zero_doc["runs"] == []
    assert zero_doc["stats"]["last_active"] == (await event(http, server, zero))["received_at"]
    assert rows["zero"]["runs"] == 0

    # A run belongs to every session of its event.
    for identifier, value in (("conv", "multi"), ("user", "u-1")):
        doc = await session_doc(http, server, identifier, value)
        assert [r["run_id"] for r in doc["runs"]] == [run_ids[multi]]
        assert doc["stats"]["runs"] == 1
        assert doc["stats"]["failure_rate"] == 0
        assert doc["stats"]["functions"] == ["api-ok"]
        assert doc["stats"]["last_active"] == runs[multi]["ended_at"]
    assert await identifiers(http, server) == {"conv": 3, "user": 1}


async def test_failure_rate_is_a_fraction_and_figures_update(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    s = {"conv": "rate"}
    await post_ok(http, server, {"name": "test/boom", "sessions": s})
    await idle(server)
    stats = (await session_doc(http, server, "conv", "rate"))["stats"]
    assert (stats["runs"], stats["failed_runs"], stats["failure_rate"]) == (1, 1, 1)
    await post_ok(http, server, {"name": "test/ok", "sessions": s})
    await idle(server)
    stats = (await session_doc(http, server, "conv", "rate"))["stats"]
    assert (stats["runs"], stats["failed_runs"], stats["failure_rate"]) == (2, 1, 0.5)
    # An event with no run still makes the session active.
    (late,) = await post_ok(http, server, {"name": NO_FUNCTION, "sessions": s})
    stats = (await session_doc(http, server, "conv", "rate"))["stats"]
    assert stats["last_active"] == (await event(http, server, late))["received_at"]
    assert (stats["runs"], stats["failure_rate"]) == (2, 0.5)


# ---------------------------------------------------------------------------------------------
# Opaque values


ODD_VALUES = [
    "a/b:c?d#e%f&g+h",
    "with space",
    "  leading and trailing  ",
    "double \"quotes\" and 'single'",
    "<script>alert(1)</script>",
    "emoji 🎉👩‍💻🏳️‍🌈",
    "Ünïcödé 日本語 العربية עברית",
    "tab\tnew\nline\r",
    "100%25",
    "%2F%20",
    "a+b=c;d,e",
    "back\\slash",
    "../../etc/passwd",
    "?",
    "&value=other",
    "x" * 512,
    "🎉" * 100,
    "\u00a0nbsp\u200bzero-width\ufeffbom",
    "nul\u0000inside",
]


async def test_odd_values_round_trip(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server, _ = await start(make_server)
    ids = await post_ok(http, server,
                        [{"name": "test/ok", "sessions": {"odd": v}} for v in ODD_VALUES])
    await idle(server)
    rows = await session_rows(http, server, "odd")
    assert sorted(r["value"] for r in rows) == sorted(ODD_VALUES)
    for ev_id, value in zip(ids, ODD_VALUES, strict=True):
        assert (await event(http, server, ev_id))["sessions"] == {"odd": value}
        doc = await session_doc(http, server, "odd", value)
        assert doc["value"] == value
        assert doc["identifier"] == "odd"
        assert doc["stats"]["runs"] == 1
        (row,) = doc["runs"]
        detail = await run_doc(http, server, row["run_id"])
        assert detail["sessions"] == {"odd": value}
        assert detail["output"]["sessions"] == {"odd": value}
        assert detail["events"][0]["sessions"] == {"odd": value}
        # Percent-encoded by hand (no client normalisation): the same session comes back.
        url = URL(f"{server.url}/api/session?identifier=odd&value={quote(value, safe='')}",
                  encoded=True)
        async with http.get(url) as resp:
            assert resp.status == 200
            assert (await resp.json())["value"] == value
        # ... and the list page's `q=` finds it.
        found = await session_rows(http, server, "odd", q=value)
        assert value in [r["value"] for r in found]


async def test_odd_identifier_round_trips(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    identifier = "a/b:c?d#e%f&g+h <i>\"ü🎉"
    await post_ok(http, server, {"name": "test/ok", "sessions": {identifier: "v"}})
    await idle(server)
    assert await identifiers(http, server) == {identifier: 1}
    assert [r["value"] for r in await session_rows(http, server, identifier)] == ["v"]
    assert (await session_doc(http, server, identifier, "v"))["stats"]["runs"] == 1


# ---------------------------------------------------------------------------------------------
# Listing: pagination, search, sort, bad parameters


async def _pages(
    http: aiohttp.ClientSession, server: Server, identifier: str, **params: str
) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        extra = dict(params) if cursor is None else {**params, "cursor": cursor}
        doc = await get(http, server, "/api/sessions", identifier=identifier, **extra)
        pages.append(doc["sessions"])
        cursor = doc["next_cursor"]
        if cursor is None:
            return pages
        assert isinstance(cursor, str)
        assert len(pages) < 20, "pagination does not end"


async def test_pagination_by_last_active(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    values = [f"page-{i}" for i in range(7)]
    for value in values:
        await post_ok(http, server, {"name": NO_FUNCTION, "sessions": {"pg": value}})
    await post_ok(http, server, {"name": NO_FUNCTION, "sessions": {"pg": "page-2"}})  # touch

    pages = await _pages(http, server, "pg", limit="3")
    assert [len(p) for p in pages] == [3, 3, 1]
    rows = [r for p in pages for r in p]
    assert sorted(r["value"] for r in rows) == values  # all, no duplicates
    actives = [r["last_active"] for r in rows]
    assert actives == sorted(actives, reverse=True)
    assert {r["value"]: r["last_active"] for r in rows}["page-2"] == actives[0]
    assert rows == await session_rows(http, server, "pg")  # same order unpaged
    assert [r["value"] for r in rows] == [r["value"] for r in await session_rows(
        http, server, "pg", sort="last_active")]

    single = await _pages(http, server, "pg", limit="1")
    assert [r for p in single for r in p] == rows
    assert len(single) == 7
    everything = await _pages(http, server, "pg", limit="7")
    assert len(everything) == 1
    assert everything[0] == rows


async def test_search_within_values(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server, _ = await start(make_server)
    values = ["alpha-1", "beta-2", "alpha-3", "100%", "a_b", "ab", "x\\y", "gamma"]
    await post_ok(http, server, [{"name": NO_FUNCTION, "sessions": {"q": v}} for v in values])

    async def search(q: str, **params: str) -> set[str]:
        return {r["value"] for p in await _pages(http, server, "q", q=q, **params) for r in p}

    assert await search("alpha") == {"alpha-1", "alpha-3"}
    assert await search("alpha", limit="1") == {"alpha-1", "alpha-3"}
    assert await search("ha-") == {"alpha-1", "alpha-3"}
    assert await search("%") == {"100%"}
    assert await search("_") == {"a_b"}
    assert await search("\\") == {"x\\y"}
    assert await search("a") == {"alpha-1", "beta-2", "alpha-3", "a_b", "ab", "gamma"}
    assert await search("2", sort="value") == {"beta-2"}
    assert await search("zzz") == set()
    assert await search("gamma") == {"gamma"}


async def test_sort_by_runs_failure_rate_and_value(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)

    def evs(name: str, value: str, n: int) -> list[dict[str, Any]]:
        return [{"name": name, "sessions": {"s": value}} for _ in range(n)]

    await post_ok(http, server, [
        *evs("test/ok", "r-three", 3), *evs("test/ok", "r-one", 1),
        *evs("test/ok", "r-two", 2), *evs(NO_FUNCTION, "r-zero", 1),
        *evs("test/boom", "f-all", 1),
        *evs("test/ok", "f-half", 1), *evs("test/boom", "f-half", 1),
        *evs("test/ok", "f-quarter", 3), *evs("test/boom", "f-quarter", 1),
    ])
    await idle(server)

    by_runs = [(r["value"], r["runs"]) for r in await session_rows(http, server, "s",
                                                                    sort="runs")]
    counts = [n for _, n in by_runs]
    assert counts == sorted(counts, reverse=True)
    assert dict(by_runs) == {"r-three": 3, "r-one": 1, "r-two": 2, "r-zero": 0, "f-all": 1,
                             "f-half": 2, "f-quarter": 4}
    assert by_runs[0] == ("f-quarter", 4)
    assert by_runs[1] == ("r-three", 3)
    assert by_runs[-1] == ("r-zero", 0)
    paged = [r for p in await _pages(http, server, "s", sort="runs", limit="2") for r in p]
    assert [(r["value"], r["runs"]) for r in paged] == by_runs

    by_rate = await session_rows(http, server, "s", sort="failure_rate")
    rates = [r["failure_rate"] for r in by_rate]
    assert rates == sorted(rates, reverse=True)
    assert [r["value"] for r in by_rate[:3]] == ["f-all", "f-half", "f-quarter"]
    assert rates[:3] == [1, 0.5, 0.25]
    assert set(rates[3:]) == {0}
    paged = [r for p in await _pages(http, server, "s", sort="failure_rate", limit="3")
             for r in p]
    assert paged == by_rate

    by_value = [r["value"] for r in await session_rows(http, server, "s", sort="value")]
    assert by_value == sorted(by_value)
    assert len(by_value) == 7
    paged = [r for p in await _pages(http, server, "s", sort="value", limit="2") for r in p]
    assert [r["value"] for r in paged] == by_value
    doc = await get(http, server, "/api/sessions", identifier="s", sort="value")
    assert doc["sort"] == "value"


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": "0"}, id="limit-0"),
        pytest.param({"limit": "501"}, id="limit-501"),
        pytest.param({"limit": "x"}, id="limit-x"),
        pytest.param({"limit": "-1"}, id="limit-negative"),
        pytest.param({"limit": "1.5"}, id="limit-fraction"),
        pytest.param({"limit": " 3"}, id="limit-space"),
        pytest.param({"limit": "99999999999999999999999"}, id="limit-huge"),
        pytest.param({"limit": "²"}, id="limit-superscript-digit"),
        pytest.param({"sort": "bogus"}, id="sort-bogus"),
        pytest.param({"sort": "runs desc"}, id="sort-sql"),
        pytest.param({"sort": "RUNS"}, id="sort-case"),
        pytest.param({"cursor": "garbage"}, id="cursor-garbage"),
        pytest.param({"cursor": "%%%"}, id="cursor-percent"),
        pytest.param({"cursor": cursor_of([1])}, id="cursor-short"),
        pytest.param({"cursor": cursor_of({"a": 1})}, id="cursor-object"),
        pytest.param({"cursor": cursor_of([{"a": 1}, "v"])}, id="cursor-object-inside"),
        pytest.param({"cursor": cursor_of([[1], "v"])}, id="cursor-list-inside"),
        pytest.param({"cursor": cursor_of(["x"])}, id="cursor-one-key-for-last-active"),
        pytest.param({"cursor": cursor_of(["a", "b"]), "sort": "value"},
                     id="cursor-two-keys-for-value"),
    ],
)
async def test_bad_list_parameters_are_400(
    make_server: MakeServer, http: aiohttp.ClientSession, params: dict[str, str]
) -> None:
    server, _ = await start(make_server)
    await post_ok(http, server, [{"name": NO_FUNCTION, "sessions": {"p": f"v{i}"}}
                                 for i in range(3)])
    await api_error(http, server, "/api/sessions", 400, identifier="p", **params)


@pytest.mark.parametrize("limit", ["1", "500"])
async def test_limit_bounds_accepted(
    make_server: MakeServer, http: aiohttp.ClientSession, limit: str
) -> None:
    server, _ = await start(make_server)
    await post_ok(http, server, [{"name": NO_FUNCTION, "sessions": {"p": f"v{i}"}}
                                 for i in range(3)])
    rows = await session_rows(http, server, "p", limit=limit)
    assert len(rows) == min(int(limit), 3)


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"cursor": "garbage"}, id="cursor-garbage"),
        pytest.param({"cursor": cursor_of([1, 2])}, id="cursor-long"),
        pytest.param({"cursor": cursor_of([{"a": 1}])}, id="cursor-object-inside"),
        pytest.param({"limit": "0"}, id="limit-0"),
        pytest.param({"limit": "501"}, id="limit-501"),
        pytest.param({"limit": "x"}, id="limit-x"),
    ],
)
async def test_bad_session_parameters_are_400(
    make_server: MakeServer, http: aiohttp.ClientSession, params: dict[str, str]
) -> None:
    server, _ = await start(make_server)
    await post_ok(http, server, {"name": "test/ok", "sessions": {"p": "v"}})
    await idle(server)
    await api_error(http, server, "/api/session", 400, identifier="p", value="v", **params)


async def test_session_runs_pagination(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    ids = await post_ok(http, server, [{"name": "test/ok", "sessions": {"conv": "many"}}] * 5)
    await idle(server)
    expected = [await only_run_id(http, server, ev) for ev in ids]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "2"} if cursor is None else {"limit": "2", "cursor": cursor}
        doc = await session_doc(http, server, "conv", "many", **params)
        assert doc["stats"]["runs"] == 5
        seen.extend(r["run_id"] for r in doc["runs"])
        cursor = doc["next_cursor"]
        pages += 1
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(expected)
    assert len(set(seen)) == 5
    assert seen == sorted(expected, reverse=True)  # newest first


# ---------------------------------------------------------------------------------------------
# Runs and events


async def test_run_details(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server, _ = await start(make_server)
    s = {"conv": "details"}
    ok_ev, boom_ev, sync_ev, flaky_ev = await post_ok(http, server, [
        {"name": "test/ok", "data": {"n": 21}, "id": "ok-1", "sessions": s},
        {"name": "test/boom", "data": {"why": "kaput"}, "sessions": s},
        {"name": "test/sync", "sessions": s},
        {"name": "test/flaky", "sessions": s},
    ])
    await idle(server)

    # Completed async run with one step.
    ok_run = await only_run_id(http, server, ok_ev)
    detail = await run_doc(http, server, ok_run)
    assert detail["run_id"] == ok_run
    assert detail["function_id"] == "api-ok"
    assert detail["status"] == "Completed"
    assert detail["env"] == "dev"
    assert detail["event_id"] == ok_ev
    assert detail["event_name"] == "test/ok"
    assert detail["sessions"] == s
    assert detail["output"] == {"doubled": 42, "sessions": s}
    assert detail["error"] is None
    assert detail["queued_at"] <= detail["started_at"] <= detail["ended_at"]
    assert isinstance(detail["duration_ms"], int)
    assert detail["duration_ms"] >= 0
    (ev_doc,) = detail["events"]
    assert (ev_doc["internal_id"], ev_doc["id"], ev_doc["name"], ev_doc["data"],
            ev_doc["sessions"]) == (ok_ev, "ok-1", "test/ok", {"n": 21}, s)
    (step,) = detail["steps"]
    assert (step["step_id"], step["attempt"], step["status"], step["output"], step["error"]) == (
        "double", 1, "Completed", 42, None)

    # Failed run: two function-level attempts, error with name, message and stack.
    boom_run = await only_run_id(http, server, boom_ev)
    detail = await run_doc(http, server, boom_run)
    assert detail["status"] == "Failed"
    assert detail["output"] is None
    error = detail["error"]
    assert error["name"] == "ValueError"
    assert error["message"] == "boom kaput"
    assert "Traceback" in error["stack"]
    assert "ValueError: boom kaput" in error["stack"]
    assert "in boom" in error["stack"]
    assert [a["attempt"] for a in detail["steps"]] == [1, 2]  # numbered from 1, as shown
    assert [a["status"] for a in detail["steps"]] == ["Failed", "Failed"]
    assert all(a["error"]["message"] == "boom kaput" for a in detail["steps"])
    assert detail["ended_at"] is not None

    # Sync function: ran in a worker thread, with its step.
    detail = await run_doc(http, server, await only_run_id(http, server, sync_ev))
    assert detail["status"] == "Completed"
    assert detail["function_id"] == "api-sync-job"
    assert detail["output"] == {"step": "from-thread", "main_thread": False}
    assert [(a["step_id"], a["status"], a["output"]) for a in detail["steps"]] == [
        ("in-thread", "Completed", "from-thread")]

    # A step that failed once, then succeeded: both attempts are shown.
    detail = await run_doc(http, server, await only_run_id(http, server, flaky_ev))
    assert detail["status"] == "Completed"
    assert detail["output"] == {"result": "steady"}
    steps = detail["steps"]
    assert [(a["step_id"], a["attempt"], a["status"]) for a in steps] == [
        ("wobble", 1, "Failed"), ("wobble", 2, "Completed")]
    assert steps[0]["error"]["name"] == "RuntimeError"
    assert steps[0]["error"]["message"] == "first try fails"
    assert "first try fails" in steps[0]["error"]["stack"]
    assert steps[1]["output"] == "steady"
    assert steps[1]["error"] is None

    # Inngest's REST shapes.
    doc = await get(http, server, f"/v1/runs/{ok_run}")
    assert doc["data"]["run_id"] == ok_run
    assert doc["data"]["status"] == "Completed"
    assert doc["data"]["output"] == {"doubled": 42, "sessions": s}
    assert doc["data"]["function_id"] == "api-ok"
    assert doc["data"]["event_id"] == ok_ev
    doc = await get(http, server, f"/v1/runs/{boom_run}")
    assert doc["data"]["run_id"] == boom_run
    assert doc["data"]["status"] == "Failed"
    ev_doc = await event(http, server, boom_ev)
    assert (ev_doc["internal_id"], ev_doc["name"], ev_doc["data"]) == (
        boom_ev, "test/boom", {"why": "kaput"})
    (inngest_run,) = await runs_of_event(http, server, boom_ev)
    assert (inngest_run["run_id"], inngest_run["status"]) == (boom_run, "Failed")
    (inngest_run,) = await runs_of_event(http, server, ok_ev)
    assert (inngest_run["run_id"], inngest_run["status"], inngest_run["output"]) == (
        ok_run, "Completed", {"doubled": 42, "sessions": s})


async def test_one_event_starting_two_functions(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app = App("two")

    @app.function(trigger="test/*")
    async def any_test(ctx: Context) -> str:
        return "any"

    @app.function(trigger="test/two")
    def exact(ctx: Context) -> str:
        return "exact"

    server = await make_server(app)
    (ev_id,) = await post_ok(http, server, {"name": "test/two", "sessions": {"conv": "two"}})
    await idle(server)
    runs = await runs_of_event(http, server, ev_id)
    assert sorted((r["function_id"], r["output"]) for r in runs) == [
        ("two-any-test", "any"), ("two-exact", "exact")]
    stats = (await session_doc(http, server, "conv", "two"))["stats"]
    assert stats["runs"] == 2
    assert stats["functions"] == ["two-any-test", "two-exact"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "/api/runs/nope",
        "/v1/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "/v1/events/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "/v1/events/01ARZ3NDEKTSV4RRFFQ69G5FAV/runs",
        "/v1/events/%3Cscript%3E",
    ],
)
async def test_unknown_ids_are_404_json(
    make_server: MakeServer, http: aiohttp.ClientSession, path: str
) -> None:
    server, _ = await start(make_server)
    await post_ok(http, server, {"name": "test/ok"})
    await idle(server)
    async with http.get(URL(f"{server.url}{path}", encoded=True)) as resp:
        assert resp.status == 404
        doc = await resp.json()
    assert doc["status"] == 404
    assert isinstance(doc["error"], str)
    assert doc["error"]


async def test_session_lookups_that_fail(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    await post_ok(http, server, {"name": "test/ok", "sessions": {"conv": "known"}})
    await idle(server)
    await api_error(http, server, "/api/sessions", 404, identifier="unknown")
    await api_error(http, server, "/api/sessions", 404, identifier="conv", env="nowhere")
    await api_error(http, server, "/api/session", 404, identifier="conv", value="unknown")
    await api_error(http, server, "/api/session", 404, identifier="unknown", value="known")
    await api_error(http, server, "/api/session", 400, identifier="conv")
    await api_error(http, server, "/api/session", 400, value="known")
    await api_error(http, server, "/api/session", 400)
    await api_error(http, server, "/api/session", 400, identifier="", value="known")
    await api_error(http, server, "/api/session", 400, identifier="conv", value="")
    await api_error(http, server, "/api/sessions", 400, identifier="")
    # Lookups are exact: no case folding, no trimming, no prefix match.
    await api_error(http, server, "/api/session", 404, identifier="conv", value="KNOWN")
    await api_error(http, server, "/api/session", 404, identifier="conv", value=" known")
    await api_error(http, server, "/api/session", 404, identifier="conv", value="know")
    await api_error(http, server, "/api/sessions", 404, identifier="Conv")


async def test_unknown_identifier_is_404_with_a_search_too(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server, _ = await start(make_server)
    await post_ok(http, server, {"name": "test/ok", "sessions": {"conv": "known"}})
    await api_error(http, server, "/api/sessions", 404, identifier="unknown", q="known")
    await api_error(http, server, "/api/sessions", 404, identifier="unknown", sort="value")
    assert await session_rows(http, server, "conv", q="nothing-matches") == []


# ---------------------------------------------------------------------------------------------
# Restart persistence


async def _snapshot(
    http: aiohttp.ClientSession, server: Server, events: list[str],
) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "environments": (await get(http, server, "/api/environments"))["environments"],
        "identifiers": await get(http, server, "/api/sessions"),
        "identifiers-staging": await get(http, server, "/api/sessions", env="staging"),
        "conv": await get(http, server, "/api/sessions", identifier="conv"),
        "conv-runs": await get(http, server, "/api/sessions", identifier="conv",
                                   sort="runs"),
        "user": await get(http, server, "/api/sessions", identifier="user"),
        "staging": await get(http, server, "/api/sessions", identifier="conv",
                                 env="staging"),
    }
    for row in snap["conv"]["sessions"]:
        snap[f"session:{row['value']}"] = await session_doc(http, server, "conv", row["value"])
    for ev_id in events:
        snap[f"event:{ev_id}"] = await event(http, server, ev_id)
        runs = await runs_of_event(http, server, ev_id)
        snap[f"event-runs:{ev_id}"] = runs
        for r in runs:
            snap[f"run:{r['run_id']}"] = await run_doc(http, server, r["run_id"])
            snap[f"v1-run:{r['run_id']}"] = await get(http, server,
                                                          f"/v1/runs/{r['run_id']}")
    return snap


async def test_everything_survives_a_restart(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    app, calls = make_app()
    first = await make_server(app)
    events = await post_ok(http, first, [
        {"name": "test/ok", "data": {"n": 3}, "id": "keep-1",
         "sessions": {"conv": "c-1", "user": "u-1"}},
        {"name": "test/boom", "sessions": {"conv": "c-1"}},
        {"name": "test/sync", "sessions": {"conv": "c-2"}},
        {"name": "test/flaky", "sessions": {"conv": "c-2"}},
        {"name": NO_FUNCTION, "sessions": {"conv": "<script>alert(1)</script> 🎉"}},
    ])
    events += await post_ok(http, first, {"name": "test/ok", "sessions": {"conv": "s-1"}},
                            env="staging")
    await idle(first)
    before = await _snapshot(http, first, events)
    assert before["session:c-1"]["stats"]["runs"] == 2
    assert before["session:c-1"]["stats"]["failed_runs"] == 1
    assert len([k for k in before if k.startswith("run:")]) == 5
    await first.stop()

    second = await make_server(app, db=first.config.db)
    await idle(second)
    after = await _snapshot(http, second, events)
    assert after == before
    invocations = calls.count()

    # Idempotency keys survive too; new work adds to the stored figures.
    (dup,) = await post_ok(http, second, {"name": "test/ok", "id": "keep-1",
                                          "sessions": {"conv": "c-1"}})
    (new,) = await post_ok(http, second, {"name": "test/ok", "sessions": {"conv": "c-1"}})
    await idle(second)
    assert await runs_of_event(http, second, dup) == []
    assert len(await runs_of_event(http, second, new)) == 1
    assert calls.count() == invocations + 1
    stats = (await session_doc(http, second, "conv", "c-1"))["stats"]
    assert (stats["runs"], stats["failed_runs"], stats["failure_rate"]) == (3, 1, 1 / 3)
    assert await environments(http, second) == {"dev": 7, "staging": 1}


async def test_run_metadata_is_validated_stored_and_shown(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    """`POST /v1/runs/{id}/metadata` as Inngest validates it (the SDK side is in
    test_sdk_ts.py): bad bodies are 400 (oversized values 413) and store nothing."""
    app = App("meta")

    @app.function(trigger="meta/go")
    async def go(ctx: Context) -> str:
        return await ctx.step.run("work", lambda: "done")

    server = await make_server(app)
    status, body = await post_events(http, server, {"name": "meta/go"})
    assert status == 200
    await idle(server)
    [run] = await runs_of_event(http, server, body["ids"][0])
    url = f"{server.url}/v1/runs/{run['run_id']}/metadata"
    update = {"kind": "userland.progress", "op": "merge", "values": {"done": 1}}
    bad: list[tuple[Any, int, str]] = [
        ([], 400, "JSON object"),
        ({"target": {"step_attempt": 1}, "metadata": [update]}, 400,
         "target.step_id must be defined if target.step_attempt is defined"),
        ({"target": {"step_id": "work", "step_index": -1}, "metadata": [update]}, 400,
         "target.step_index"),
        ({"metadata": []}, 400, "non-empty array"),
        ({"metadata": [{**update, "kind": "inngest.internal"}]}, 400, "inngest-prefixed"),
        ({"metadata": [{**update, "kind": "k" * 129}]}, 400, "at most 128"),
        ({"metadata": [{**update, "op": "replace"}]}, 400, "metadata[0].op"),
        ({"metadata": [update, {**update, "values": [1]}]}, 400, "metadata[1].values"),
        ({"metadata": [{**update, "values": {"x": "y" * 70_000}}]}, 413, "at most 65,536"),
    ]
    for doc, code, says in bad:
        async with http.post(url, json=doc) as resp:
            answer = await resp.json()
            assert resp.status == code, (doc, answer)
            assert says in answer["error"], (doc, answer)
    assert (await run_doc(http, server, run["run_id"]))["metadata"] == []

    target = {"step_id": "work", "step_index": 1, "step_attempt": 0}
    async with http.post(url, json={"target": target, "metadata": [update]}) as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(f"{server.url}/v1/runs/01J0000000000000000000000Z/metadata",
                         json={"metadata": [update]}) as resp:
        assert resp.status == 404
    assert (await run_doc(http, server, run["run_id"]))["metadata"] == [
        {"scope": "step", "step_id": "work:1", "step_attempt": 0, "kind": "userland.progress",
         "op": "merge", "values": {"done": 1}}]
