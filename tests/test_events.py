"""Unit tests for devserver.model.events: the event API body rules (SPEC 2.1, 2.2)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devserver.errors import InvalidEvent, PayloadTooLarge
from devserver.model.events import (
    MAX_EVENT_BYTES,
    MAX_EVENTS_PER_REQUEST,
    MAX_IDENTIFIER_CHARS,
    MAX_SESSIONS,
    MAX_VALUE_CHARS,
    TS_MAX_MS,
    TS_MIN_MS,
    IncomingEvent,
    js_number_string,
    loads,
    normalize_sessions,
    parse_body,
    session_value_string,
    validate_event,
)


def encode(payload: Any, *, ascii_only: bool = False) -> bytes:
    return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8")


def one(event: Any) -> IncomingEvent:
    (parsed,) = parse_body(encode(event))
    return parsed


def rejects(payload: Any, *fragments: str, exc: type[Exception] = InvalidEvent) -> str:
    """Assert parse_body raises exactly `exc` with every fragment in the message."""
    body = payload if isinstance(payload, bytes) else encode(payload)
    with pytest.raises(exc) as info:
        parse_body(body)
    assert type(info.value) is exc
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def with_sessions(sessions: Any = None, meta: Any = None, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"name": "app/x", **fields}
    if sessions is not None:
        event["sessions"] = sessions
    if meta is not None:
        event["meta"] = meta
    return event


# --- whole events ----------------------------------------------------------------------------


def test_minimal_event_defaults() -> None:
    assert one({"name": "app/x"}) == IncomingEvent(
        name="app/x", data={}, id=None, ts=None, v=None, user=None, meta=None, sessions={}
    )


def test_full_event_kept_as_given() -> None:
    event = {
        "name": "app/user.created",
        "data": {"a": [1, 2.5, None, {"b": "c"}]},
        "id": "key-1",
        "ts": 1_700_000_000_000,
        "v": "2024-01-01.1",
        "user": {"id": 7},
        "meta": {"trace": "t", "sessions": {"conv": "c1"}},
        "sessions": {"user": 42},
    }
    got = one(event)
    assert got.name == "app/user.created"
    assert got.data == {"a": [1, 2.5, None, {"b": "c"}]}
    assert (got.id, got.ts, got.v, got.user) == (
        "key-1",
        1_700_000_000_000,
        "2024-01-01.1",
        {"id": 7},
    )
    assert got.meta == {"trace": "t"}
    assert got.sessions == {"conv": "c1", "user": "42"}


def test_array_keeps_order_and_single_object_is_one_event() -> None:
    got = parse_body(encode([{"name": f"e{i}"} for i in range(3)]))
    assert [e.name for e in got] == ["e0", "e1", "e2"]
    assert [e.name for e in parse_body(b'{"name": "solo"}')] == ["solo"]


def test_error_names_the_failing_index_and_validation_is_atomic() -> None:
    rejects([{"name": "a"}, {"name": "b"}, {"name": "c", "data": 5}], "events[2].data", "number")


@pytest.mark.parametrize("value", [[], None, {"v": 1}, {"name": "a"}, [1]])
def test_v_and_user_stored_as_given(value: Any) -> None:
    got = one({"name": "a", "v": value, "user": value})
    assert got.v == value
    assert got.user == value


# --- body and JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"  \n\t\r "])
def test_empty_body(body: bytes) -> None:
    rejects(body, "request body is empty")


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b"{", "line 1 column 2"),
        (b"nope", "line 1 column 1"),
        (b'[\n {"name": "a"},\n {"name": }\n]', "line 3 column 11"),
        (b'{"name": "a"} {}', "Extra data"),
        (b'{"name": "a",}', "line 1 column"),
        (b"{'name': 'a'}", "line 1 column 2"),
        (b'{"name": "a\x01"}', "line 1 column"),
    ],
)
def test_malformed_json_gives_position(body: bytes, where: str) -> None:
    rejects(body, "not valid JSON", where)


def test_invalid_utf8() -> None:
    rejects(b'{"name":\n "a\xff"}', "not valid UTF-8", "0xff", "line 2 column 4", "byte offset 12")
    rejects(b'{"name": "\xed\xa0\x80"}', "not valid UTF-8")  # an encoded surrogate
    rejects(b"\xef\xbb\xbf" + b'{"name": "a"}', "byte order mark")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E+999"])
def test_non_finite_numbers(literal: str) -> None:
    body = '{"name": "NaN Infinity 1e400",\n "data": {"x": ' + literal + "}}"
    rejects(body.encode(), literal, "line 2 column 16")
    with pytest.raises(InvalidEvent):
        loads(body)


def test_numbers_too_long_or_too_deep() -> None:
    digits = b"9" * 5000
    body = b'{"name": "a", "data": {"f": 0.' + digits + b', "x": ' + digits + b"}}"
    rejects(body, "number too long at line 1 column 5038: at most 4300 digits")
    rejects(b"[" * 100_000 + b"]" * 100_000, "nested too deeply")
    rejects(b'{"name": "a", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested")


@pytest.mark.parametrize("body", [b'"a"', b"1", b"null", b"true"])
def test_top_level_must_be_object_or_array(body: bytes) -> None:
    rejects(body, "event object or an array of event objects")


def test_empty_array_and_non_object_items() -> None:
    rejects(b"[]", "no events")
    rejects(b'[{"name": "a"}, "b"]', "events[1]", "must be an event object", "string")
    rejects(b"[null]", "events[0]", "null")


def test_loads_accepts_str_and_bytes() -> None:
    assert (
        loads('{"a": [1, 2.5, "\u00e9"]}')
        == loads('{"a": [1, 2.5, "é"]}'.encode())
        == {"a": [1, 2.5, "é"]}
    )
    with pytest.raises(InvalidEvent, match="line 1 column 1"):
        loads(b"")


# --- limits ------------------------------------------------------------------------------------

SMALL = b'{"name":"a"}'
EVENTS_AT_LIMIT = b"[" + b",".join([SMALL] * MAX_EVENTS_PER_REQUEST) + b"]"
EVENTS_OVER_LIMIT = EVENTS_AT_LIMIT[:-1] + b"," + SMALL + b"]"


def test_events_per_request_limit() -> None:
    assert len(parse_body(EVENTS_AT_LIMIT)) == MAX_EVENTS_PER_REQUEST
    rejects(EVENTS_OVER_LIMIT, "5001", "5000", exc=PayloadTooLarge)


def sized_event(size: int) -> dict[str, Any]:
    """An event whose compact UTF-8 JSON is exactly `size` bytes, padded with 2-byte chars."""
    event: dict[str, Any] = {"name": "big", "data": {"pad": ""}}
    overhead = len(json.dumps(event, separators=(",", ":")).encode())
    wide, narrow = divmod(size - overhead, 2)
    event["data"]["pad"] = "é" * wide + "x" * narrow
    assert len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()) == size
    return event


BIG_AT_LIMIT = sized_event(MAX_EVENT_BYTES)
BIG_OVER_LIMIT = sized_event(MAX_EVENT_BYTES + 1)


def test_event_size_limit_in_compact_utf8_bytes() -> None:
    assert len(parse_body(encode([{"name": "a"}, BIG_AT_LIMIT]))) == 2
    compact = json.dumps(BIG_AT_LIMIT, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(compact) == MAX_EVENT_BYTES
    assert len(parse_body(compact)) == 1
    message = rejects([{"name": "a"}, BIG_OVER_LIMIT], "events[1]", exc=PayloadTooLarge)
    assert f"{MAX_EVENT_BYTES + 1} bytes" in message
    assert f"at most {MAX_EVENT_BYTES} bytes" in message


def test_event_size_counts_the_re_encoded_event_not_the_source() -> None:
    # "1e15" re-encodes as "1000000000000000.0": a body under 3 MiB holding a bigger event.
    body = b'{"name": "a", "data": {"x": [' + b",".join([b"1e15"] * 170_000) + b"]}}"
    assert len(body) < MAX_EVENT_BYTES
    rejects(body, "events[0]", exc=PayloadTooLarge)


# --- fields ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "fragments"),
    [
        ({}, ["events[0].name", "required"]),
        ({"name": None}, ["events[0].name", "required"]),
        ({"name": 1}, ["events[0].name", "string", "number"]),
        ({"name": ["a"]}, ["events[0].name", "array"]),
        ({"name": ""}, ["events[0].name", "empty"]),
        ({"name": "inngest/function.failed"}, ["events[0].name", "reserved"]),
        ({"name": "INNGEST/x"}, ["reserved"]),
        ({"name": "Inngest/"}, ["reserved"]),
        ({"name": "a", "data": []}, ["events[0].data", "object", "array"]),
        ({"name": "a", "data": "x"}, ["events[0].data", "string"]),
        ({"name": "a", "data": 0}, ["events[0].data", "number"]),
        ({"name": "a", "id": 1}, ["events[0].id", "string", "number"]),
        ({"name": "a", "id": True}, ["events[0].id", "boolean"]),
        ({"name": "a", "id": {}}, ["events[0].id", "object"]),
        ({"name": "a", "meta": []}, ["events[0].meta", "object"]),
        ({"name": "a", "meta": "s"}, ["events[0].meta", "string"]),
    ],
)
def test_field_errors(event: dict[str, Any], fragments: list[str]) -> None:
    rejects(event, *fragments)


@pytest.mark.parametrize("name", ["inngestx/a", "app/inngest/x", "inngest", "app.inngest/", " x"])
def test_names_that_are_not_reserved(name: str) -> None:
    assert one({"name": name}).name == name


def test_data_defaults_and_id() -> None:
    assert one({"name": "a", "data": None}).data == {}
    assert one({"name": "a", "data": {"k": None}}).data == {"k": None}
    assert one({"name": "a", "id": None}).id is None
    assert one({"name": "a", "id": ""}).id is None
    assert one({"name": "a", "id": " k "}).id == " k "


@pytest.mark.parametrize("ts", [TS_MIN_MS, TS_MAX_MS - 1, 1_700_000_000_000])
def test_ts_in_range(ts: int) -> None:
    assert one({"name": "a", "ts": ts}).ts == ts


@pytest.mark.parametrize("ts", [TS_MIN_MS - 1, TS_MAX_MS, 0, -1, 10**30])
def test_ts_out_of_range(ts: int) -> None:
    rejects({"name": "a", "ts": ts}, "events[0].ts", str(ts), str(TS_MIN_MS), str(TS_MAX_MS))


def test_ts_types() -> None:
    assert one({"name": "a", "ts": None}).ts is None
    got = one({"name": "a", "ts": 1_700_000_000_000.0}).ts
    assert got == 1_700_000_000_000
    assert type(got) is int
    rejects({"name": "a", "ts": 1_700_000_000_000.5}, "events[0].ts", "integer")
    rejects({"name": "a", "ts": True}, "events[0].ts", "boolean")
    rejects({"name": "a", "ts": "1700000000000"}, "events[0].ts", "string")
    rejects({"name": "a", "ts": 1_700_000_000}, "events[0].ts", "seconds")


def test_meta_keeps_other_keys_and_drops_sessions() -> None:
    assert one({"name": "a", "meta": None}).meta is None
    assert one({"name": "a", "meta": {}}).meta is None
    assert one({"name": "a", "meta": {"sessions": {"a": "1"}}}).meta is None
    meta = {"x": 1, "sessions": {"a": "1"}, "propagated_sessions": {"b": "2"}}
    assert one({"name": "a", "meta": meta}).meta == {"x": 1}


# --- sessions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("conv_1234", "conv_1234"),
        (True, "true"),
        (False, "false"),
        (2, "2"),
        (0, "0"),
        (-7, "-7"),
        (2.5, "2.5"),
        (1.0, "1"),
        (-0.0, "0"),
        (1e21, "1e+21"),
        (12345678901234567890, "12345678901234567000"),
        ("true", "true"),
        (" padded ", " padded "),
    ],
)
def test_session_value_types(value: Any, stored: str) -> None:
    assert one(with_sessions({"k": value})).sessions == {"k": stored}
    assert one(with_sessions(meta={"sessions": {"k": value}})).sessions == {"k": stored}
    assert session_value_string(value, "here") == stored


@pytest.mark.parametrize(
    ("value", "fragment"),
    [([], "array"), ({}, "object"), ("", "empty"), (10**400, "too large"), ([1], "array")],
)
def test_session_value_rejected(value: Any, fragment: str) -> None:
    rejects(with_sessions({"k": value}), 'events[0].sessions["k"]', fragment)
    rejects(with_sessions(meta={"sessions": {"k": value}}), 'events[0].meta.sessions["k"]')


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), None, object()])
def test_session_value_string_rejects(value: Any) -> None:
    with pytest.raises(InvalidEvent, match=r"^here: "):
        session_value_string(value, "here")


def test_session_containers_must_be_objects() -> None:
    rejects(with_sessions(["a"]), "events[0].sessions", "array")
    rejects(with_sessions("a"), "events[0].sessions", "string")
    rejects(with_sessions(meta={"sessions": 1}), "events[0].meta.sessions", "number")
    rejects(with_sessions(meta={"propagated_sessions": []}), "events[0].meta.propagated_sessions")
    nulls = {"sessions": None, "meta": {"sessions": None, "propagated_sessions": None}}
    assert one({"name": "a", **nulls}).sessions == {}


def test_null_values_outside_meta_sessions_rejected() -> None:
    rejects(with_sessions({"k": None}), 'events[0].sessions["k"]', "null")
    rejects(with_sessions(meta={"propagated_sessions": {"k": None}}), "propagated_sessions", "null")


def test_identifier_length() -> None:
    ok = "i" * MAX_IDENTIFIER_CHARS
    assert one(with_sessions({ok: "v"})).sessions == {ok: "v"}
    emoji = "😀" * MAX_IDENTIFIER_CHARS  # characters, not bytes
    assert one(with_sessions({emoji: "v"})).sessions == {emoji: "v"}
    rejects(with_sessions({ok + "i": "v"}), "events[0].sessions", "129 characters", "128")
    rejects(with_sessions({emoji + "😀": "v"}), "129 characters")
    rejects(with_sessions({"": "v"}), 'events[0].sessions[""]', "empty")
    rejects(with_sessions(meta={"sessions": {"": None}}), "events[0].meta.sessions", "empty")


def test_value_length() -> None:
    ok = "v" * MAX_VALUE_CHARS
    assert one(with_sessions({"k": ok})).sessions == {"k": ok}
    emoji = "😀" * MAX_VALUE_CHARS
    assert one(with_sessions({"k": emoji})).sessions == {"k": emoji}
    events = [{"name": "a"}, {"name": "b"}, with_sessions({"user id": ok + "v"})]
    message = rejects(events)
    assert (
        message == 'events[2].sessions["user id"]: value is 513 characters; at most 512 are allowed'
    )


def test_session_count_after_merging() -> None:
    five = {f"k{i}": str(i) for i in range(MAX_SESSIONS)}
    assert one(with_sessions(five)).sessions == five
    rejects(with_sessions({**five, "k9": "9"}), "events[0].sessions", "6 sessions", "5")
    three = {"p1": "1", "p2": "2", "p3": "3"}
    meta: dict[str, Any] = {
        "propagated_sessions": three,
        "sessions": {"m1": "1", "m2": "2", "m3": "3"},
    }
    rejects(with_sessions(meta=meta), "6 sessions")
    # shared identifiers count once; a tombstone frees a slot
    assert len(one(with_sessions(three, meta={"propagated_sessions": three})).sessions) == 3
    meta = {"propagated_sessions": five, "sessions": {"k0": None}}
    assert len(one(with_sessions({"new": "x"}, meta=meta)).sessions) == MAX_SESSIONS


def test_conflict_between_sessions_and_meta_sessions() -> None:
    message = rejects(
        with_sessions({"user id": "u1"}, meta={"sessions": {"user id": "u2"}}),
        'events[0].sessions["user id"]',
        '"u1"',
        '"u2"',
    )
    assert "conflict" in message
    rejects(with_sessions({"n": 2}, meta={"sessions": {"n": "2.0"}}), "conflict")
    rejects(
        with_sessions({"c": "A"}, meta={"sessions": {"c": "a"}}), "conflict"
    )  # values are opaque
    # equal after normalising is fine
    assert one(with_sessions({"n": 2}, meta={"sessions": {"n": "2"}})).sessions == {"n": "2"}
    assert one(with_sessions({"b": True}, meta={"sessions": {"b": "true"}})).sessions == {
        "b": "true"
    }


def test_explicit_values_override_propagated_ones() -> None:
    meta = {"propagated_sessions": {"a": "old", "b": "old"}, "sessions": {"a": "new"}}
    assert one(with_sessions({"b": "newer"}, meta=meta)).sessions == {"a": "new", "b": "newer"}


def test_tombstones() -> None:
    meta: dict[str, Any] = {"propagated_sessions": {"a": "1", "b": "2"}, "sessions": {"a": None}}
    assert one(with_sessions(meta=meta)).sessions == {"b": "2"}
    meta["sessions"] = {"zz": None}  # removing a key that is not there is a no-op
    assert one(with_sessions(meta=meta)).sessions == {"a": "1", "b": "2"}
    meta["sessions"] = {"a": None}  # an explicit top-level value survives the tombstone
    assert one(with_sessions({"a": "kept"}, meta=meta)).sessions == {"b": "2", "a": "kept"}


def test_sessions_insertion_order() -> None:
    meta = {"propagated_sessions": {"p1": "1", "p2": "2"}, "sessions": {"m1": "3", "p2": "4"}}
    got = one(with_sessions({"s1": "5", "m1": "3"}, meta=meta)).sessions
    assert list(got.items()) == [("p1", "1"), ("p2", "4"), ("m1", "3"), ("s1", "5")]


def test_normalize_sessions_directly() -> None:
    got = normalize_sessions({"a": 1}, {"b": False}, {"c": "x", "b": "y"}, "events[4]")
    assert got == {"c": "x", "b": "false", "a": "1"}
    assert normalize_sessions(None, None, None, "events[0]") == {}
    with pytest.raises(InvalidEvent, match=r'^events\[4\]\.sessions\["a"\]'):
        normalize_sessions({"a": []}, None, None, "events[4]")
    with pytest.raises(InvalidEvent, match=r"^events\[1\]\.meta\.sessions\[7\]: .* string"):
        normalize_sessions(None, {7: "x"}, None, "events[1]")


ODD = [
    "a/b:c?d#e%f&g+h",
    "with spaces  and\ttabs ",
    "quotes \" and ' and `",
    "<script>alert('x')</script>",
    "emoji 😀🎉 and ünïcödé 中文",
    "nul\x00char",
    "%2F%20+%",
    "back\\slash",
    "line\u2028sep\nnewline",
    "MiXeD CaSe",
]


@pytest.mark.parametrize("text", ODD)
@pytest.mark.parametrize("ascii_only", [False, True])
def test_odd_characters_round_trip_unchanged(text: str, ascii_only: bool) -> None:
    event = {"name": text, "id": text, "data": {text: text}, "sessions": {text: text}}
    (got,) = parse_body(encode(event, ascii_only=ascii_only))
    assert (got.name, got.id, got.data, got.sessions) == (text, text, {text: text}, {text: text})


def test_surrogate_pair_escape_is_fine() -> None:
    assert one({"name": "a", "sessions": {"k": "😀"}}).sessions == {"k": "😀"}
    (got,) = parse_body(b'{"name": "\\ud83d\\ude00", "data": {"k": "\\\\ud800"}}')
    assert got.name == "😀"
    assert got.data == {"k": "\\ud800"}


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"name": "\ud800"}, "events[0].name"),
        ({"name": "a", "id": "x\udfff"}, "events[0].id"),
        ({"name": "a", "data": {"k": ["\ud800"]}}, 'events[0].data["k"][0]'),
        ({"name": "a", "data": {"\ud800": 1}}, "events[0].data"),
        ({"name": "a", "v": "\ud800"}, "events[0].v"),
        ({"name": "a", "user": {"x": "\ud800"}}, "events[0].user"),
        ({"name": "a", "meta": {"x": "\ud800"}}, "events[0].meta"),
        ({"name": "a", "sessions": {"k": "\ud800"}}, 'events[0].sessions["k"]'),
        ({"name": "a", "sessions": {"\ud800": "v"}}, "events[0].sessions"),
        ({"name": "a", "meta": {"sessions": {"k": "\udc00"}}}, "events[0].meta.sessions"),
    ],
)
def test_unpaired_surrogates_rejected(event: dict[str, Any], field: str) -> None:
    message = rejects(
        encode([{"name": "ok"}, event], ascii_only=True), field.replace("events[0]", "events[1]")
    )
    assert "surrogate" in message
    message.encode("utf-8")  # the message itself must be sendable
    with pytest.raises(InvalidEvent, match="surrogate"):
        validate_event(event, 0)


def test_validate_event_directly() -> None:
    assert validate_event({"name": "a", "sessions": {"k": 1}}, 3).sessions == {"k": "1"}
    with pytest.raises(InvalidEvent, match=r"^events\[7\]: "):
        validate_event(["a"], 7)
    with pytest.raises(InvalidEvent, match=r"^events\[2\]\.data"):
        validate_event({"name": "a", "data": {"x": float("nan")}}, 2)
    with pytest.raises(InvalidEvent, match=r"^events\[2\]\.data"):
        validate_event({"name": "a", "data": {"x": {1, 2}}}, 2)
    with pytest.raises(InvalidEvent, match=r'^events\[2\]\.data\[1\]\["x"\]: string contains'):
        validate_event({"name": "a", "data": {1: {"x": "\ud800"}}}, 2)


# --- JavaScript number strings -----------------------------------------------------------------

JS_STRINGS = [  # outputs of node's String(n)
    (0, "0"),
    (-0.0, "0"),
    (2, "2"),
    (2.5, "2.5"),
    (1.0, "1"),
    (-1.5, "-1.5"),
    (100, "100"),
    (123.456, "123.456"),
    (0.1 + 0.2, "0.30000000000000004"),
    (1e20, "100000000000000000000"),
    (1e21, "1e+21"),
    (1.2345e21, "1.2345e+21"),
    (123456789012345680000, "123456789012345680000"),
    (12345678901234567890, "12345678901234567000"),
    (9007199254740993, "9007199254740992"),
    (1e16, "10000000000000000"),
    (0.000001, "0.000001"),
    (0.0000012345, "0.0000012345"),
    (1.5e-7, "1.5e-7"),
    (1e-7, "1e-7"),
    (-1e-7, "-1e-7"),
    (123e-20, "1.23e-18"),
    (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (4.35, "4.35"),
    (0.5, "0.5"),
    (float("nan"), "NaN"),
    (float("inf"), "Infinity"),
    (float("-inf"), "-Infinity"),
]


@pytest.mark.parametrize(("number", "expected"), JS_STRINGS)
def test_js_number_string(number: float, expected: str) -> None:
    assert js_number_string(number) == expected


@pytest.mark.parametrize("n", [2**53 - 1, 2**53, 2**53 + 1, -(2**53) - 1, 10**21, 10**21 + 1])
def test_int_session_values_match_js_at_the_double_boundary(n: int) -> None:
    assert session_value_string(n, "here") == js_number_string(float(n))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
)
def test_session_number_strings_are_js_strings(n: float) -> None:
    text = session_value_string(n, "here")
    assert text == js_number_string(n)
    assert float(text) == float(n)


def test_js_number_string_huge_int_overflows() -> None:
    with pytest.raises(OverflowError):
        js_number_string(10**400)


# --- properties --------------------------------------------------------------------------------

TEXT = st.text(st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\x00", '"'])))
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
SESSION_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT, JSON)
SESSIONS = st.one_of(JSON, st.dictionaries(TEXT, SESSION_VALUE, max_size=7))
EVENT = st.fixed_dictionaries(
    {"name": st.one_of(TEXT, st.just("app/x"), JSON)},
    optional={
        "data": JSON,
        "id": st.one_of(TEXT, JSON),
        "ts": st.one_of(st.integers(), st.floats(), JSON),
        "sessions": SESSIONS,
        "meta": st.one_of(
            JSON,
            st.fixed_dictionaries(
                {}, optional={"sessions": SESSIONS, "propagated_sessions": SESSIONS}
            ),
        ),
    },
)


def check_outcome(body: bytes) -> None:
    try:
        got = parse_body(body)
    except (InvalidEvent, PayloadTooLarge) as e:
        str(e).encode("utf-8")
        return
    assert got
    assert all(isinstance(e, IncomingEvent) for e in got)
    for event in got:
        assert len(event.sessions) <= MAX_SESSIONS
        for key, value in event.sessions.items():
            assert 0 < len(key) <= MAX_IDENTIFIER_CHARS
            assert 0 < len(value) <= MAX_VALUE_CHARS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(body: bytes) -> None:
    check_outcome(body)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(JSON, st.booleans())
def test_arbitrary_json(value: Any, ascii_only: bool) -> None:
    check_outcome(json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(st.lists(EVENT, min_size=1, max_size=3) | EVENT, st.booleans())
def test_arbitrary_events(value: Any, ascii_only: bool) -> None:
    check_outcome(json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))
