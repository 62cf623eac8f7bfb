"""Hostile input against a real server: never a 500, never a hang, never partial state.

One server (port 0, its own SQLite file, an app whose function echoes its event's data) serves
the whole module from a background event loop, so hypothesis can drive it with plain blocking
HTTP. Properties: random and malformed `/e/` bodies (deep nesting, huge numbers, NaN tokens,
NUL bytes, invalid UTF-8, lone surrogates) and arbitrary text in every query parameter, path
segment and header the server reads answer 2xx/4xx with the JSON error shape, and a rejected
request stores nothing (the environment's event count is unchanged). Then the awkward clients:
3 MiB values, 5001-event batches, bodies that trickle in, bodies cut short, connections that
sit idle: the server keeps answering everyone else.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import devserver
from devserver.model.events import MAX_DEPTH, MAX_EVENT_BYTES, MAX_EVENTS_PER_REQUEST
from devserver.testing import LoopThread
from devserver.web.server import Config, Server

from .procs import Http

EXAMPLES = int(os.environ.get("DEVSERVER_HOSTILE_EXAMPLES", "60"))
"""Examples per property; raise it (DEVSERVER_HOSTILE_EXAMPLES=2000) for a deeper sweep."""
ENV = "hostile"
REQUEST_TIMEOUT = 10.0
"""A request that takes longer than this is a hang."""
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

app = devserver.App("hostile")


@app.function(trigger="app/*", retries=0)
async def echo(ctx: devserver.Context) -> Any:
    return ctx.event.data


class Live:
    """The module's server and a keep-alive client to it."""

    def __init__(self, server: Server, loop: LoopThread) -> None:
        self.server = server
        self.loop = loop
        self.url = server.url
        self.http = Http(self.url, timeout=REQUEST_TIMEOUT)

    def events_in(self, env: str = ENV) -> int:
        status, doc = self.http.get_json("/api/environments")
        assert status == 200, doc
        return sum(e["events"] for e in doc["environments"] if e["env"] == env)

    def post(self, body: bytes, headers: dict[str, Any] | None = None,
             key: str = "hostile-key") -> tuple[int, Any]:
        status, data, _ = self.http.request(
            "POST", f"/e/{key}", body, {"Content-Type": "application/json",
                                        "X-Inngest-Env": ENV, **(headers or {})})
        return status, json.loads(data)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    loop = LoopThread()
    path = tmp_path_factory.mktemp("hostile") / "hostile.sqlite3"
    server = Server(Config(db=str(path), functions=app.functions, retry_interval=0), port=0)
    loop.call(server.start(), timeout=30)
    live = Live(server, loop)
    try:
        yield live
    finally:
        live.http.close()
        loop.call(server.stop(), timeout=30)
        loop.close()


