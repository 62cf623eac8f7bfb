"""Replay, export and the demo (SPEC 4, issue 5), run for real.

Servers are `python -m devserver` children on port 0 (tests/procs.py); `replay` and `export`
run in-process through `cli.main`, which is what the console script calls. Waits are for a
condition (a banner line, a settled session, a process exit), each with a timeout.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import devserver
from devserver import demo
from devserver.cli import main as cli
from devserver.cli import replay, report
from devserver.model.records import StoredEvent
from devserver.store.facade import Store

from .helpers import eventually_sync
from .procs import ERROR_PREFIX, ERROR_TIMEOUT, RUN_TIMEOUT, Devserver, Spawn

APP_SOURCE = textwrap.dedent(
    """
    import devserver

    app = devserver.App("rt")


    @app.function(trigger="chat/message", retries=1)
    async def answer(ctx):
        n = ctx.event.data.get("n")
        await ctx.step.run("think", lambda: n)
        await ctx.step.send_event("notify", {"name": "chat/answered", "data": {"n": n}})
        if ctx.event.data.get("fail"):
            raise devserver.NonRetriableError(f"cannot answer message {n}")
        return {"n": n}


    @app.function(trigger="chat/answered", retries=0)
    async def audit(ctx):
        return {"audited": ctx.event.data.get("n")}


    @app.function(trigger="flow/start", retries=0)
    async def confirm(ctx):
        got = await ctx.step.wait_for_event("confirm", event="flow/confirm", timeout="2m")
        if got is None:
            raise devserver.NonRetriableError("no confirmation within 2 minutes")
        return {"confirmed": True}
    """
)
ANSWER, AUDIT = "rt-answer", "rt-audit"
T0 = 1_741_078_800_000  # 2025-03-04T09:00:00Z


def message(n: int, *, fail: bool = False, ts: int | None = None, **sessions: Any,
            ) -> dict[str, Any]:
    """A `chat/message` event: `answer` runs on it (failing if told), then `audit`."""
    event: dict[str, Any] = {"name": "chat/message", "data": {"n": n}}
    if fail:
        event["data"]["fail"] = True
    if ts is not None:
        event["ts"] = ts
    if sessions:
        event["sessions"] = sessions
    return event


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "rt_app.py"
    path.write_text(APP_SOURCE)
    return path


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(ev, ensure_ascii=False) + "\n" for ev in events),
                    encoding="utf-8")
    return path


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`devserver ARGS` in-process: (exit code, stdout, stderr)."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *mentions: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    for mention in mentions:
        assert mention in lines[0], (mention, lines[0])
    return lines[0]


def table(out: str) -> dict[tuple[str, str], tuple[int, int, str, str]]:
    """The summary table: (identifier, value) -> (runs, failed, rate, functions)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("IDENTIFIER"))
    rows = {}
    for line in lines[start + 1:]:
        match = re.match(r"^(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\S+%)\s+(.*)$", line)
        if not match:
            break
        ident, value, runs, failed, rate, functions = match.groups()
        rows[(ident, value)] = (int(runs), int(failed), rate, functions)
    return rows


def serve(spawn: Spawn, app_file: Path, tmp_path: Path, name: str, *extra: str) -> Devserver:
    child = spawn("--port", "0", "--db", str(tmp_path / f"{name}.sqlite3"), "--app",
                  str(app_file), "--no-reload", "--retry-interval", "0", *extra)
    child.wait_banner()
    return child


def figures(doc: dict[str, Any]) -> tuple[Any, ...]:
    """What a round trip must reproduce: the figures (not last_active) and the runs' shape."""
    stats = {k: v for k, v in doc["stats"].items() if k != "last_active"}
    runs = sorted((r["function_id"], r["status"], r["event_name"]) for r in doc["runs"])
    return stats, runs


# ---------------------------------------------------------------------------------------------
# replay --url


