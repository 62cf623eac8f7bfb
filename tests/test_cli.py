"""The command line (SPEC 4), run for real: `python -m devserver ...` as a subprocess.

Every server is started on `--port 0`; the test reads the banner from the child's stdout to learn
the URL, then talks HTTP to it. Nothing waits on a fixed sleep: each wait is for a line on stdout,
an HTTP answer or the child's exit, with a timeout. Every child is killed in fixture teardown.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import devserver
from devserver.cli import main as cli

from .helpers import free_port
from .procs import (
    ERROR_PREFIX,
    ERROR_TIMEOUT,
    FINAL_STATUSES,
    Spawn,
    child_env,
)

APP_SOURCE = textwrap.dedent(
    """
    import devserver

    app = devserver.App("cli-app")


    @app.function(trigger="app/ping", retries=0)
    async def ping(ctx):
        return {"pong": ctx.event.data.get("n")}


    @app.function(trigger="app/fail", retries=1)
    async def fail(ctx):
        raise RuntimeError("this function always fails")
    """
)
OTHER_APP_SOURCE = textwrap.dedent(
    """

    other = devserver.App("other-app")


    @other.function(trigger="app/ping", retries=0)
    async def echo(ctx):
        return ctx.event.data
    """
)
APP_FUNCTIONS = ("cli-app-ping", "cli-app-fail")


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    """A file app with `cli-app-ping` (returns data) and `cli-app-fail` (always raises)."""
    path = tmp_path / "app.py"
    path.write_text(APP_SOURCE)
    return path


def run_cli(
    *args: str, cwd: Path, pythonpath: Path | None = None, timeout: float = ERROR_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run `python -m devserver ...` to completion (for commands that must exit by themselves)."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "devserver", *args],
            cwd=cwd,
            env=child_env(pythonpath),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`devserver {' '.join(args)}` did not exit within {timeout}s: {exc.stdout!r}")


def assert_user_error(stderr: str, *mentions: str) -> str:
    """Exactly one stderr line, `devserver: error: ...`, no traceback; returns the line."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {stderr!r}"
    (line,) = lines
    assert line.startswith(ERROR_PREFIX), line
    assert len(line) > len(ERROR_PREFIX) + 5, f"the error line says nothing: {line!r}"
    for mention in mentions:
        assert mention in line, f"{mention!r} not in {line!r}"
    return line


# ---------------------------------------------------------------------------------------------
# Serving


@pytest.mark.slow
def test_serve_banner_health_runs_and_sigterm(spawn: Spawn, app_file: Path, tmp_path: Path) -> None:
    db = tmp_path / "data" / "dev.sqlite3"
    child = spawn("--port", "0", "--db", str(db), "--app", str(app_file), "--no-reload",
                  "--retry-interval", "0")
    banner = "\n".join(child.wait_banner())

    assert re.search(r"dashboard\s+http://127\.0\.0\.1:\d+/sessions", banner), banner
    assert int(child.url.rsplit(":", 1)[1]) != 0
    assert str(db.resolve()) in banner, banner
    for function_id in APP_FUNCTIONS:
        assert function_id in banner, banner
    assert db.exists()

    assert child.request("GET", "/health") == (200, {"status": 200, "message": "OK"})

    (ping_id,) = child.send({"name": "app/ping", "data": {"n": 7},
                             "sessions": {"conversation_id": "conv_ok"}})
    doc = child.wait_session_settled("conversation_id", "conv_ok", runs=1)
    (run,) = doc["runs"]
    assert run["status"] == "Completed", doc
    assert run["function_id"] == "cli-app-ping"
    assert run["event_id"] == ping_id
    assert doc["stats"]["runs"] == 1
    assert doc["stats"]["failed_runs"] == 0
    assert doc["stats"]["functions"] == ["cli-app-ping"]
    detail = child.get(f"/api/runs/{run['run_id']}")
    assert detail["status"] == "Completed"
    assert detail["output"] == {"pong": 7}

    child.send({"name": "app/fail", "sessions": {"conversation_id": "conv_bad"}})
    doc = child.wait_session_settled("conversation_id", "conv_bad", runs=1)
    assert doc["runs"][0]["status"] == "Failed", doc
    assert doc["runs"][0]["function_id"] == "cli-app-fail"
    assert doc["stats"]["failed_runs"] == 1
    assert doc["stats"]["failure_rate"] == 1

    assert child.stop(signal.SIGTERM) == 0
    assert "Traceback" not in child.stderr(), child.stderr()