@pytest.fixture
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail the test if the server logged an internal error (a 500 or a failed write)."""
    with caplog.at_level(logging.ERROR, logger="devserver"):
        yield
    errors = [r.getMessage() for r in caplog.records
              if r.name.startswith("devserver") and r.levelno >= logging.ERROR]
    assert errors == []


def check_event_answer(live: Live, status: int, doc: Any, before: int, events: int | None
                       ) -> None:
    """The /e/ contract: 200 with one id per event, or 400/413 with the error shape and
    nothing stored."""
    assert status in (200, 400, 413), (status, doc)
    assert doc["status"] == status
    after = live.events_in()
    if status == 200:
        assert events is None or len(doc["ids"]) == events
        assert after == before + len(doc["ids"])
    else:
        assert doc["ids"] == []
        assert isinstance(doc["error"], str)
        assert doc["error"]
        assert after == before, f"a rejected request stored {after - before} events: {doc}"


def sendable(value: bytes) -> bool:
    """Whether a header value is one HTTP allows (no control characters but tab, no padding);
    aiohttp refuses the others itself, before devserver sees the request."""
    return value == value.strip(b" \t") and not any((b < 32 and b != 9) or b == 127 for b in value)


# ---------------------------------------------------------------------------------------------
# Strategies

TEXT = st.text(st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\x00", '"',
                                                           "\\", "\n", "\u2028", "\ufeff"])))
NUMBER = st.one_of(st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
                   st.floats(), st.just(2**63), st.just(-(2**63) - 1))
JSON = st.recursive(
    st.none() | st.booleans() | NUMBER | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=16,
)
SESSIONS = st.one_of(JSON, st.dictionaries(st.one_of(TEXT, st.just("conversation_id")),
                                           st.one_of(NUMBER, st.booleans(), TEXT, JSON),
                                           max_size=7))
EVENT = st.fixed_dictionaries(
    {"name": st.one_of(st.just("app/x"), st.just("other/y"), TEXT, JSON)},
    optional={
        "data": JSON,
        "id": st.one_of(TEXT, JSON),
        "ts": st.one_of(st.integers(min_value=315532800000, max_value=4102444799999),
                        NUMBER, JSON),
        "sessions": SESSIONS,
        "v": JSON,
        "user": JSON,
        "meta": st.one_of(JSON, st.fixed_dictionaries(
            {}, optional={"sessions": SESSIONS, "propagated_sessions": SESSIONS})),
    },
)
BODY_DOC = st.one_of(EVENT, st.lists(EVENT, min_size=0, max_size=4), JSON)

# Ways to spoil a JSON text: tokens JSON doesn't have, bytes UTF-8 doesn't have, truncation.
SPOILERS = st.sampled_from([
    b"NaN", b"-Infinity", b"Infinity", b"1e400", b"-1e99999", b"9" * 5000, b"\x00", b"\xff",
    b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b'"\\ud800"', b'"\\u0000"', b"\xef\xbb\xbf",
    b"[" * 3000, b"{", b"}", b",", b'"', b"\\", b"  ", b"\r\n",
])


@st.composite
def spoiled(draw: st.DrawFn) -> bytes:
    """A JSON body with something hostile spliced in somewhere."""
    doc = draw(BODY_DOC)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True)
    raw = text.encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(SPOILERS) + raw[at:]
    if draw(st.booleans()):
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


@st.composite
def deep(draw: st.DrawFn) -> tuple[bytes, int]:
    """An event whose data nests `depth` levels of arrays and objects."""
    depth = draw(st.one_of(st.integers(1, MAX_DEPTH + 5), st.integers(1, 5000)))
    layers = [draw(st.sampled_from(["[", '{"k":'])) for _ in range(depth)]
    closes = "".join("]" if layer == "[" else "}" for layer in reversed(layers))
    body = '{"name":"app/deep","data":{"v":' + "".join(layers) + "1" + closes + "}}"
    return body.encode(), depth + 2


# ---------------------------------------------------------------------------------------------
# The event API


@SETTINGS
@given(body=st.one_of(spoiled(), st.binary(max_size=300)))
def test_malformed_bodies_are_400_and_store_nothing(live: Live, body: bytes) -> None:
    before = live.events_in()
    status, doc = live.post(body)
    check_event_answer(live, status, doc, before, None)


@pytest.mark.slow
@SETTINGS
@given(doc=BODY_DOC, ascii_only=st.booleans())
def test_random_json_is_stored_whole_or_not_at_all(live: Live, doc: Any, ascii_only: bool
                                                   ) -> None:
    before = live.events_in()
    body = json.dumps(doc, ensure_ascii=ascii_only, allow_nan=True)
    status, answer = live.post(body.encode("utf-8", "surrogatepass"))
    events = len(doc) if isinstance(doc, list) else 1
    check_event_answer(live, status, answer, before, events)


@pytest.mark.slow
@SETTINGS
@given(case=deep())
def test_deep_nesting_is_accepted_up_to_the_limit_and_refused_beyond(
    live: Live, case: tuple[bytes, int]
) -> None:
    body, levels = case
    before = live.events_in()
    status, doc = live.post(body)
    check_event_answer(live, status, doc, before, 1)
    assert status == (200 if levels <= MAX_DEPTH else 400), (levels, doc)


@pytest.mark.slow
@SETTINGS
@given(key=TEXT.filter(lambda k: k and "/" not in k),
       env=st.one_of(TEXT, st.binary(min_size=1, max_size=40)),
       seed=st.one_of(TEXT, st.binary(max_size=40),
                      st.from_regex(r"\A\d{1,20},[A-Za-z0-9+/=]{0,20}\Z")))
def test_odd_keys_environments_and_seed_headers(live: Live, key: str, env: Any, seed: Any
                                                ) -> None:
    headers = {"X-Inngest-Env": env, "x-inngest-event-id-seed": seed}
    for name, value in list(headers.items()):
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        if sendable(raw):
            headers[name] = raw
        else:
            del headers[name]
    path_key = urllib.parse.quote(key.encode("utf-8", "surrogatepass"), safe="")
    status, data, _ = live.http.request(
        "POST", f"/e/{path_key}", b'{"name": "app/odd", "data": {}}',
        {"Content-Type": "application/json", **headers})
    assert status in (200, 400), (status, data)
    doc = json.loads(data)
    assert doc["status"] == status


def test_values_of_3_mib_and_batches_of_5001_are_refused_whole(
    live: Live, no_internal_errors: None
) -> None:
    small = {"name": "app/big", "data": {}, "sessions": {"big": "batch"}}
    fits = {"name": "app/big", "data": {"v": "x" * (MAX_EVENT_BYTES - 200)}}
    too_big = {"name": "app/big", "data": {"v": "x" * MAX_EVENT_BYTES}}
    for body, expected in (([small, too_big], 413), ([small] * (MAX_EVENTS_PER_REQUEST + 1), 413),
                           ([small, fits], 200)):
        before = live.events_in()
        status, doc = live.post(json.dumps(body).encode())
        assert status == expected, doc
        check_event_answer(live, status, doc, before, len(body))
    # The refused batches left no session behind; the accepted one did.
    status, doc = live.http.get_json("/api/session", identifier="big", value="batch", env=ENV)
    assert status == 200
    assert doc["stats"]["runs"] == 1


# ---------------------------------------------------------------------------------------------
# The JSON API and the pages

QUERY_NAMES = ["identifier", "value", "q", "sort", "limit", "cursor", "env", "function_id",
               "status", "v"]
PATHS = ["/api/sessions", "/api/session", "/api/runs", "/api/environments", "/api/status",
         "/api/functions", "/api/apps", "/dev", "/sessions", "/session", "/session/fixture", "/",
         "/health"]
ID_PATHS = ["/api/runs/{}", "/runs/{}", "/v1/events/{}", "/v1/events/{}/runs", "/v1/runs/{}",
            "/static/{}"]


def cursors() -> st.SearchStrategy[str]:
    """Cursors that decode (base64 of JSON, as the server makes them) and ones that don't."""
    made = st.lists(st.one_of(NUMBER, TEXT, st.booleans(), st.none()), max_size=3).map(
        lambda key: base64.urlsafe_b64encode(
            json.dumps(key, allow_nan=True).encode("utf-8", "surrogatepass")).decode().rstrip("="))
    return st.one_of(TEXT, made)