@pytest.mark.slow
def test_replay_url_sends_every_file_in_order_and_matches_in_process_figures(
    spawn: Spawn, app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    first = write_jsonl(tmp_path / "first.jsonl", [
        message(1, conversation_id="c1", user_id="u1"),
        message(2, conversation_id="c1", user_id="u1"),
        message(3, fail=True, conversation_id="c1", user_id="u1"),
    ])
    second = write_jsonl(tmp_path / "second.jsonl", [
        message(4, conversation_id="c2", user_id="u1"),
        {"name": "chat/unrelated", "sessions": {"conversation_id": "c3"}},
    ])
    child = serve(spawn, app_file, tmp_path, "url")

    code, out, err = run_main(capsys, "replay", str(first), str(second), "--url", child.url)

    assert code == 0, (out, err)
    assert f"sent 5 events from 2 files to {child.url} (env dev) in 1 request" in out, out
    expected = {("conversation_id", "c1"): (6, 1), ("conversation_id", "c2"): (2, 0),
                ("conversation_id", "c3"): (0, 0), ("user_id", "u1"): (8, 1)}
    over_http = {}
    for (ident, value), (runs, failed) in expected.items():
        doc = child.wait_session_settled(ident, value, runs=runs)
        assert doc["stats"]["failed_runs"] == failed, doc
        over_http[(ident, value)] = doc
    # In order: the runs of `answer` were created in the files' order.
    answers = [r for r in reversed(over_http[("user_id", "u1")]["runs"])
               if r["function_id"] == ANSWER]
    outputs = [child.get(f"/api/runs/{r['run_id']}")["events"][0]["data"]["n"]
               for r in answers]
    assert outputs == [1, 2, 3, 4]

    code, out, err = run_main(capsys, "replay", str(first), str(second), "--app", str(app_file))
    assert code == 1, (out, err)
    rows = table(out)
    assert set(rows) == set(expected)
    for key, (runs, failed, rate, functions) in rows.items():
        stats = over_http[key]["stats"]
        assert (runs, failed) == (stats["runs"], stats["failed_runs"]), key
        assert rate == report.format_percent(stats["failure_rate"])
        assert functions == (", ".join(stats["functions"]) or "-")
    assert child.stop() == 0


@pytest.mark.slow
def test_replay_url_env_header_and_wait_prints_the_summary(
    spawn: Spawn, app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    fixture = write_jsonl(tmp_path / "env.jsonl", [
        message(1, conversation_id="e1"), message(2, fail=True, conversation_id="e1")])
    child = serve(spawn, app_file, tmp_path, "env")

    code, out, err = run_main(capsys, "replay", str(fixture), "--url", f"{child.url}/",
                              "--env", "staging", "--wait")

    assert code == 1, (out, err)
    assert "(env staging)" in out
    assert table(out) == {("conversation_id", "e1"): (4, 1, "25%", f"{ANSWER}, {AUDIT}")}
    assert "1 failed run:" in out
    assert "NonRetriableError: cannot answer message 2" in out
    assert out.rstrip().endswith("result: FAILED")
    assert child.get("/api/sessions") == {"env": "dev", "identifiers": [], "next_cursor": None}
    staged = child.get("/api/sessions", env="staging")["identifiers"]
    assert [(i["identifier"], i["sessions"]) for i in staged] == [("conversation_id", 1)]
    assert child.stop() == 0


@pytest.mark.slow
def test_replay_url_accepts_a_full_event_api_url_and_shows_progress_for_long_files(
    spawn: Spawn, app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    events = [{"name": "bulk/event", "data": {"i": i}, "sessions": {"batch": f"b{i % 7}"}}
              for i in range(2500)]
    fixture = write_jsonl(tmp_path / "long.jsonl", events)
    child = serve(spawn, app_file, tmp_path, "long")

    code, out, err = run_main(capsys, "replay", str(fixture), "--url", f"{child.url}/e/my-key")

    assert code == 0, (out, err)
    assert "sent 2500 events from 1 file" in out, out
    assert "in 5 requests" in out, out
    progress = [line for line in err.splitlines() if line.startswith("devserver: sent ")]
    assert len(progress) == 5, err
    assert progress[-1].startswith("devserver: sent 2500/2500 events (100%"), progress
    (env,) = child.get("/api/environments")["environments"]
    assert env["events"] == 2500
    sessions = child.get("/api/sessions")["identifiers"]
    assert [(s["identifier"], s["sessions"]) for s in sessions] == [("batch", 7)]
    assert child.stop() == 0


@pytest.mark.slow
def test_a_bad_line_is_reported_with_file_and_line_and_nothing_is_sent(
    spawn: Spawn, app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [message(1, conversation_id="g")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(message(2, conversation_id="g")) + "\n\n"
                   + '{"name": "inngest/custom", "data": {}}\n')
    child = serve(spawn, app_file, tmp_path, "bad")

    code, out, err = run_main(capsys, "replay", str(good), str(bad), "--url", child.url)

    assert code == 2, (out, err)
    one_error_line(err, f"{bad}:3", "reserved")
    assert child.get("/api/sessions") == {"env": "dev", "identifiers": [], "next_cursor": None}
    assert child.get("/api/environments") == {"environments": [], "next_cursor": None}
    assert child.stop() == 0


BAD_LINES = {
    "not-json": ('{"name": "x", ', "not valid JSON"),
    "no-name": ('{"data": {}}', "name"),
    "ts-in-seconds": ('{"name": "x", "ts": 1741078800}', "seconds?"),
    "six-sessions": (json.dumps({"name": "x", "sessions": {f"k{i}": "v" for i in range(6)}}),
                     "at most 5"),
    "nan": ('{"name": "x", "data": {"v": NaN}}', "x.jsonl:2"),
    "array-on-a-line": ('[{"name": "x"}]', "x.jsonl:2"),
    "over-3-mib": (json.dumps({"name": "x", "data": {"blob": "y" * (3 * 1024 * 1024)}}),
                   "at most 3145728 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_lines_exit_2_before_any_run(
    case: str, app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    line, mention = BAD_LINES[case]
    fixture = tmp_path / "x.jsonl"
    fixture.write_text('{"name": "chat/message", "data": {"n": 1}}\n' + line + "\n")
    code, out, err = run_main(capsys, "replay", str(fixture), "--app", str(app_file))
    assert code == 2, (out, err)
    one_error_line(err, "x.jsonl:2", mention)
    assert out == ""


def test_json_files_hold_one_event_or_an_array(
    app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    single = tmp_path / "single.json"
    single.write_text(json.dumps(message(1, conversation_id="j")))
    array = tmp_path / "array.json"
    array.write_text(json.dumps([message(2, conversation_id="j"),
                                 {"name": "chat/message", "data": {"n": 3},
                                  "meta": {"sessions": {"conversation_id": "j"}}}], indent=2))
    assert len(replay.read_events(single)) == 1
    assert len(replay.read_events(array)) == 2

    code, out, err = run_main(capsys, "replay", str(single), str(array), "--app", str(app_file))

    assert code == 0, (out, err)
    assert "replayed 3 events from 2 files against 3 functions" in out
    assert table(out) == {("conversation_id", "j"): (6, 0, "0%", f"{ANSWER}, {AUDIT}")}

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([message(1), {"name": ""}]))
    code, out, err = run_main(capsys, "replay", str(broken), "--app", str(app_file))
    assert code == 2
    one_error_line(err, f"{broken}: event 1", "empty")


def test_replay_reads_json_lines_from_stdin(
    app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = "".join(json.dumps(message(n, conversation_id="in")) + "\n" for n in (1, 2))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data.encode())))
    code, out, err = run_main(capsys, "replay", "-", "--app", str(app_file))
    assert code == 0, (out, err)
    assert table(out)[("conversation_id", "in")][:2] == (4, 0)


def test_replay_usage_errors_exit_2_with_one_line(
    app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    fixture = write_jsonl(tmp_path / "f.jsonl", [message(1)])
    taken = tmp_path / "taken.sqlite3"
    taken.write_bytes(b"")
    cases = [
        (["replay", str(fixture)], "--url URL"),
        (["replay", str(fixture), "--url", "http://127.0.0.1:9", "--app", str(app_file)],
         "not both"),
        (["replay", str(fixture), "--url", "ftp://example.com"], "ftp://example.com"),
        (["replay", str(tmp_path / "missing.jsonl"), "--app", str(app_file)], "missing.jsonl"),
        (["replay", str(fixture), "--app", str(tmp_path / "nope.py")], "nope.py"),
        (["replay", str(fixture), "--app", str(app_file), "--db", str(taken)], "already exists"),
        (["replay", str(fixture), "--app", str(app_file), "--wait"], "--wait"),
        (["replay", str(fixture), "--url", "http://127.0.0.1:9", "--db", "x"], "--db"),
    ]
    for args, mention in cases:
        code, out, err = run_main(capsys, *args)
        assert code == 2, (args, out, err)
        one_error_line(err, mention)


@pytest.mark.slow
def test_replay_url_to_nothing_listening_or_the_wrong_path_exits_2(
    spawn: Spawn, app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    fixture = write_jsonl(tmp_path / "f.jsonl", [message(1, conversation_id="w")])
    child = serve(spawn, app_file, tmp_path, "wrong")
    code, out, err = run_main(capsys, "replay", str(fixture), "--url", f"{child.url}/api")
    assert code == 2, (out, err)
    one_error_line(err, "HTTP 404", "nothing was sent")
    port = child.url.rsplit(":", 1)[1]
    assert child.stop() == 0

    code, out, err = run_main(capsys, "replay", str(fixture), "--url", f"http://127.0.0.1:{port}")
    assert code == 2, (out, err)
    one_error_line(err, "cannot reach", port)


@pytest.mark.asyncio
async def test_a_refusal_after_accepted_batches_is_a_replay_error() -> None:
    """The first request is accepted, the second refused: `ReplayError` (exit 1), saying how
    many events got in. A stand-in server, since a real one accepts what `replay` validated."""
    seen: list[int] = []
    peers: set[Any] = set()

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(len(body))
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        if len(seen) > 1:
            return web.json_response({"ids": [], "status": 503, "error": "going away"},
                                     status=503)
        return web.json_response({"ids": [str(i) for i in range(len(body))], "status": 200})

    app = web.Application()
    app.router.add_post("/e/{key}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        events = [{"name": "x/y", "data": {"i": i}} for i in range(600)]
        with pytest.raises(replay.ReplayError, match=r"HTTP 503.*going away.*500 events"):
            await replay.send_to_server(events, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
    assert seen == [500, 100]
    assert len(peers) == 1  # one client, one kept-alive connection for every batch


# ---------------------------------------------------------------------------------------------
# replay --app


def test_replay_app_exit_codes_and_summary_table(
    app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    passing = write_jsonl(tmp_path / "pass.jsonl", [
        message(1, conversation_id="p1", user_id="u"), message(2, conversation_id="p2")])
    code, out, err = run_main(capsys, "replay", str(passing), "--app", str(app_file))
    assert code == 0, (out, err)
    assert table(out) == {
        ("conversation_id", "p1"): (2, 0, "0%", f"{ANSWER}, {AUDIT}"),
        ("conversation_id", "p2"): (2, 0, "0%", f"{ANSWER}, {AUDIT}"),
        ("user_id", "u"): (2, 0, "0%", f"{ANSWER}, {AUDIT}"),
    }
    assert out.rstrip().endswith("result: ok, no run failed")
    assert err == ""

    failing = write_jsonl(tmp_path / "fail.jsonl", [
        message(1, conversation_id="f1"), message(2, fail=True, conversation_id="f1"),
        message(3, fail=True, conversation_id="f1")])
    code, out, err = run_main(capsys, "replay", str(failing), "--app", str(app_file))
    assert code == 1, (out, err)
    assert table(out) == {("conversation_id", "f1"): (6, 2, "33.3%", f"{ANSWER}, {AUDIT}")}
    assert "2 failed runs:" in out
    assert out.count(f"  {ANSWER}  run ") == 2
    assert "NonRetriableError: cannot answer message 2" in out
    assert "NonRetriableError: cannot answer message 3" in out
    assert out.rstrip().endswith("result: FAILED")


def test_demo_app_replays_the_shipped_fixtures_in_ci_style(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Sleeps and retry backoff (Inngest's table: 15 s, 30 s...) pass on the virtual clock."""
    paths = [str(p) for p in demo.fixture_paths()]
    started = time.monotonic()
    code, out, err = run_main(capsys, "replay", *paths, "--app", "devserver.demo:app")
    elapsed = time.monotonic() - started
    assert code == 1, (out, err)
    rows = table(out)
    runs = {key: (r[0], r[1]) for key, r in rows.items()}
    assert runs == {
        ("conversation_id", "conv_1001"): (7, 0),
        ("conversation_id", "conv_1002"): (8, 1),
        ("conversation_id", "conv_1003"): (6, 0),
        ("conversation_id", "conv_1004"): (5, 0),
        ("user_id", "u_ana"): (13, 0),
        ("user_id", "u_ben"): (8, 1),
        ("user_id", "u_carmen"): (5, 0),
    }
    assert "support-bot-process-refund-failure" in rows[("conversation_id", "conv_1002")][3]
    assert "declined the refund of ORD-4711" in out
    moved = re.search(r"virtual time moved (?:(\d+)m )?([\d.]+)s", out)
    assert moved, out
    seconds = int(moved.group(1) or 0) * 60 + float(moved.group(2))
    assert seconds >= 45, out  # two retries' backoff (15 s, 30 s, plus jitter), virtually
    assert elapsed < 30, elapsed


def test_timing_original_keeps_the_gaps_on_the_virtual_clock(
    app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`confirm` waits 2 minutes for a `flow/confirm` received after its wait began. Sent at
    once, the confirmation comes before the wait; 90 s later it comes in time; 5 min later, too
    late. Minutes of virtual time, no wall-clock wait."""
    in_time = write_jsonl(tmp_path / "in_time.jsonl", [
        {"name": "flow/start", "ts": T0, "sessions": {"flow": "g"}},
        {"name": "flow/confirm", "ts": T0 + 90_000, "sessions": {"flow": "g"}},
    ])
    code, out, err = run_main(capsys, "replay", str(in_time), "--app", str(app_file))
    assert code == 1, (out, err)
    assert "no confirmation within 2 minutes" in out
    code, out, err = run_main(capsys, "replay", str(in_time), "--app", str(app_file),
                              "--timing", "original")
    assert code == 0, (out, err)

    late = write_jsonl(tmp_path / "late.jsonl", [
        {"name": "flow/start", "ts": T0, "sessions": {"flow": "f"}},
        {"name": "chat/unrelated", "ts": T0 + 60_000, "sessions": {"flow": "f"}},
        {"name": "flow/confirm", "ts": T0 + 5 * 60_000, "sessions": {"flow": "f"}},
    ])
    db = tmp_path / "late.sqlite3"
    started = time.monotonic()
    code, out, err = run_main(capsys, "replay", str(late), "--app", str(app_file),
                              "--timing", "original", "--db", str(db))
    assert time.monotonic() - started < 30
    assert code == 1, (out, err)
    assert "no confirmation within 2 minutes" in out
    assert "virtual time moved 5m 00s; timing original" in out

    async def received() -> list[tuple[str, int, int]]:
        store = Store(db)
        await store.open()
        try:
            events = await store.session_events("dev", "flow", "f")
            runs = await store.runs("dev")
        finally:
            await store.close()
        assert [(r.queued_at, r.ended_at) for r in runs] == [(T0, T0 + 120_000)]
        return [(ev.name, ev.ts, ev.received_at) for ev in events]

    # Each event arrived at its own ts on the virtual clock; the wait timed out in between.
    assert asyncio.run(received()) == [
        ("flow/start", T0, T0), ("chat/unrelated", T0 + 60_000, T0 + 60_000),
        ("flow/confirm", T0 + 300_000, T0 + 300_000)]


@pytest.mark.slow
def test_timing_original_over_http_waits_each_gap_capped(
    spawn: Spawn, app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    fixture = write_jsonl(tmp_path / "gaps.jsonl", [
        message(1, ts=T0, conversation_id="gap"),
        message(2, ts=T0 + 3_600_000, conversation_id="gap"),
        message(3, ts=T0 + 3_600_000, conversation_id="gap"),
        message(4, ts=T0 + 3_600_050, conversation_id="gap"),
    ])
    child = serve(spawn, app_file, tmp_path, "gaps")
    code, out, err = run_main(capsys, "replay", str(fixture), "--url", child.url, "--timing",
                              "original", "--max-gap", "0.1")
    assert code == 0, (out, err)
    assert "span 1h 00m; each gap is capped at 0.1s (--max-gap)" in err, err
    assert "in 3 requests" in out, out
    assert "1 gap capped at 0.1s" in out, out
    doc = child.wait_session_settled("conversation_id", "gap", runs=8)
    assert doc["stats"]["failed_runs"] == 0
    assert child.stop() == 0


def test_timed_groups_and_event_endpoint() -> None:
    events: list[dict[str, Any]] = [
        {"name": "a", "ts": 1000}, {"name": "b"}, {"name": "c", "ts": 1000},
        {"name": "d", "ts": 4000}, {"name": "e", "ts": 2000}, {"name": "f", "ts": 4500}]
    groups = replay.timed_groups(events, "original")
    assert [(gap, [e["name"] for e in group]) for gap, group in groups] == [
        (0, ["a", "b", "c"]), (3000, ["d", "e"]), (500, ["f"])]
    assert replay.timed_groups(events, "fast") == [(0, events)]
    assert replay.timed_groups([], "original") == []
    assert replay.event_endpoint("http://h:1") == ("http://h:1/e/replay", "http://h:1")
    assert replay.event_endpoint("http://h:1/x/") == ("http://h:1/x/e/replay", "http://h:1/x")
    assert replay.event_endpoint("https://h/e/k") == ("https://h/e/k", "https://h")
    with pytest.raises(devserver.errors.UserError):
        replay.event_endpoint("h:1")


def test_summary_lists_failing_sessions_first_when_truncated() -> None:
    rows = [report.SessionRow("s", f"v{i:02d}", 2, 1 if i in (3, 17) else 0, ["f"])
            for i in range(20)]
    text = report.format_table(rows, limit=5)
    shown = [line.split()[1] for line in text.splitlines()[1:6]]
    assert {"v03", "v17"} <= set(shown)
    assert shown == sorted(shown)
    assert "15 more sessions not shown (2 of 20 have failed runs" in text
    assert len(report.format_table(rows, limit=0).splitlines()) == 21
    odd = report.format_table([report.SessionRow("id", "line\nbreak" + "x" * 60, 0, 0)])
    assert "line\\nbreak" in odd
    assert "…" in odd
    assert len(odd.splitlines()) == 2
    # The RATE column is written the dashboard's way, tiny and near-1 rates included.
    rare = report.format_table([report.SessionRow("s", "rare", 2000, 1),
                                report.SessionRow("s", "most", 2000, 1999)])
    assert [line.split()[4] for line in rare.splitlines()[1:]] == [">99.9%", "<0.1%"]


# ---------------------------------------------------------------------------------------------
# export


ROUND_TRIP_EVENTS: list[dict[str, Any]] = [
    message(1, conversation_id="c1", user_id="u1"),
    message(2, conversation_id="c1", user_id="u1"),
    message(3, fail=True, conversation_id="c1", user_id="u1"),
    message(4, conversation_id="c2", user_id="u1"),
    {**message(5, conversation_id="c2"), "id": "dup-5"},
    {**message(5, conversation_id="c2"), "id": "dup-5"},  # a duplicate: stored, no runs
    {"name": "chat/message", "data": {"n": 6}, "ts": T0,
     "meta": {"sessions": {"ticket": "a=b&c d/é <script>"}}},
    {"name": "chat/other", "data": {}, "sessions": {"order_id": 42, "conversation_id": "c3"}},
]
ROUND_TRIP_SESSIONS = {
    ("conversation_id", "c1"): 6, ("conversation_id", "c2"): 4, ("conversation_id", "c3"): 0,
    ("user_id", "u1"): 8, ("ticket", "a=b&c d/é <script>"): 2, ("order_id", "42"): 0,
}


@pytest.mark.slow
def test_export_then_replay_into_an_empty_db_reproduces_each_session(
    spawn: Spawn, app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    source_db = tmp_path / "source.sqlite3"
    source = spawn("--port", "0", "--db", str(source_db), "--app", str(app_file),
                   "--no-reload", "--retry-interval", "0")
    source.wait_banner()
    source.send(*ROUND_TRIP_EVENTS)
    before = {key: source.wait_session_settled(*key, runs=runs)
              for key, runs in ROUND_TRIP_SESSIONS.items()}
    assert before[("conversation_id", "c1")]["stats"]["failed_runs"] == 1

    for index, ((ident, value), runs) in enumerate(ROUND_TRIP_SESSIONS.items()):
        exported = tmp_path / f"session{index}.jsonl"
        # Exported while the source server runs, straight from its database file.
        code, out, err = run_main(capsys, "export", "--session", f"{ident}={value}",
                                  "--db", str(source_db), "-o", str(exported))
        assert code == 0, err
        assert out == ""
        target = spawn("--port", "0", "--db", str(tmp_path / f"empty{index}.sqlite3"),
                       "--app", str(app_file), "--no-reload", "--retry-interval", "0")
        target.wait_banner()
        code, out, err = run_main(capsys, "replay", str(exported), "--url", target.url)
        assert code == 0, (out, err)
        after = target.wait_session_settled(ident, value, runs=runs)
        assert figures(after) == figures(before[(ident, value)]), (ident, value)
        assert target.stop() == 0
    assert source.stop() == 0


def test_export_keeps_only_events_users_sent(
    app_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "made.sqlite3"
    fixture = write_jsonl(tmp_path / "in.jsonl", ROUND_TRIP_EVENTS)
    code, out, err = run_main(capsys, "replay", str(fixture), "--app", str(app_file),
                              "--db", str(db))
    assert code == 1, (out, err)

    code, out, err = run_main(capsys, "export", "--session", "conversation_id=c1", "--db",
                              str(db))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(ev["name"], ev["data"]["n"]) for ev in lines] == [("chat/message", n)
                                                               for n in (1, 2, 3)]
    assert all(ev["sessions"] == {"conversation_id": "c1", "user_id": "u1"} for ev in lines)
    assert all(isinstance(ev["ts"], int) for ev in lines)
    # `answer` sent three `chat/answered` events and the failure emitted none that anything
    # wanted; the three sent ones carry the session but were produced by runs.
    assert "left out 3 events produced by runs" in err

    async def stored() -> list[StoredEvent]:
        store = Store(db)
        await store.open()
        try:
            return await store.session_events("dev", "conversation_id", "c1")
        finally:
            await store.close()

    events = asyncio.run(stored())
    assert sorted(ev.name for ev in events if ev.source is not None) == ["chat/answered"] * 3
    assert replay.export_events(events) == lines

    # The value is everything after the first `=`, verbatim.
    code, out, err = run_main(capsys, "export", "--session", "ticket=a=b&c d/é <script>",
                              "--db", str(db))
    assert code == 0, err
    (line,) = out.splitlines()
    assert json.loads(line)["sessions"] == {"ticket": "a=b&c d/é <script>"}
    assert "meta" not in json.loads(line)

    code, out, err = run_main(capsys, "export", "--session", "conversation_id=c2", "--db",
                              str(db))
    assert [json.loads(line).get("id") for line in out.splitlines()] == [None, "dup-5", "dup-5"]


def test_export_leaves_out_reserved_and_run_produced_events() -> None:
    def stored(name: str, source: str | None) -> StoredEvent:
        return StoredEvent("01", "dev", name, None, T0, T0, {"k": 1}, None, None, None,
                           {"s": "v"}, False, source)

    events = [stored("app/a", None), stored("app/b", "01RUN"), stored("app/c", "cron"),
              stored("inngest/function.failed", None), stored("Inngest/Thing", None)]
    assert replay.export_events(events) == [
        {"name": "app/a", "data": {"k": 1}, "ts": T0, "sessions": {"s": "v"}}]


@pytest.mark.parametrize(
    ("session", "db", "mentions"),
    [
        ("conversation_id=c1", "missing.sqlite3", ["no database at", "missing.sqlite3"]),
        ("conversation_id=nope", "made", ["no session conversation_id='nope'", "conversation_id"]),
        ("conversation_id=c1", ":memory:", [":memory:"]),
        ("conversation_id", "made", ["IDENTIFIER=VALUE"]),
        ("=c1", "made", ["IDENTIFIER=VALUE"]),
        ("conversation_id=", "made", ["IDENTIFIER=VALUE"]),
    ],
    ids=["missing-db", "unknown-session", "memory", "no-equals", "no-identifier", "no-value"],
)
def test_export_errors_exit_2_with_one_line(
    session: str, db: str, mentions: list[str], app_file: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if db == "made":
        db = str(tmp_path / "made.sqlite3")
        fixture = write_jsonl(tmp_path / "in.jsonl", [message(1, conversation_id="c1")])
        assert run_main(capsys, "replay", str(fixture), "--app", str(app_file), "--db", db)[0] == 0
    elif db != ":memory:":
        db = str(tmp_path / db)
    code, out, err = run_main(capsys, "export", "--session", session, "--db", db)
    assert code == 2, (out, err)
    one_error_line(err, *mentions)
    assert out == ""
    assert not (tmp_path / "missing.sqlite3").exists()


# ---------------------------------------------------------------------------------------------
# serve --replay and --demo


@pytest.mark.slow
def test_serve_replay_preloads_fixtures_before_the_banner(
    spawn: Spawn, app_file: Path, tmp_path: Path,
) -> None:
    first = write_jsonl(tmp_path / "one.jsonl", [message(1, conversation_id="pre")])
    second = tmp_path / "two.json"
    second.write_text(json.dumps([message(2, conversation_id="pre"),
                                  message(3, fail=True, conversation_id="pre")]))
    child = spawn("--port", "0", "--db", str(tmp_path / "pre.sqlite3"), "--app", str(app_file),
                  "--no-reload", "--retry-interval", "0", "--replay", str(first), "--replay",
                  str(second))
    banner = "\n".join(child.wait_banner())
    assert f"replayed    3 events from {first}, {second}" in banner, banner
    # Stored before the banner was printed: no waiting needed to see the session.
    listed = child.get("/api/sessions", identifier="conversation_id")["sessions"]
    assert [s["value"] for s in listed] == ["pre"]
    doc = child.wait_session_settled("conversation_id", "pre", runs=6)
    assert doc["stats"]["failed_runs"] == 1
    assert child.stop() == 0


@pytest.mark.slow
def test_serve_replay_with_a_bad_file_exits_2_before_serving(
    spawn: Spawn, app_file: Path, tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "ok"}\n{"name": 5}\n')
    child = spawn("--port", "0", "--db", str(tmp_path / "b.sqlite3"), "--replay", str(bad))
    try:
        code = child.proc.wait(timeout=ERROR_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("devserver --replay with a bad file did not exit")
    assert code == 2
    one_error_line(child.stderr(), f"{bad}:2")
    assert not any("dashboard" in line for line in child.stdout_lines)


def wait_for_failed_session(child: Devserver, timeout: float = RUN_TIMEOUT) -> list[Any]:
    """Poll the conversation list until a session shows a failed run."""
    last: list[Any] = []

    def failed() -> list[Any] | None:
        last[:] = child.get("/api/sessions", identifier="conversation_id")["sessions"]
        if any(s["failed_runs"] for s in last):
            return list(last)
        if child.proc.poll() is not None:
            pytest.fail(f"devserver exited with {child.proc.returncode}: {child.stderr()}")
        return None

    return list(eventually_sync(failed, lambda: f"a failed run in the demo: {last!r}", timeout))


@pytest.mark.slow
def test_demo_starts_with_a_populated_sessions_dashboard(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn("--demo", "--port", "0", "--retry-interval", "0")
    banner = "\n".join(child.wait_banner())
    assert "database    temporary, deleted on exit" in banner, banner
    assert "replayed    13 events from support_conversations.jsonl, support_followup.json" in banner
    for function_id in ("support-bot-triage", "support-bot-process-refund",
                        "support-bot-deliver-reply", "support-bot-collect-feedback"):
        assert function_id in banner

    sessions = wait_for_failed_session(child)
    assert sorted(s["value"] for s in sessions) == ["conv_1001", "conv_1002", "conv_1003",
                                                     "conv_1004"]
    (failing,) = [s for s in sessions if s["failed_runs"]]
    assert failing["value"] == "conv_1002"
    identifiers = {i["identifier"] for i in child.get("/api/sessions")["identifiers"]}
    assert identifiers == {"conversation_id", "user_id"}
    page = urllib_get(f"{child.url}/sessions?identifier=conversation_id")
    assert "conv_1002" in page
    assert child.stop(signal.SIGINT) == 0
    assert not (tmp_path / ".devserver").exists()


@pytest.mark.slow
def test_demo_with_db_keeps_its_data(spawn: Spawn, tmp_path: Path) -> None:
    db = tmp_path / "demo.sqlite3"
    child = spawn("--demo", "--port", "0", "--retry-interval", "0", "--db", str(db))
    banner = "\n".join(child.wait_banner())
    assert str(db.resolve()) in banner
    assert "temporary" not in banner
    wait_for_failed_session(child)
    assert child.stop() == 0
    assert db.is_file()


def test_fixtures_ship_with_the_package() -> None:
    paths = demo.fixture_paths()
    assert [p.name for p in paths] == list(demo.FIXTURES)
    events = replay.read_all(paths)
    conversations = {ev.get("sessions", ev.get("meta", {}).get("sessions"))["conversation_id"]
                     for ev in events}
    assert len(conversations) >= 3
    assert any(demo.DECLINED_ORDER in ev["data"].get("text", "") for ev in events)
    pyproject = (Path(devserver.__file__).parent.parent / "pyproject.toml").read_text()
    assert '"fixtures" = "devserver/fixtures"' in pyproject


def urllib_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())

