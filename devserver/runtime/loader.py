"""Loading user apps from `--app MODULE[:ATTR]` or `--app path/to/file.py[:ATTR]`.

Without `:ATTR`, every `devserver.App` defined at the module's top level is taken. Any failure
becomes one `ConfigError` line that names the app spec and the place in the user's code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from devserver.app import App, FunctionDef
from devserver.errors import ConfigError


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError):  # its message already names the file and line
        where = ""
    message = " ".join(str(exc).split())  # one line, whatever the exception says
    return f"{type(exc).__name__}: {message}{where}"


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"--app {path}: no such file")
    name = f"devserver_app_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--app {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # Let the app import its sibling modules, as `python file.py` would.
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        raise ConfigError(f"--app {path}: import failed: {_describe(exc)}") from exc
    return module


def _import_module(name: str) -> ModuleType:
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise ConfigError(f"--app {name}: no module named {exc.name!r}") from exc
        raise ConfigError(f"--app {name}: import failed: {_describe(exc)}") from exc
    except BaseException as exc:
        raise ConfigError(f"--app {name}: import failed: {_describe(exc)}") from exc


def _functions_of(obj: object, spec: str) -> list[FunctionDef]:
    if isinstance(obj, App):
        return obj.functions
    if isinstance(obj, FunctionDef):
        return [obj]
    if isinstance(obj, list | tuple) and all(isinstance(o, App | FunctionDef) for o in obj):
        return [fn for o in obj for fn in _functions_of(o, spec)]
    raise ConfigError(f"--app {spec}: {type(obj).__name__} is not a devserver.App")


def load_app(spec: str) -> list[FunctionDef]:
    """Import the app named by `spec` and return its functions."""
    target, _, attr = spec.partition(":")
    if not target:
        raise ConfigError(f"--app {spec!r}: expected MODULE[:ATTR] or FILE.py[:ATTR]")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _import_file(Path(target)) if is_file else _import_module(target)
    if attr:
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise ConfigError(f"--app {spec}: {target} has no attribute {attr!r}") from None
        return _functions_of(obj, spec)
    apps = [value for value in vars(module).values() if isinstance(value, App)]
    if not apps:
        raise ConfigError(f"--app {spec}: no devserver.App found at the top level of {target}")
    return [fn for app in apps for fn in app.functions]