PARAM_VALUE = st.one_of(TEXT, st.sampled_from(["", "0", "-1", "500", "501", "9" * 5000,
                                               "last_active", "runs", "value", "failure_rate",
                                               "Running", "dev", ENV, "conversation_id"]))


def check_answer(status: int, data: bytes, headers: dict[str, str]) -> None:
    assert status < 500, (status, data[:500])
    if headers.get("Content-Type", "").startswith("application/json"):
        doc = json.loads(data)
        if status >= 400:
            assert doc["status"] == status
            assert isinstance(doc["error"], str)


@SETTINGS
@given(path=st.sampled_from(PATHS),
       params=st.lists(st.tuples(st.sampled_from(QUERY_NAMES),
                                 st.one_of(PARAM_VALUE, cursors())), max_size=5),
       html=st.booleans())
def test_any_query_parameters(live: Live, path: str, params: list[tuple[str, str]],
                              html: bool) -> None:
    query = urllib.parse.urlencode(
        [(k, v.encode("utf-8", "surrogatepass")) for k, v in params])
    status, data, headers = live.http.request(
        "GET", f"{path}?{query}", headers={"Accept": "text/html"} if html else {})
    check_answer(status, data, headers)


@SETTINGS
@given(template=st.sampled_from(ID_PATHS), ident=TEXT, html=st.booleans(),
       env=st.one_of(st.none(), TEXT))
