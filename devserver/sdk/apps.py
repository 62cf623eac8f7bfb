"""Inngest SDK apps: syncing them and keeping their functions registered.

Syncing an app (`-u URL`): the server sends `PUT <url>` with `X-Inngest-Server-Kind: dev`; the
SDK answers by POSTing its functions to `/fn/register`, which turns them into `FunctionDef`s
(see `registration`) served remotely and swaps them in for that app's previous set. Known URLs
are synced at start and again every few seconds, so an app that restarts with new code is
picked up (an unchanged registration is a no-op: `"modified": false`); `POST /api/apps/sync`
syncs on demand; with discovery on, the usual local dev ports are probed for apps too.
Runs of the apps' functions go through `executor.SdkExecutor`.

Its HTTP routes are in `devserver.web.sdk_routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from devserver import __version__
from devserver.app import FunctionDef
from devserver.clock import Clock, iso
from devserver.errors import UserError
from devserver.runtime.runner import Runner
from devserver.sdk.executor import USER_AGENT, ReplyTooLarge, read_capped
from devserver.sdk.protocol import (
    SDK_HEADER,
    SERVER_KIND,
    SERVER_KIND_HEADER,
)
from devserver.sdk.registration import (
    Registration,
    dev_function_doc,
    identify,
    parse_registration,
)

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 5.0
"""Seconds between re-syncs of known apps (how soon a restarted app's new code is used)."""
SYNC_TIMEOUT = 30.0
"""Seconds a sync (the PUT, during which the app registers) may take."""
PROBE_TIMEOUT = 1.0
MAX_SYNC_REPLY_BYTES = 1024 * 1024
"""The most of an app's answer to the sync PUT that is read (only its start is shown)."""
DISCOVERY_PORTS = (3000, 3001, 3002, 3003, 3004, 3005, 3006, 3007, 3008, 3009, 3010, 3030,
                   5000, 5173, 8000, 8080, 8081, 8888)
DISCOVERY_PATHS = ("/api/inngest", "/x/inngest", "/.netlify/functions/inngest",
                   "/.redwood/functions/inngest")


def normalize_url(url: str) -> str:
    """A URL as a key: lowercase scheme and host, `localhost` as `127.0.0.1`, no default port,
    no query, no trailing slash. The SDK may register itself under a spelling of its URL
    other than the one it was synced with."""
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if host in ("localhost", "::1", "0.0.0.0"):
        host = "127.0.0.1"
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if port is None or port == default else f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc,
                                    parts.path.rstrip("/") or "/", "", ""))


@dataclass
class SdkApp:
    """A registered app and its functions."""

    app_id: str
    url: str
    sdk: str
    framework: str
    checksum: str
    functions: list[FunctionDef]
    configs: list[dict[str, Any]]
    ignored: dict[str, list[str]]
    registered_at: int


@dataclass
class SyncResult:
    """What one sync of an app URL came to."""

    url: str
    ok: bool
    app_id: str | None = None
    modified: bool = False
    error: str | None = None
    synced_at: int | None = None

    def doc(self) -> dict[str, Any]:
        """JSON shape."""
        return {"url": self.url, "ok": self.ok, "app_id": self.app_id,
                "modified": self.modified, "error": self.error,
                "synced_at": iso(self.synced_at)}