@pytest.mark.slow
def test_restart_on_same_db_keeps_events_runs_and_figures(
    spawn: Spawn, app_file: Path, tmp_path: Path
) -> None:
    db = tmp_path / "keep.sqlite3"
    args = ("--port", "0", "--db", str(db), "--app", str(app_file), "--no-reload",
            "--retry-interval", "0")
    first = spawn(*args)
    first.wait_banner()
    event_ids = first.send(
        {"name": "app/ping", "data": {"n": 1}, "sessions": {"conversation_id": "c1"}},
        {"name": "app/fail", "sessions": {"conversation_id": "c1", "user_id": "u1"}},
        {"name": "app/ping", "data": {"n": 2}, "sessions": {"conversation_id": "c2"}},
        {"name": "app/unrelated", "sessions": {"conversation_id": "c3"}},
    )
    settled = {
        ("conversation_id", "c1"): 2,
        ("conversation_id", "c2"): 1,
        ("conversation_id", "c3"): 0,
        ("user_id", "u1"): 1,
    }
    before = {key: first.wait_session_settled(*key, runs=n) for key, n in settled.items()}
    assert before[("conversation_id", "c1")]["stats"]["failed_runs"] == 1
    assert before[("conversation_id", "c1")]["stats"]["failure_rate"] == 0.5
    lists_before = {ident: first.get("/api/sessions", identifier=ident)
                    for ident in ("conversation_id", "user_id")}
    identifiers_before = first.get("/api/sessions")
    environments_before = first.get("/api/environments")
    run_ids = [run["run_id"] for doc in before.values() for run in doc["runs"]]
    runs_before = {run_id: first.get(f"/api/runs/{run_id}") for run_id in run_ids}
    events_before = {event_id: first.request("GET", f"/v1/events/{event_id}")
                     for event_id in event_ids}
    assert all(status == 200 for status, _ in events_before.values()), events_before
    assert all(doc["status"] in FINAL_STATUSES for doc in runs_before.values())
    assert first.stop(signal.SIGTERM) == 0

    second = spawn(*args)
    second.wait_banner()
    after = {key: second.get("/api/session", identifier=key[0], value=key[1]) for key in settled}
    assert after == before
    assert {ident: second.get("/api/sessions", identifier=ident)
            for ident in lists_before} == lists_before
    assert second.get("/api/sessions") == identifiers_before
    assert second.get("/api/environments") == environments_before
    assert {run_id: second.get(f"/api/runs/{run_id}") for run_id in run_ids} == runs_before
    assert {event_id: second.request("GET", f"/v1/events/{event_id}")
            for event_id in event_ids} == events_before
    assert second.stop(signal.SIGTERM) == 0


def module_app(folder: Path, name: str = "cli_mod_app") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(APP_SOURCE)
    return name


@pytest.mark.slow
def test_app_module_on_pythonpath(spawn: Spawn, tmp_path: Path) -> None:
    name = module_app(tmp_path / "lib")
    child = spawn("-p", "0", "--db", str(tmp_path / "m.sqlite3"), "--app", name, "--no-reload",
                  cwd=tmp_path, pythonpath=tmp_path / "lib")
    banner = "\n".join(child.wait_banner())
    for function_id in APP_FUNCTIONS:
        assert function_id in banner, banner
    child.send({"name": "app/ping", "data": {"n": 3}, "sessions": {"s": "mod"}})
    doc = child.wait_session_settled("s", "mod", runs=1)
    assert doc["runs"][0]["status"] == "Completed", doc
    assert child.stop() == 0


