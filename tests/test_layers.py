"""The package's layers (README "How it works"): imports flow one way, with no cycles, and what a
user's app module imports (`import devserver`) stays light.

The import graph is read from the code itself (every module-level import, `TYPE_CHECKING`
blocks and imports inside functions excluded, as they don't run at import time), and what
`import devserver` loads is measured in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import devserver

PACKAGE = Path(devserver.__file__).parent

LAYERS = ("model", "store", "runtime", "sdk", "web", "cli")
"""From the bottom up. A module may import its own layer and the ones below it, and the small
shared modules at the top of the package (`errors`, `clock`, `ids`, `jsontext`, and what user
code touches: `app`, `context`)."""

MAY_IMPORT: dict[str, set[str]] = {
    "model": {"model"},
    "store": {"model", "store"},
    "runtime": {"model", "store", "runtime"},
    "sdk": {"model", "store", "runtime", "sdk"},
    "web": {"model", "store", "runtime", "sdk", "web"},
    "cli": {"model", "store", "runtime", "sdk", "web", "cli"},
}
SHARED = {"errors", "clock", "ids", "jsontext", "app", "context"}
"""The top-level modules every layer may use. They import only `model` and each other."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """The devserver modules a module imports when it is imported."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("devserver"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                if base.startswith("devserver"):
                    # `from devserver.web import api` imports the module devserver.web.api
                    for alias in node.names:
                        candidate = f"{base}.{alias.name}"
                        found.add(candidate if candidate in MODULES else base)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(tree.body)
    found.discard(name)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: _runtime_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
         for name, path in MODULES.items()}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_graph_is_read_from_the_code() -> None:
    assert "devserver.store.facade" in GRAPH["devserver.runtime.runner"]
    assert "devserver.web.api" in GRAPH["devserver.web.server"]
    assert "devserver.app" in GRAPH["devserver"]
    # context needs the invocation only for its type hints: not an import at run time
    assert "devserver.runtime.invocation" not in GRAPH["devserver.context"]


def test_there_are_no_import_cycles() -> None:
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for target in sorted(GRAPH.get(module, ())):
            walk(target, [*path, module])
        done.add(module)

    for module in GRAPH:
        walk(module, [])


def test_imports_flow_downward_between_layers() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        layer = layer_of(module)
        short = module.removeprefix("devserver.")
        for target in targets:
            target_layer = layer_of(target)
            if short in SHARED:
                ok = target_layer in (None, "model") and not target.startswith(
                    ("devserver.testing", "devserver.pytest_plugin", "devserver.demo",
                     "devserver.bench"))
            elif layer is None:
                ok = True  # the package itself, testing, pytest_plugin, demo, bench: on top
            elif target_layer is None:
                # the package itself (for __version__) and the shared modules
                ok = target == "devserver" or target.removeprefix("devserver.") in SHARED
            else:
                ok = target_layer in MAY_IMPORT[layer]
            if not ok:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_pure_layer_imports_no_io_libraries() -> None:
    for name, path in MODULES.items():
        if layer_of(name) != "model":
            continue
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
        names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and not node.level}
        assert not names & {"aiohttp", "sqlite3", "aiosqlite"}, (name, names)


def _loaded_by(statement: str) -> list[str]:
    code = (f"import sys, json\n{statement}\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    return list(json.loads(out.stdout))


def test_import_devserver_loads_neither_the_store_nor_aiosqlite_nor_aiohttp() -> None:
    loaded = _loaded_by("import devserver")
    ours = [m for m in loaded if m.startswith("devserver")]
    assert "devserver.app" in ours  # the measurement sees our modules
    heavy = [m for m in loaded if m.split(".")[0] in ("aiosqlite", "sqlite3", "aiohttp")]
    assert not heavy, heavy
    assert not [m for m in ours if layer_of(m) not in (None, "model")], ours


PURE_SDK_MODULES = ("devserver.sdk.protocol", "devserver.sdk.registration")
"""The SDK's wire format and registration reading: plain data, like the model."""


@pytest.mark.parametrize("names", [
    [n for n in MODULES if layer_of(n) == "model"], list(PURE_SDK_MODULES)])
def test_the_pure_modules_alone_load_no_io_library(names: list[str]) -> None:
    loaded = _loaded_by("\n".join(f"import {n}" for n in names))
    assert names[0] in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("aiosqlite", "sqlite3", "aiohttp")]
    assert not [m for m in loaded if layer_of(m) not in (None, "model", "sdk")]
    assert not [m for m in loaded if layer_of(m) == "sdk" and m not in
                ("devserver.sdk", *PURE_SDK_MODULES)]
