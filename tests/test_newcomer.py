"""The newcomer's path (issue 19): help, busy port, types, replay --wait, and the small things a
first-time user trips over (a closed pipe, a bad fixture line, comments, the 404 page's JSON
link, a temporary database's messages, pytest failures without devserver's frames)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import venv
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import devserver
from devserver.cli import main as cli
from devserver.cli import replay
from devserver.errors import UserError
from devserver.model.events import validate_event

from .helpers import MakeServer, eventually, eventually_sync
from .procs import EXIT_TIMEOUT, Spawn, child_env

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(ev) + "\n" for ev in events), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Help and the busy port


def test_help_alone_shows_the_serve_options_and_the_other_commands(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in ("--port", "--host", "--db", "--app", "--demo", "--replay", "--log-level"):
        assert option in out, option
    for command in ("replay", "export"):
        assert re.search(rf"^\s+{command}\s+\S", out, flags=re.M), (command, out)
    assert "default command" in out


def test_a_busy_port_says_how_to_pick_another(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = run_main(capsys, "--port", str(port), "--db",
                                  str(tmp_path / "b.sqlite3"))
    assert code == 2, (out, err)
    (line,) = err.strip().splitlines()
    assert f"port {port} on 127.0.0.1 is already in use" in line, line
    assert f"--port {port + 1}" in line, line
    assert "--port 0" in line, line


def test_the_readmes_first_command_has_a_hint_for_a_busy_port() -> None:
    text = README.read_text()
    first_block_end = text.index("```", text.index("```sh") + 5)
    hint = text[first_block_end:text.index("```", first_block_end + 3)]
    assert "8288" in hint, hint
    assert "--port 0" in hint, hint
    assert "--help" in hint, hint


# ---------------------------------------------------------------------------------------------
# Types: py.typed ships, the README's examples type-check in a user's project


def readme_block(starting_with: str) -> str:
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(starting_with):
            return str(block)
    raise AssertionError(f"README has no python block starting with {starting_with!r}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_readme_examples_type_check_against_the_installed_package(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh virtualenv (the dependencies come from ours
    through a .pth line, so nothing is downloaded but the build backend), and run
    `mypy --strict` on the README's function and test file, as a user's project would."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=180)
    (wheel,) = wheels.glob("devserver-*.whl")
    target = tmp_path / "user-venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, timeout=120)
    site = next((target / "lib").glob("python3.*/site-packages"))
    assert (site / "devserver" / "py.typed").is_file(), "py.typed is not in the wheel"
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "dependencies.pth").write_text(ours + "\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "support_bot.py").write_text(readme_block("# support_bot.py"))
    (project / "test_support_bot.py").write_text(readme_block("# test_support_bot.py"))
    found = subprocess.run([str(python), "-c", "import devserver; print(devserver.__file__)"],
                           cwd=project, capture_output=True, text=True, check=True)
    assert found.stdout.startswith(str(site)), found.stdout  # the installed copy, not ours
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-executable",
         str(python), "support_bot.py", "test_support_bot.py"],
        cwd=project, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 2 source files" in done.stdout


# ---------------------------------------------------------------------------------------------
# replay --url --wait follows its own runs


def pending_app() -> devserver.App:
    app = devserver.App("nc")

    @app.function(trigger="nap/start", retries=0)
    async def nap(ctx: devserver.Context) -> None:
        await ctx.step.sleep("day", "1d")

    @app.function(trigger="chain/next", retries=0)
    async def follow_up(ctx: devserver.Context) -> str:
        await ctx.step.sleep("short", "300ms")
        return "followed"

    @app.function(trigger="chain/child", retries=0)
    async def child(ctx: devserver.Context) -> str:
        await ctx.step.sleep("short", "200ms")
        return "child"

    @app.function(trigger="chain/start", retries=0)
    async def chain(ctx: devserver.Context) -> Any:
        await ctx.step.send_event("next", {"name": "chain/next", "data": {}})
        return await ctx.step.invoke("call", function=child, data={})

    @app.function(trigger="pend/sleep", retries=0)
    async def sleeper(ctx: devserver.Context) -> None:
        await ctx.step.sleep("hour", "1h")

    @app.function(trigger="pend/wait", retries=0)
    async def waiter(ctx: devserver.Context) -> Any:
        return await ctx.step.wait_for_event("paid", event="pend/never", timeout="1h")

    @app.function(trigger="pend/invoke", retries=0)
    async def invoker(ctx: devserver.Context) -> Any:
        return await ctx.step.invoke("call", function=nap, data={})

    @app.function(trigger="pend/retry", retries=3)
    async def flaky(ctx: devserver.Context) -> None:
        raise devserver.RetryAfterError("provider busy", 3600)

    return app


async def statuses(server: Any) -> dict[str, str]:
    return {run.function_id: run.status for run in await server.store.runs("dev", limit=100)}


@pytest.mark.slow
@pytest.mark.asyncio
async def test_replay_wait_waits_for_its_own_runs_and_what_they_led_to(
        make_server: MakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = await make_server(pending_app())
    await server.runner.ingest("dev", [validate_event({"name": "nap/start"}, 0)])
    await eventually(lambda: _waiting(server, "nc-nap"), "the earlier nap to sleep")
    fixture = write_jsonl(tmp_path / "chain.jsonl", [
        {"name": "chain/start", "data": {}, "sessions": {"conversation_id": "c1"}}])
    started = time.monotonic()
    code = await asyncio.to_thread(cli.main, ["replay", str(fixture), "--url", server.url,
                                              "--wait", "--timeout", "30"])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    assert time.monotonic() - started < 20, "it waited for the day-long nap"
    # Done when it returned: the event's run, the run of the event it sent, the invoked run.
    assert await statuses(server) == {
        "nc-chain": "Completed", "nc-follow-up": "Completed", "nc-child": "Completed",
        "nc-nap": "Running"}, out
    assert "result: ok" in out, out


async def _waiting(server: Any, function_id: str) -> bool:
    for run in await server.store.runs("dev", function_id=function_id, limit=5):
        detail = await server.store.run_detail(run.run_id)
        if detail and any(step.status == "Waiting" for step in detail.steps):
            return True
    return False


@pytest.mark.slow
@pytest.mark.asyncio
async def test_replay_wait_timeout_says_precisely_what_is_pending(
        make_server: MakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = await make_server(pending_app())
    await server.runner.ingest("dev", [validate_event({"name": "nap/start"}, 0)])
    await eventually(lambda: _waiting(server, "nc-nap"), "the earlier nap to sleep")
    fixture = write_jsonl(tmp_path / "pending.jsonl", [
        {"name": name, "data": {}} for name in
        ("pend/sleep", "pend/wait", "pend/invoke", "pend/retry")])
    code = await asyncio.to_thread(cli.main, ["replay", str(fixture), "--url", server.url,
                                              "--wait", "--timeout", "2"])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    lines = {fn: line for line in out.splitlines()
             for fn in ("nc-sleeper", "nc-waiter", "nc-invoker", "nc-flaky", "nc-nap")
             if line.strip().startswith(fn + "  run ")}
    assert re.search(r"sleeping until \d{4}-\d\d-\d\dT[\d:.]+Z \(step 'hour'\)",
                     lines["nc-sleeper"]), out
    assert "waiting for event 'pend/never' until 20" in lines["nc-waiter"], out
    assert re.search(r"waiting for invoked run \w{26} of nc-nap", lines["nc-invoker"]), out
    assert re.search(r"retrying the function at 20\S+ \(attempt 1 failed: "
                     r"RetryAfterError: provider busy\)", lines["nc-flaky"]), out
    # The invoked nap is one of ours, listed as sleeping; the earlier nap is not listed.
    assert "sleeping until" in lines["nc-nap"], out
    assert out.count("nc-nap  run ") == 1, out
    assert "5 of the 5 runs these events led to were unfinished after 2s" in out, out
    assert "never came" not in out


# ---------------------------------------------------------------------------------------------
# The smaller points


def test_a_bad_fixture_line_names_the_file_and_line_not_a_request_body() -> None:
    text = b'{"name": "a"}\n{"name": "b"}\n{"name": "c",}\n'
    with pytest.raises(UserError) as raised:
        replay.parse_events(text, "orders.jsonl", array=False)
    message = raised.value.message
    assert message.startswith("orders.jsonl:3: not valid JSON: "), message
    assert "request body" not in message, message
    assert "line 1" not in message, message
    with pytest.raises(UserError) as raised:
        replay.parse_events(b'[{"name": "a"},\n{"name": }]', "orders.json", array=True)
    assert raised.value.message.startswith("orders.json: not valid JSON: "), raised.value
    assert "line 2" in raised.value.message


def test_comment_and_blank_lines_in_a_jsonl_fixture_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "orders.jsonl"
    path.write_text('# orders placed on Monday\n\n{"name": "a"}\n   # indented note\n'
                    '{"name": "b", "data": {"note": "# not a comment"}}\n')
    events = replay.read_events(path)
    assert [ev["name"] for ev in events] == ["a", "b"]
    assert events[1]["data"] == {"note": "# not a comment"}


@pytest.mark.slow
def test_replay_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    app = tmp_path / "chat.py"
    app.write_text(textwrap.dedent("""
        import devserver

        app = devserver.App("chat")


        @app.function(trigger="chat/message")
        async def answer(ctx):
            return "ok"
        """))
    # Well over a pipe's buffer of output, so writes after `head` exits must fail.
    fixture = write_jsonl(tmp_path / "many.jsonl", [
        {"name": "chat/message", "sessions": {"conversation_id": f"c-{i:06d}-" + "x" * 30}}
        for i in range(1500)])
    err = tmp_path / "err.txt"
    done = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m devserver replay - --app {app} --limit 0 "
                       f"< {fixture} 2> {err} | head -2; echo ${{PIPESTATUS[0]}}"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("replayed 1500 events"), done.stdout
    assert lines[1].startswith("IDENTIFIER"), done.stdout
    assert lines[2] == str(128 + signal.SIGPIPE), done.stdout
    problems = err.read_text()
    assert "Traceback" not in problems, problems
    assert "BrokenPipe" not in problems, problems
    assert "Exception ignored" not in problems, problems


@pytest.mark.asyncio
async def test_the_404_page_has_no_json_link_that_is_itself_a_404(
        make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await make_server()
    async with http.get(f"{server.url}/no/such/page", headers={"Accept": "text/html"}) as resp:
        assert resp.status == 404
        html = await resp.text()
        assert "Link" not in resp.headers
    assert "This page as JSON" not in html
    links = re.findall(r'href="([^"]+)" type="application/json"', html)
    assert links, html
    for link in links:
        async with http.get(server.url + link.replace("&amp;", "&")) as resp:
            assert resp.status == 200, link
    # A page that has a twin keeps its link, and the twin answers.
    async with http.get(f"{server.url}/sessions", headers={"Accept": "text/html"}) as resp:
        html = await resp.text()
    (twin,) = re.findall(r'href="([^"]+)" type="application/json">This page as JSON', html)
    async with http.get(server.url + twin.replace("&amp;", "&")) as resp:
        assert resp.status == 200


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--demo"], ["--db", ":memory:"]], ids=" ".join)
def test_a_temporary_database_does_not_promise_to_resume(spawn: Spawn, args: list[str]) -> None:
    child = spawn("--port", "0", "--log-level", "info", *args)
    child.wait_banner()
    assert child.stop() == 0
    err = child.stderr()
    assert "deleted on exit" in err, err
    assert "resume on the next start" not in err, err


@pytest.mark.slow
def test_a_database_file_still_says_runs_resume(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn("--port", "0", "--log-level", "info", "--db", str(tmp_path / "k.sqlite3"))
    child.wait_banner()
    assert child.stop(timeout=EXIT_TIMEOUT) == 0
    assert "unfinished runs resume on the next start" in child.stderr()


FAILING_PROJECT = """
import devserver
import pytest

