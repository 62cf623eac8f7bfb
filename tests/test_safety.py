"""Safe by default: loopback unless told otherwise (and a warning when told), SQL built from
parameters only, no request-driven file access, and an older database upgraded on start.
(Escaping and the Content-Security-Policy: tests/test_dashboard.py; static-path traversal:
tests/test_hostile.py.)"""

from __future__ import annotations

import ast
import sqlite3
import time
from pathlib import Path

import pytest

import devserver
from devserver.cli.main import exposure_warning
from devserver.store.schema import SCHEMA_VERSION
from devserver.web.server import Config, Server

from .procs import START_TIMEOUT, Spawn
from .test_store import make_v1_database

PACKAGE = Path(devserver.__file__).parent


@pytest.mark.asyncio
@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("localhost", False),
                                              ("0.0.0.0", True)])
async def test_only_a_non_loopback_address_gets_the_warning(host: str, warned: bool) -> None:
    server = Server(Config(db=":memory:"), host=host, port=0)
    await server.start()
    try:
        warning = exposure_warning(server)
    finally:
        await server.stop()
    assert (warning is not None) == warned
    if warning is not None:
        assert "\n" not in warning
        assert warning.startswith(f"devserver: warning: listening on {host}, so other machines")
        assert "--host 127.0.0.1" in warning


@pytest.mark.slow
def test_serve_on_0_0_0_0_prints_one_warning_line_and_the_default_prints_none(
    spawn: Spawn, tmp_path: Path
) -> None:
    exposed = spawn("--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "a.sqlite3"))
    deadline = time.monotonic() + START_TIMEOUT
    while not any(line.strip().startswith("functions") for line in exposed.stdout_lines):
        assert exposed.next_line(deadline) is not None, exposed.stderr()
    while "warning" not in exposed.stderr():
        assert time.monotonic() < deadline, exposed.stderr()
        time.sleep(0.01)  # poll interval: stderr is read by a thread
    assert exposed.stop() == 0
    warnings = [line for line in exposed.stderr().splitlines() if "warning" in line]
    assert len(warnings) == 1, exposed.stderr()
    assert warnings[0].startswith("devserver: warning: listening on 0.0.0.0")

    local = spawn("--port", "0", "--db", str(tmp_path / "b.sqlite3"))
    local.wait_banner()
    assert local.url.startswith("http://127.0.0.1:")
    assert local.stop() == 0
    assert "warning" not in local.stderr()


@pytest.mark.slow
def test_an_older_database_is_upgraded_when_the_server_starts(
    spawn: Spawn, tmp_path: Path
) -> None:
    db = tmp_path / "old.sqlite3"
    make_v1_database(db)
    child = spawn("--port", "0", "--db", str(db))
    child.wait_banner()
    assert child.get("/v1/events/01J00000000000000000000000")["data"]["name"] == "app/old"
    assert child.stop() == 0
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Source checks: properties of the code that no request can show


SQL_CALLS = {"execute", "executemany", "executescript"}
ALLOWED_INTERPOLATIONS = {
    "sort",  # checked against SESSION_SORTS first
    "order",  # built from `sort`
    "' AND '.join(where)",  # fixed fragments with ? placeholders
    "after",  # a fixed fragment with a ? placeholder
    "marks", "run_marks",  # "?, ?, ..."
    "members",  # session_index.INDEXED_RUNS or .LISTED_RUNS, fixed subqueries
    "SCHEMA_VERSION",  # a constant (PRAGMA takes no parameters)
}


def _sql_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS]


STORE_MODULES = tuple(sorted(p.relative_to(PACKAGE).as_posix()
                             for p in (PACKAGE / "store").glob("*.py")))
"""The store's modules: the only ones with SQL (every one of them, as the store is split)."""


def test_sql_interpolates_only_whitelisted_names() -> None:
    """Every SQL string is a constant or an f-string whose holes are whitelisted names; values
    always travel as `?` parameters. (`%` or `.format` or `+` on SQL would show up here too.)"""
    calls = [(name, call) for name in STORE_MODULES
             for call in _sql_calls(ast.parse((PACKAGE / name).read_text()))]
    assert len(calls) > 50
    for name, call in calls:
        sql = call.args[0]
        where = f"{name} line {call.lineno}"
        if isinstance(sql, ast.Constant):
            assert isinstance(sql.value, str), where
        elif isinstance(sql, ast.JoinedStr):
            holes = {ast.unparse(part.value) for part in sql.values
                     if isinstance(part, ast.FormattedValue)}
            assert holes <= ALLOWED_INTERPOLATIONS, (where, holes - ALLOWED_INTERPOLATIONS)
        elif isinstance(sql, ast.Attribute) and ast.unparse(sql.value) == "kind":
            # The session index's statements: fields of its kinds, every one a literal.
            assert name == "store/session_index.py", where
            assert sql.attr in KIND_LITERALS, (where, sql.attr)
        else:
            # A statement built elsewhere: must be one of the schema's own statements.
            assert ast.unparse(sql) == "statement", (where, ast.unparse(sql))


def _kind_literals() -> set[str]:
    """The fields every `_Kind(...)` of store/session_index.py gives as a string literal."""
    tree = ast.parse((PACKAGE / "store" / "session_index.py").read_text())
    kinds = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == "_Kind"]
    assert len(kinds) == 2
    fields = [{k.arg for k in call.keywords if isinstance(k.value, ast.Constant)
               and isinstance(k.value.value, str)} for call in kinds]
    return set.intersection(*fields)


KIND_LITERALS = _kind_literals()


def test_only_the_store_talks_to_sqlite() -> None:
    for module in sorted(PACKAGE.rglob("*.py")):
        name = module.relative_to(PACKAGE).as_posix()
        tree = ast.parse(module.read_text())
        imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        imports |= {node.module or "" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        # The benchmark prints SQLite's version, counts runs beside a server and serves the
        # minimal-schema reference (bench/minimal.py): none of it is devserver's store.
        if name.startswith(("store/", "bench/")):
            continue
        assert not imports & {"sqlite3", "aiosqlite"}, name


FILE_CALLS = {"open", "read_bytes", "read_text", "write_bytes", "write_text", "unlink",
              "rmtree", "mkdir", "FileResponse", "add_static", "iterdir", "glob"}
REQUEST_MODULES = ("web/api.py", "web/inngest_api.py", "web/responses.py", "web/params.py",
                   "web/documents.py", "web/dashboard.py", "web/templating.py",
                   "web/sdk_routes.py", "sdk/apps.py", "sdk/protocol.py", "sdk/registration.py",
                   "sdk/executor.py", "model/fixtures.py", "model/events.py")
STARTUP_ONLY = {("web/dashboard.py", "load_assets")}
"""Functions allowed to touch files: they run once at start, on the package's own folder."""


def test_request_handling_code_touches_no_files() -> None:
    """No code that serves requests opens, writes, lists or deletes files (so no request input
    can steer it), except the dashboard reading its own static folder once at start."""
    for name in REQUEST_MODULES:
        tree = ast.parse((PACKAGE / name).read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if not isinstance(node, ast.Call):
                    continue
                called = (node.func.attr if isinstance(node.func, ast.Attribute)
                          else node.func.id if isinstance(node.func, ast.Name) else "")
                # `self.executor.open()` opens an HTTP client session, not a file.
                if ast.unparse(node.func) == "self.executor.open":
                    continue
                if called in FILE_CALLS:
                    assert (name, func.name) in STARTUP_ONLY, (name, func.name, node.lineno)