def test_any_ids_in_paths(live: Live, template: str, ident: str, html: bool, env: str | None
                          ) -> None:
    segment = urllib.parse.quote(ident.encode("utf-8", "surrogatepass"), safe="")
    path = template.format(segment or "x")
    if env is not None:
        path += "?" + urllib.parse.urlencode({"env": env.encode("utf-8", "surrogatepass")})
    status, data, headers = live.http.request(
        "GET", path, headers={"Accept": "text/html"} if html else {})
    check_answer(status, data, headers)
    status, data, headers = live.http.request("DELETE", f"/v1/runs/{segment or 'x'}")
    check_answer(status, data, headers)


@SETTINGS
@given(header=st.sampled_from(["X-Inngest-Env", "Host", "Accept", "If-None-Match"]),
       value=st.binary(min_size=1, max_size=40), path=st.sampled_from([*PATHS, "/static/live.js"]))
def test_header_bytes_that_are_not_utf8(live: Live, header: str, value: bytes, path: str
                                        ) -> None:
    if not sendable(value):
        return
    status, data, headers = live.http.request("GET", path, headers={header: value})
    check_answer(status, data, headers)


def test_everything_stored_so_far_renders(live: Live, no_internal_errors: None) -> None:
    """The runs and sessions the properties above created, odd data and all, show on every
    page and in the API; and every run they started has finished."""
    live.loop.call(live.server.runner.wait_idle(), timeout=30)
    status, doc = live.http.get_json("/api/sessions", env=ENV)
    assert status == 200
    for ident in doc["identifiers"][:20]:
        for page in ("/api/sessions", "/sessions"):
            query = urllib.parse.urlencode({"identifier": ident["identifier"], "env": ENV})
            status, data, _ = live.http.request("GET", f"{page}?{query}")
            assert status == 200, data[:300]
    status, runs = live.http.get_json("/api/runs", env=ENV, limit="200")
    assert status == 200
    assert runs["runs"], "the properties started no runs"
    assert all(r["status"] in ("Completed", "Failed") for r in runs["runs"])
    for run in runs["runs"][:100]:
        for page in ("/api/runs/", "/runs/"):
            status, data, _ = live.http.request("GET", page + run["run_id"])
            assert status == 200, data[:300]


# ---------------------------------------------------------------------------------------------
# Slow, cut-short and idle clients


def raw_connection(live: Live) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT)