@pytest.mark.slow
def test_app_module_in_cwd_with_attr(spawn: Spawn, tmp_path: Path) -> None:
    project = tmp_path / "project"
    name = module_app(project, "cwd_app_mod")
    with (project / f"{name}.py").open("a") as source:
        source.write(OTHER_APP_SOURCE)
    child = spawn("--port", "0", "--db", str(tmp_path / "m.sqlite3"), "--app", f"{name}:app",
                  "--no-reload", cwd=project)
    banner = "\n".join(child.wait_banner())
    for function_id in APP_FUNCTIONS:
        assert function_id in banner, banner
    assert "other-app-echo" not in banner, banner
    functions = child.get("/api/functions")["functions"]
    assert sorted(fn["id"] for fn in functions) == sorted(APP_FUNCTIONS)
    assert child.stop() == 0


@pytest.mark.slow
def test_app_module_without_attr_loads_every_app(spawn: Spawn, tmp_path: Path) -> None:
    name = module_app(tmp_path / "lib", "two_apps_mod")
    with (tmp_path / "lib" / f"{name}.py").open("a") as source:
        source.write(OTHER_APP_SOURCE)
    child = spawn("--port", "0", "--db", str(tmp_path / "m.sqlite3"), "--app", name,
                  "--no-reload", pythonpath=tmp_path / "lib")
    banner = "\n".join(child.wait_banner())
    for function_id in (*APP_FUNCTIONS, "other-app-echo"):
        assert function_id in banner, banner
    assert child.stop() == 0


@pytest.mark.slow
def test_app_file_with_attr(spawn: Spawn, app_file: Path, tmp_path: Path) -> None:
    with app_file.open("a") as source:
        source.write(OTHER_APP_SOURCE)
    child = spawn("--port", "0", "--db", str(tmp_path / "f.sqlite3"), "--app",
                  f"{app_file}:other", "--no-reload", "--retry-interval", "0")
    banner = "\n".join(child.wait_banner())
    assert "other-app-echo" in banner, banner
    for function_id in APP_FUNCTIONS:
        assert function_id not in banner, banner
    child.send({"name": "app/ping", "data": {"x": "y"}, "sessions": {"s": "attr"}})
    doc = child.wait_session_settled("s", "attr", runs=1)
    assert [run["function_id"] for run in doc["runs"]] == ["other-app-echo"]
    assert doc["runs"][0]["status"] == "Completed"
    assert child.stop() == 0


