"""Hot reload: watch the apps' source files and swap in new code without a restart.

On a change to a `.py` file under an app's folder, the user modules loaded from those folders are
forgotten and every `--app` is imported again. If that works, the runner gets the new functions:
new runs, and runs that resume later, use the new code; invocations already executing finish
with the code they started with; nothing in the database changes. If the import fails, the last
good code keeps running, and the error is logged and shown in `/api/status` until a later edit
fixes it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from devserver.app import FunctionDef
from devserver.errors import UserError
from devserver.runtime.loader import load_app
from devserver.runtime.runner import Runner

log = logging.getLogger(__name__)

DEBOUNCE_MS = 150
"""Changes closer together than this are one reload (editors write files in bursts)."""


@dataclass
class ReloadStatus:
    """What `/api/status` reports about reloading."""

    enabled: bool = True
    ok: bool = True
    error: str | None = None
    reloads: int = 0
    reloaded_at: float | None = None


def app_folder(spec: str) -> Path:
    """The folder whose Python files belong to an `--app` spec."""
    target = spec.partition(":")[0]
    if target.endswith(".py") or "/" in target or "\\" in target:
        return Path(target).resolve().parent
    file = getattr(sys.modules.get(target), "__file__", None)
    return Path(file).resolve().parent if file else Path.cwd().resolve()


class AppReloader:
    """Watches the folders of the `--app` specs and reloads them into a runner."""

    def __init__(self, specs: list[str], runner: Runner, *, debounce_ms: int = DEBOUNCE_MS,
                 force_polling: bool | None = None) -> None:
        self.specs = specs
        self.runner = runner
        self.status = ReloadStatus()
        self.folders = sorted({app_folder(spec) for spec in specs})
        self._debounce_ms = debounce_ms
        self._force_polling = force_polling
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching in the background."""
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="devserver-reload")

    async def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _watch(self) -> None:
        log.info("watching %s for changes", ", ".join(map(str, self.folders)))
        try:
            async for changes in watchfiles.awatch(
                *self.folders, watch_filter=watchfiles.PythonFilter(), stop_event=self._stop,
                debounce=self._debounce_ms, step=50, force_polling=self._force_polling,
            ):
                changed = sorted({Path(path).name for _, path in changes})
                log.info("change in %s: reloading", ", ".join(changed))
                await self.reload()
        except Exception:  # a watcher failure must not take the server down
            log.exception("file watching stopped")
            self.status.enabled = False

    def _forget_user_modules(self) -> None:
        roots = [str(folder) for folder in self.folders]
        package = str(Path(__file__).resolve().parent.parent)
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if not file:
                continue
            path = str(Path(file).resolve())
            if path.startswith(package) or "site-packages" in path:
                continue
            if any(path.startswith(root) for root in roots):
                del sys.modules[name]

    async def reload(self) -> bool:
        """Import the apps again; on success swap the runner's functions. Returns success."""
        self._forget_user_modules()
        try:
            functions: list[FunctionDef] = [fn for spec in self.specs for fn in load_app(spec)]
            await self.runner.replace(functions)
        except UserError as exc:
            self.status.ok, self.status.error = False, exc.message
            log.error("reload failed, still running the last good code: %s", exc.message)
            return False
        self.status.ok, self.status.error = True, None
        self.status.reloads += 1
        self.status.reloaded_at = time.time()
        log.info("reloaded: %d function(s): %s", len(functions),
                 ", ".join(fn.id for fn in functions))
        return True