def read_status(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer else 0


def timed_health(live: Live) -> float:
    """Seconds /health takes on a fresh connection."""
    began = time.monotonic()
    probe = Http(live.url, timeout=REQUEST_TIMEOUT)
    try:
        assert probe.get_json("/health")[0] == 200
    finally:
        probe.close()
    return time.monotonic() - began


def test_a_body_that_trickles_in_is_served_and_blocks_no_one(
    live: Live, no_internal_errors: None
) -> None:
    body = json.dumps({"name": "app/slow", "data": {"pad": "p" * 400},
                       "sessions": {"client": "slow"}}).encode()
    before = live.events_in()
    with raw_connection(live) as sock:
        sock.sendall(b"POST /e/key HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Inngest-Env: hostile\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        slowest = 0.0
        for i in range(0, len(body), 20):  # 20 bytes at a time, ~0.5 s in all
            sock.sendall(body[i:i + 20])
            slowest = max(slowest, timed_health(live))
            time.sleep(0.02)  # pacing the slow client
        assert read_status(sock) == 200
    assert slowest < 2.0, f"other requests waited {slowest:.2f}s behind a slow body"
    assert live.events_in() == before + 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_cut_short_stores_nothing_and_the_server_carries_on(
    live: Live, no_internal_errors: None, framing: str
) -> None:
    body = json.dumps([{"name": "app/cut", "data": {}, "sessions": {"client": "cut"}}]).encode()
    before = live.events_in()
    for _ in range(20):
        with raw_connection(live) as sock:
            head = (b"POST /e/key HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Inngest-Env: hostile\r\n"
                    b"Content-Type: application/json\r\n")
            if framing == "chunked":
                sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n" % len(body) + body + b"\r\n")  # no final 0 chunk
            else:
                sock.sendall(head + b"Content-Length: %d\r\n\r\n" % (len(body) + 100) + body)
        # closed here, mid-body
    assert timed_health(live) < 2.0
    assert live.events_in() == before
    status, _ = live.http.get_json("/api/session", identifier="client", value="cut", env=ENV)
    assert status == 404


def test_idle_and_half_sent_connections_do_not_stop_others_being_served(
    live: Live, no_internal_errors: None
) -> None:
    idle: list[socket.socket] = []
    try:
        for i in range(200):
            sock = raw_connection(live)
            if i % 3 == 1:
                # headers unfinished
                sock.sendall(b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            elif i % 3 == 2:
                sock.sendall(b"POST /e/key HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Length: 1000\r\n\r\n{")
            idle.append(sock)
        times = [timed_health(live) for _ in range(20)]
        before = live.events_in()
        status, doc = live.post(json.dumps({"name": "app/while-idle"}).encode())
        assert status == 200, doc
        assert live.events_in() == before + 1
    finally:
        for sock in idle:
            sock.close()
    assert max(times) < 2.0, times
    assert timed_health(live) < 2.0


def test_static_files_never_leave_their_folder(live: Live, no_internal_errors: None) -> None:
    for path in ("/static/..%2f..%2fetc%2fpasswd", "/static/%2e%2e/%2e%2e/etc/passwd",
                 "/static/..%2F..%2F..%2Fpyproject.toml", "/static/%2e%2e%2fbase.html",
                 "/static/....//....//etc/passwd", "/static/..\\..\\etc\\passwd",
                 "/static/%252e%252e%252fetc%252fpasswd", "/static//etc/passwd",
                 "/static/../../devserver/server.py", "/static/%00", "/static/live.js%00.py",
                 "/static/live.js/..%2f..%2fbase.html"):
        status, data, _ = live.http.request("GET", path)
        assert status in (400, 404), (path, status)
        assert b"root:" not in data
        assert b"<html" not in data.lower()
        assert b"import" not in data
    status, data, headers = live.http.request("GET", "/static/live.js")
    assert status == 200
    assert headers["Content-Type"].startswith("text/javascript")


def test_concurrent_hostile_posts_leave_counts_exact(live: Live, no_internal_errors: None
                                                     ) -> None:
    """Good and bad requests at once from several threads: the count moves by exactly the
    accepted events."""
    accepted: list[int] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        conn = Http(live.url, timeout=REQUEST_TIMEOUT)
        try:
            for j in range(30):
                good = (i + j) % 2 == 0
                body = (json.dumps([{"name": "app/mix", "sessions": {"t": str(i)}}] * 3)
                        if good else '[{"name": "app/mix"}, {"name": ""}]')
                status, data, _ = conn.request("POST", "/e/k", body.encode(),
                                               {"X-Inngest-Env": ENV})
                assert status == (200 if good else 400), data
                with lock:
                    accepted.append(3 if good else 0)
        finally:
            conn.close()

    before = live.events_in()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(accepted) == 6 * 30
    assert live.events_in() == before + sum(accepted)