app = devserver.App("shop")


@app.function(trigger="shop/order", retries=0)
async def charge(ctx):
    await ctx.step.run("charge-card", lambda: 1 / 0)


@pytest.mark.devserver(apps=[app])
def test_order(devserver):
    devserver.send({"name": "shop/order", "sessions": {"order_id": "o-1"}})
    devserver.wait_idle()
"""


@pytest.mark.slow
def test_a_pytest_failure_shows_the_test_line_then_the_timeline(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_shop=FAILING_PROJECT)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "ZeroDivisionError" in text, text  # the timeline
    assert "order_id" in text, text
    assert "devserver.wait_idle()" in text, text  # the test's own line
    assert "devserver/testing.py" not in text, text
    assert "concurrent/futures" not in text, text
    assert "During handling of the above exception" not in text, text


def test_replay_app_hints_to_keep_the_temporary_database(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fixture = write_jsonl(tmp_path / "refunds.jsonl", [
        {"name": "support/refund.requested", "data": {"order_id": "ORD-4711"},
         "sessions": {"conversation_id": "c1"}}])
    code, out, _ = run_main(capsys, "replay", str(fixture), "--app", "devserver.demo:app")
    assert code == 1, out
    assert "temporary database, deleted on exit" in out, out
    assert "--db PATH" in out, out
    kept = tmp_path / "kept.sqlite3"
    code, out, _ = run_main(capsys, "replay", str(fixture), "--app", "devserver.demo:app",
                            "--db", str(kept))
    assert code == 1
    assert "deleted on exit" not in out, out
    assert f"--db {kept}" in out, out


# ---------------------------------------------------------------------------------------------
# The terminal: a line for every run that fails for good, retries at debug, run ids on logs


def failing_app() -> devserver.App:
    app = devserver.App("term")
    tries: list[int] = []

    @app.function(trigger="term/go", retries=1)
    async def breaks(ctx: devserver.Context) -> None:
        ctx.logger.info("working on %s", ctx.event.data["n"])

        def flaky() -> int:
            tries.append(1)
            if len(tries) == 1:
                raise ConnectionError("upstream hiccup")
            return 1

        await ctx.step.run("fetch", flaky)
        raise ValueError("cannot finish\nsecond line of the message")

    return app


@pytest.mark.asyncio
async def test_a_run_that_fails_for_good_says_so_in_one_line_and_retries_at_debug(
    make_server: MakeServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await make_server(failing_app())
    async with http.post(f"{server.url}/e/k", json={
            "name": "term/go", "data": {"n": 7},
            "sessions": {"conversation_id": "c1", "user_id": "u9"}}) as resp:
        (event_id,) = (await resp.json())["ids"]
    await asyncio.wait_for(server.runner.wait_idle(), 20)
    async with http.get(f"{server.url}/v1/events/{event_id}/runs") as resp:
        (run,) = (await resp.json())["data"]
    run_id = run["run_id"]
    lines = [r for r in caplog.records if r.name == "devserver.runs"]
    failed = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert failed == [
        f"run {run_id} of term-breaks failed (conversation_id=c1, user_id=u9): ValueError: "
        f"cannot finish — {server.url}/runs/{run_id}"], failed
    retries = [r.getMessage() for r in lines if r.levelno == logging.DEBUG]
    assert len(retries) == 2, retries  # the step's retry, then the function's
    assert "attempt 1 of step 'fetch' failed (ConnectionError: upstream hiccup)" in retries[0]
    assert "attempt 1 of the function failed (ValueError: cannot finish)" in retries[1]
    assert all(f"run {run_id} of term-breaks" in line for line in retries)
    logged = [r for r in caplog.records if r.name == "devserver.functions.term-breaks"]
    assert logged
    assert all(r.getMessage() == f"run {run_id}: working on 7" for r in logged)
    assert all(getattr(r, "run_id", None) == run_id for r in logged)


@pytest.mark.slow
def test_the_terminal_shows_a_failed_run_at_the_default_level(
    spawn: Spawn, tmp_path: Path,
) -> None:
    app = tmp_path / "term_app.py"
    app.write_text(textwrap.dedent("""
        import devserver
        app = devserver.App("term")

        @app.function(trigger="term/go", retries=0)
        async def breaks(ctx):
            raise RuntimeError("it broke")
    """))
    child = spawn("--port", "0", "--db", str(tmp_path / "t.sqlite3"), "--app", str(app),
                  "--no-reload")
    child.wait_banner()
    (event_id,) = child.send({"name": "term/go", "sessions": {"conversation_id": "c2"}})

    def failed() -> Any:
        runs = child.get(f"/v1/events/{event_id}/runs")["data"]
        return runs if runs and runs[0]["status"] == "Failed" else None

    (run,) = eventually_sync(failed, "the run to fail")
    assert child.stop() == 0
    lines = [line for line in child.stderr().splitlines() if "devserver.runs" in line]
    assert len(lines) == 1, child.stderr()
    assert lines[0].endswith(
        f"run {run['run_id']} of term-breaks failed (conversation_id=c2): RuntimeError: it "
        f"broke — {child.url}/runs/{run['run_id']}")
    assert " WARNING " in lines[0]


@pytest.mark.asyncio
async def test_replay_wait_follows_the_runs_a_runs_end_starts(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    """`--wait` follows what a run led to through its `emitted_events` too: the runs its end's
    lifecycle events start (an `on_failure` handler here), not only send_event and invoke."""
    app = devserver.App("chain")

    async def report(ctx: devserver.Context) -> str:
        return "reported"

    @app.function(trigger="chain/go", retries=0, on_failure=report)
    async def go(ctx: devserver.Context) -> None:
        await ctx.step.send_event("tell", {"name": "chain/told"})
        raise devserver.NonRetriableError("broke")

    @app.function(trigger="chain/told")
    async def told(ctx: devserver.Context) -> str:
        return "heard"

    server = await make_server(app)
    async with http.post(f"{server.url}/e/k", json={"name": "chain/go"}) as resp:
        (event_id,) = (await resp.json())["ids"]
    followed = await replay.follow_runs(server.url, http, [event_id], timeout=20)
    assert followed.finished
    by_function = {doc["function_id"]: doc for doc in followed.runs.values()}
    assert set(by_function) == {"chain-go", "chain-told", "chain-go-failure"}, by_function
    assert by_function["chain-go-failure"]["status"] == "Completed"
    go_doc = by_function["chain-go"]
    # chain/told and inngest/function.failed (function.finished is stored only when used)
    assert len(go_doc["emitted_events"]) == 2