@dataclass
class _Sync:
    """A sync in flight: the registration it is waiting for."""

    url: str
    done: asyncio.Future[SyncResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class SdkApps:
    """The SDK apps this server knows: their registrations, syncing, and the executor that
    runs their functions."""

    def __init__(
        self, runner: Runner, clock: Clock, *, urls: list[str] | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL, discover: bool = False,
        discovery_ports: tuple[int, ...] = DISCOVERY_PORTS,
    ) -> None:
        self.runner = runner
        self.clock = clock
        self.poll_interval = poll_interval
        self.discover = discover
        self.discovery_ports = discovery_ports
        self.configured = list(urls or [])
        self.base_url: str | None = None
        """This server's URL, once bound; named in sync errors so users know where to point."""
        self._apps: dict[str, SdkApp] = {}
        self._urls: dict[str, SyncResult] = {}  # normalized URL -> its last sync
        self._inflight: dict[str, _Sync] = {}
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        for url in self.configured:
            self._urls.setdefault(normalize_url(url), SyncResult(url, ok=False))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP clients, then sync the known apps in the background (the app's
        registration comes back over HTTP, so the server must be serving) and keep them
        synced."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=SYNC_TIMEOUT),
            headers={"User-Agent": USER_AGENT})
        self._task = asyncio.get_running_loop().create_task(self._keep_synced(),
                                                            name="devserver-sdk-sync")

    async def stop(self) -> None:
        """Stop syncing and close the HTTP clients."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_synced(self) -> None:
        """Return once the first sync of the URLs known at start has finished (either way)."""
        await self._synced.wait()

    async def _keep_synced(self) -> None:
        # Wall-clock pacing on purpose: this talks to other processes in real time, so it
        # must not follow a virtual clock that tests move by hand.
        try:
            await self.sync_all()
        finally:
            self._synced.set()
        while self.poll_interval > 0:
            await asyncio.sleep(self.poll_interval)
            try:
                if self.discover:
                    await self.discover_apps()
                await self.sync_all()
            except Exception:  # a poll must never stop polling
                log.exception("syncing SDK apps failed")

    # -- syncing -----------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Every app URL this server syncs."""
        return [result.url for result in self._urls.values()]

    @property
    def sync_results(self) -> list[SyncResult]:
        """The last sync of every known app URL (`ok`, `app_id`, `error`)."""
        return list(self._urls.values())

    async def sync_all(self) -> list[SyncResult]:
        """Sync every known app URL (concurrently)."""
        return list(await asyncio.gather(*(self.sync(url) for url in self.urls)))

    async def sync(self, url: str) -> SyncResult:
        """Ask the app at `url` to register (PUT); it is known (and re-synced) from now on."""
        if not url.startswith(("http://", "https://")):
            raise UserError(f"app URL {url!r} must start with http:// or https://")
        if self._session is None:
            raise RuntimeError("SDK apps are not started")
        key = normalize_url(url)
        self._urls.setdefault(key, SyncResult(url, ok=False))
        sync = self._inflight.get(key)
        if sync is not None:  # one sync per URL at a time: share it
            return await asyncio.shield(sync.done)
        sync = self._inflight[key] = _Sync(url)
        try:
            result = await self._put(url, sync)
        finally:
            self._inflight.pop(key, None)
        result.synced_at = self.clock.now_ms()
        if not result.ok:
            previous = self._urls.get(key)
            if previous is None or previous.error != result.error:
                log.warning("sync of %s failed: %s", url, result.error)
        self._urls[key] = result
        if not sync.done.done():
            sync.done.set_result(result)
        return result

    async def _put(self, url: str, sync: _Sync) -> SyncResult:
        assert self._session is not None
        try:
            async with self._session.put(url, json={"url": url},
                                         headers={SERVER_KIND_HEADER: SERVER_KIND}) as resp:
                status = resp.status
                text = (await read_capped(resp, MAX_SYNC_REPLY_BYTES)).decode(
                    "utf-8", errors="replace")
        except ReplyTooLarge as exc:
            if not sync.done.done():
                return SyncResult(url, ok=False,
                                  error=f"the app at {url} answered the sync: {exc}")
            status, text = 200, ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            return SyncResult(url, ok=False,
                              error=f"could not reach {url}: {exc or type(exc).__name__}")
        if sync.done.done():  # the app registered while answering: that is the outcome
            registered = sync.done.result()
            return SyncResult(url, ok=registered.ok, app_id=registered.app_id,
                              modified=registered.modified, error=registered.error)
        answer = f"HTTP {status}: {text.strip()[:300]}" if status >= 400 else f"HTTP {status}"
        where = f" ({self.base_url})" if self.base_url else ""
        return SyncResult(url, ok=False, error=(
            f"the app answered the sync ({answer}) but never registered with this "
            f"server{where}: point its SDK at this server (INNGEST_DEV=<url> or "
            "INNGEST_BASE_URL=<url>, or the client's base URL option)"))

    # -- registration ------------------------------------------------------------------------

    async def register(self, body: Any) -> tuple[bool, str]:
        """Apply an app's registration; returns (modified, app id). Raises `UserError`."""
        sync = self._sync_for(body.get("url") if isinstance(body, dict) else None)
        known = identify(body)
        current = self._apps.get(known[0]) if known is not None else None
        if known is not None and current is not None and current.checksum == known[1]:
            # Unchanged (every re-sync): answered from the checksum, nothing parsed/replaced.
            if sync is not None and not sync.done.done():
                sync.done.set_result(SyncResult(sync.url, ok=True, app_id=current.app_id))
            return False, current.app_id
        try:
            reg = parse_registration(body)
            async with self._lock:
                modified = await self._apply(reg)
        except UserError as exc:
            if sync is not None and not sync.done.done():
                sync.done.set_result(SyncResult(sync.url, ok=False,
                                                error=f"registration refused: {exc.message}"))
            raise
        if sync is not None and not sync.done.done():
            sync.done.set_result(SyncResult(sync.url, ok=True, app_id=reg.app_id,
                                            modified=modified))
        key = normalize_url(reg.url)
        if sync is None and key not in self._urls:  # registered without our PUT: keep it synced
            self._urls[key] = SyncResult(reg.url, ok=True, app_id=reg.app_id,
                                         modified=modified, synced_at=self.clock.now_ms())
        return modified, reg.app_id

    def _sync_for(self, url: Any) -> _Sync | None:
        if not isinstance(url, str):
            return None
        if normalize_url(url) in self._inflight:
            return self._inflight[normalize_url(url)]
        # An app may register under another spelling of its URL (a hostname, a path its
        # framework rewrote): one sync in flight to the same port is the one it answers.
        port = _port_of(url)
        candidates = [sync for sync in self._inflight.values() if _port_of(sync.url) == port]
        return candidates[0] if port is not None and len(candidates) == 1 else None

    async def _apply(self, reg: Registration) -> bool:
        current = self._apps.get(reg.app_id)
        if current is not None and current.checksum == reg.checksum:
            return False
        await self.runner.replace(reg.functions, scope=_of_app(reg.app_id))
        self._apps[reg.app_id] = SdkApp(
            app_id=reg.app_id, url=reg.url, sdk=reg.sdk, framework=reg.framework,
            checksum=reg.checksum, functions=reg.functions, configs=reg.configs,
            ignored=reg.ignored, registered_at=self.clock.now_ms())
        log.info("app %s (%s) registered %d function(s): %s", reg.app_id, reg.sdk or "sdk",
                 len(reg.functions), ", ".join(fn.id for fn in reg.functions) or "none")
        for fn_id, keys in reg.ignored.items():
            log.info("%s: %s not emulated by devserver (accepted, ignored)", fn_id,
                     ", ".join(keys))
        return True

    async def remove(self, url: str) -> list[str]:
        """Forget the apps registered from `url` and their functions; returns their ids."""
        key = normalize_url(url)
        gone = [app for app in self._apps.values() if normalize_url(app.url) == key]
        async with self._lock:
            for app in gone:
                await self.runner.replace([], scope=_of_app(app.app_id))
                del self._apps[app.app_id]
        self._urls.pop(key, None)
        return [app.app_id for app in gone]

    # -- discovery ---------------------------------------------------------------------------

    async def discover_apps(self) -> list[str]:
        """Probe the usual local dev ports for Inngest serve endpoints; sync new ones."""
        own = urllib.parse.urlsplit(self.base_url).port if self.base_url else None
        ports = [port for port in self.discovery_ports if port != own]
        open_ports = [port for port, ok in zip(
            ports, await asyncio.gather(*(_port_open(port) for port in ports)), strict=True)
            if ok]
        candidates = [f"http://127.0.0.1:{port}{path}" for port in open_ports
                      for path in DISCOVERY_PATHS]
        candidates = [url for url in candidates if normalize_url(url) not in self._urls]
        found = [url for url, ok in zip(
            candidates, await asyncio.gather(*(self._is_sdk(url) for url in candidates)),
            strict=True) if ok]
        for url in found:
            log.info("discovered an Inngest SDK app at %s", url)
            await self.sync(url)
        return found

    async def _is_sdk(self, url: str) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(
                    total=PROBE_TIMEOUT)) as resp:
                return SDK_HEADER in resp.headers
        except (aiohttp.ClientError, TimeoutError):
            return False

    # -- documents ---------------------------------------------------------------------------

    def apps_doc(self) -> dict[str, Any]:
        """`/api/apps`: the registered apps and the URLs being synced."""
        return {
            "apps": [{
                "id": app.app_id, "url": app.url, "sdk": app.sdk, "framework": app.framework,
                "functions": [fn.id for fn in app.functions],
                "ignored_options": app.ignored, "registered_at": iso(app.registered_at),
            } for app in self._apps.values()],
            "urls": [result.doc() for result in self._urls.values()],
            "poll_interval": self.poll_interval,
            "discover": self.discover,
        }

    def dev_doc(self) -> dict[str, Any]:
        """`GET /dev`, in the shape of Inngest's dev server info."""
        return {
            "version": __version__,
            "startOpts": {"urls": self.configured, "autodiscover": self.discover,
                          "poll": self.poll_interval > 0,
                          "pollInterval": self.poll_interval},
            "functions": [dev_function_doc(config) for app in self._apps.values()
                          for config in app.configs],
            "handlers": [{
                "url": app.url, "app_id": app.app_id,
                "sdk": {"language": app.sdk.partition(":")[0],
                        "version": app.sdk.partition(":")[2], "framework": app.framework},
                "functions": [fn.id for fn in app.functions],
                "error": self._urls.get(normalize_url(app.url), SyncResult(app.url, True)).error,
            } for app in self._apps.values()],
            "isSingleNodeService": True,
            "isMissingSigningKey": False,
            "isMissingEventKeys": False,
            "features": {},
        }


def _port_of(url: str) -> int | None:
    parts = urllib.parse.urlsplit(url)
    try:
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return None


def _of_app(app_id: str) -> Callable[[FunctionDef], bool]:
    """Selects the functions an SDK app registered (for `Runner.replace`)."""
    def selected(fn: FunctionDef) -> bool:
        return fn.remote is not None and fn.app_id == app_id
    return selected


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                           PROBE_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