@pytest.mark.slow
def test_relative_app_file_and_repeated_app(spawn: Spawn, app_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.py"
    other.write_text("import devserver\n" + OTHER_APP_SOURCE)
    child = spawn("--port", "0", "--db", "rel.sqlite3", "--app", "app.py", "--app",
                  "other.py:other", "--no-reload", cwd=tmp_path)
    banner = "\n".join(child.wait_banner())
    for function_id in (*APP_FUNCTIONS, "other-app-echo"):
        assert function_id in banner, banner
    assert str((tmp_path / "rel.sqlite3").resolve()) in banner, banner
    assert child.stop() == 0


@pytest.mark.slow
def test_memory_db_with_explicit_serve_and_sigint(
    spawn: Spawn, app_file: Path, tmp_path: Path
) -> None:
    child = spawn("serve", "--port", "0", "--db", ":memory:", "--app", str(app_file),
                  "--no-reload", "--retry-interval", "0")
    banner = "\n".join(child.wait_banner())
    assert re.search(r"database\s+:memory:", banner), banner
    assert child.request("GET", "/health") == (200, {"status": 200, "message": "OK"})
    child.send({"name": "app/ping", "data": {"n": 1}, "sessions": {"conversation_id": "mem"}})
    doc = child.wait_session_settled("conversation_id", "mem", runs=1)
    assert doc["runs"][0]["status"] == "Completed", doc
    assert child.stop(signal.SIGINT) == 0
    assert "Traceback" not in child.stderr(), child.stderr()
    assert not (tmp_path / ":memory:").exists()
    assert not (tmp_path / ".devserver").exists()


@pytest.mark.slow
def test_sdk_polling_is_tuned_or_turned_off(spawn: Spawn, tmp_path: Path) -> None:
    """`--poll-interval N` and `--no-poll` (as in Inngest's dev server), reported by `GET
    /dev` the way Inngest reports its start options."""
    default = spawn("--port", "0", "--db", ":memory:")
    default.wait_banner()
    opts = default.get("/dev")["startOpts"]
    assert (opts["poll"], opts["pollInterval"]) == (True, 5)
    assert default.stop() == 0

    tuned = spawn("--port", "0", "--db", ":memory:", "--poll-interval", "0.5")
    tuned.wait_banner()
    opts = tuned.get("/dev")["startOpts"]
    assert (opts["poll"], opts["pollInterval"]) == (True, 0.5)
    assert tuned.stop() == 0

    # As the Python SDK's own suite starts Inngest's dev server: `dev --no-discovery --no-poll`.
    off = spawn("dev", "--no-discovery", "--no-poll", "--port", "0", "--db", ":memory:", "-u",
                f"http://127.0.0.1:{free_port()}/api/inngest")
    banner = "\n".join(off.wait_banner())
    assert "--no-poll" in banner, banner  # the app's failed sync is not retried: it says so
    opts = off.get("/dev")["startOpts"]
    assert (opts["poll"], opts["pollInterval"], opts["autodiscover"]) == (False, 0, False)
    assert off.stop() == 0


# ---------------------------------------------------------------------------------------------
# User errors: exit code 2, one line, no traceback


def _write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


USER_ERRORS: dict[str, Callable[[Path], tuple[list[str], list[str]]]] = {
    # name -> (tmp_path -> (args, words the error line must mention))
    "missing-app-file": lambda p: (["--app", str(p / "nope.py")], ["nope.py"]),
    "missing-app-file-in-folder": lambda p: (["--app", str(p / "no" / "such")], ["such"]),
    "syntax-error": lambda p: (
        ["--app", str(_write(p, "broken.py", "import devserver\ndef oops(:\n    pass\n"))],
        ["broken.py", "SyntaxError"],
    ),
    "raises-at-import": lambda p: (
        ["--app", str(_write(p, "raising.py", "raise RuntimeError('no config for you')\n"))],
        ["raising.py", "no config for you"],
    ),
    "raises-multiline-message-at-import": lambda p: (
        ["--app", str(_write(p, "multi.py", "raise ValueError('first\\nsecond\\nthird')\n"))],
        ["multi.py", "ValueError"],
    ),
    "raises-system-exit-at-import": lambda p: (
        ["--app", str(_write(p, "exits.py", "import sys\nsys.exit(5)\n"))],
        ["exits.py"],
    ),
    "module-not-found": lambda p: (["--app", "no_such_devserver_module_xyz"],
                                   ["no_such_devserver_module_xyz"]),
    "module-raises-at-import": lambda p: (
        ["--app", _write(p, "raising_mod.py", "raise KeyError('k')\n").stem],
        ["raising_mod"],
    ),
    "module-imports-missing-dependency": lambda p: (
        ["--app", _write(p, "dep_mod.py", "import not_installed_dep_xyz\n").stem],
        ["dep_mod", "not_installed_dep_xyz"],
    ),
    "file-missing-attr": lambda p: (
        ["--app", f"{_write(p, 'app.py', APP_SOURCE)}:missing_attr"], ["missing_attr"]),
    "module-missing-attr": lambda p: (
        ["--app", f"{_write(p, 'attr_mod.py', APP_SOURCE).stem}:missing_attr"],
        ["missing_attr"],
    ),
    "attr-not-an-app": lambda p: (
        ["--app", f"{_write(p, 'app.py', APP_SOURCE)}:devserver"], ["devserver"]),
    "file-without-app": lambda p: (
        ["--app", str(_write(p, "empty_app.py", "import devserver\nX = 1\n"))], ["empty_app"]),
    "empty-app-spec": lambda p: (["--app", ""], []),
    "db-under-proc": lambda p: (["--db", "/proc/devserver/x.sqlite3"],
                                ["/proc/devserver/x.sqlite3"]),
    "db-under-regular-file": lambda p: (
        ["--db", str(_write(p, "plain.txt", "not a folder") / "x.sqlite3")], ["plain.txt"]),
    "bad-host": lambda p: (["--host", "no-such-host.invalid"], ["no-such-host.invalid"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_exits_2_with_one_line(case: str, tmp_path: Path) -> None:
    args, mentions = USER_ERRORS[case](tmp_path)
    if "--db" not in args:
        args += ["--db", str(tmp_path / "ok.sqlite3")]
    done = run_cli("--port", "0", "--no-reload", *args, cwd=tmp_path, pythonpath=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert_user_error(done.stderr, *mentions)
    assert "dashboard" not in done.stdout, done.stdout


@pytest.mark.slow
def test_unopenable_db_file_never_prints_a_traceback(tmp_path: Path) -> None:
    """A DB path SQLite can't open (a folder): clean exit 2 every time, not just most times.

    Several children at once, because a late error from the SQLite worker thread after the
    event loop closed would only show in some of them.
    """
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "devserver", "--port", "0", "--no-reload", "--db",
             str(tmp_path)],
            cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for _ in range(4)
    ]
    results = []
    try:
        for child in children:
            out, err = child.communicate(timeout=ERROR_TIMEOUT)
            results.append((child.returncode, out, err))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    for code, out, err in results:
        assert code == 2, (code, out, err)
        assert_user_error(err, str(tmp_path))
        assert "dashboard" not in out


@pytest.mark.slow
def test_busy_port_exits_2(tmp_path: Path, app_file: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_cli("--port", str(port), "--db", str(tmp_path / "b.sqlite3"), "--app",
                       str(app_file), "--no-reload", cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert_user_error(done.stderr, str(port))
    assert "dashboard" not in done.stdout, done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["--port", "abc"],
        ["--port", "70000"],
        ["--port", "-1"],
        ["--retry-interval", "soon"],
        ["--retry-interval", "-1"],
        ["--poll-interval", "0"],
        ["--poll-interval", "2", "--no-poll"],
        ["--discover", "--no-discovery"],
        ["--no-such-option"],
        ["no-such-command"],
    ],
    ids=lambda args: " ".join(args),
)
def test_bad_arguments_exit_2_without_traceback(args: list[str], tmp_path: Path) -> None:
    done = run_cli(*args, "--db", str(tmp_path / "a.sqlite3"), cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"^devserver( serve)?: error: ", last), done.stderr
    assert "dashboard" not in done.stdout


# ---------------------------------------------------------------------------------------------
# Help, version, console script, in-process main


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["-h"], ["serve", "--help"]], ids=" ".join)
def test_help_exits_0(args: list[str], tmp_path: Path) -> None:
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage: devserver" in done.stdout
    assert "Traceback" not in done.stderr
    if args[0] == "serve":
        for option in ("--port", "--host", "--db", "--app", "--retry-interval", "--no-reload"):
            assert option in done.stdout, option
    else:
        assert "serve" in done.stdout


@pytest.mark.slow
def test_version(tmp_path: Path) -> None:
    done = run_cli("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"devserver {devserver.__version__}"


@pytest.mark.slow
def test_console_script_behaves_like_python_m(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "devserver"
    assert script.is_file(), f"console script missing: {script}"
    assert os.access(script, os.X_OK)
    as_module = run_cli("--version", cwd=tmp_path)
    as_script = subprocess.run(
        [str(script), "--version"], cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=ERROR_TIMEOUT, check=False,
    )
    assert as_script.returncode == as_module.returncode == 0
    assert as_script.stdout == as_module.stdout
    assert as_script.stdout.strip() == f"devserver {devserver.__version__}"

    failed = subprocess.run(
        [str(script), "--port", "0", "--db", str(tmp_path / "s.sqlite3"), "--app",
         str(tmp_path / "missing.py"), "--no-reload"],
        cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=ERROR_TIMEOUT, check=False,
    )
    assert failed.returncode == 2, failed.stderr
    assert_user_error(failed.stderr, "missing.py")


@pytest.mark.parametrize("command", [[], ["serve"]], ids=["default", "serve"])
def test_main_in_process_returns_2_for_user_error(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing_app.py"
    code = cli.main([*command, "--port", "0", "--db", str(tmp_path / "p.sqlite3"), "--app",
                     str(missing), "--no-reload"])
    assert code == 2
    out, err = capsys.readouterr()
    assert_user_error(err, "missing_app.py")
    assert "dashboard" not in out
