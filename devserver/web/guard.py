"""Who may drive the server: requests addressed to another host, and state-changing requests a
browser sent from another web page, are refused with 403 before any handler runs (README
"Safety").

- **Host.** A request is answered only when its `Host` names this server: a loopback name
  (`localhost`, `*.localhost`), an IP address literal (a DNS rebinding attack needs a name that
  resolves to us, never a literal), the `--host` it was started with, this machine's own name
  when it listens beyond loopback, or a name given with `--allow-host`.
- **Origin.** A request that changes state (any method but GET, HEAD and OPTIONS) is refused
  when a browser says it came from another origin: an `Origin` header that is not this server's
  own (`null` included), or `Sec-Fetch-Site` other than `same-origin` and `none`. Clients that
  send neither (curl, the SDKs, the fixture) are not affected, and the dashboard's own pages are
  same-origin. `--allow-origin` admits a web app's origin on purpose.

The rules are plain functions of header values, so they are tested without a server.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from devserver.web.responses import error_response

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME_SITE_VALUES = frozenset({"same-origin", "none"})
MAX_REMEMBERED_HOSTS = 256
"""Allowed `Host` values remembered, so the usual one costs a set lookup (a bound: a client
can send any number of spellings)."""
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                            "ip6-loopback"})


def split_host(host: str) -> tuple[str, int | None] | None:
    """`Host` header value as (lower-case name or address, port), or None when malformed."""
    try:
        parts = urllib.parse.urlsplit(f"//{host.strip()}")
        port = parts.port
    except ValueError:
        return None
    name = (parts.hostname or "").rstrip(".")
    if not name or parts.username is not None or parts.path or parts.query:
        return None
    return name.lower(), port


def is_ip_literal(name: str) -> bool:
    """True for an IPv4 or IPv6 address (brackets already removed)."""
    try:
        ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    return True


@dataclass
class Guard:
    """The names this server answers to and the origins it takes state changes from."""

    bound_host: str = "127.0.0.1"
    """The `--host` the server listens on."""
    allowed_hosts: Iterable[str] = ()
    """Extra `Host` names to answer (`--allow-host`), e.g. `host.docker.internal`."""
    allowed_origins: Iterable[str] = ()
    """Extra origins whose pages may change state (`--allow-origin`), e.g.
    `http://localhost:3000`."""
    _names: set[str] = field(default_factory=set, init=False)
    _origins: set[str] = field(default_factory=set, init=False)
    _answered: set[str] = field(default_factory=set, init=False)
    """`Host` values already found allowed (a client sends the same one every time)."""

    def __post_init__(self) -> None:
        names = {name.lower().rstrip(".") for name in self.allowed_hosts}
        bound = self.bound_host.strip("[]").lower()
        if not is_ip_literal(bound):
            names.add(bound)
        elif not ipaddress.ip_address(bound.partition("%")[0]).is_loopback:
            # Reachable from other machines on purpose: they may use this machine's name.
            hostname = socket.gethostname().lower()
            names |= {hostname, hostname.split(".")[0]}
        self._names = names
        self._origins = {origin.rstrip("/").lower() for origin in self.allowed_origins}

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this `Host` header is addressed to this server."""
        if host is None or host in self._answered:
            return True  # no Host (HTTP/1.0): no browser sends that, so no rebinding
        parsed = split_host(host)
        if parsed is None:
            return False
        name, _ = parsed
        allowed = (name in LOOPBACK_NAMES or name.endswith(".localhost") or is_ip_literal(name)
                   or name in self._names)
        if allowed and len(self._answered) < MAX_REMEMBERED_HOSTS:
            self._answered.add(host)
        return allowed

    def origin_allowed(self, origin: str | None, fetch_site: str | None,
                       host: str | None) -> bool:
        """Whether a state-changing request may go on, given what the browser said of it."""
        if origin is not None:
            origin = origin.strip().rstrip("/").lower()
            if origin in self._origins:
                return True
            if not self._same_origin(origin, host):
                return False
        elif fetch_site is not None and fetch_site.strip().lower() not in SAME_SITE_VALUES:
            return False
        return True

    def _same_origin(self, origin: str, host: str | None) -> bool:
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme != "http" or host is None:
            return False
        try:
            origin_port = parts.port or 80
        except ValueError:
            return False
        target = split_host(host)
        if target is None:
            return False
        name, port = target
        return (parts.hostname or "") == name and origin_port == (port or 80)

    def refusal(self, request: web.Request) -> str | None:
        """Why `request` is refused, or None when it may go on."""
        host = request.headers.get("Host")
        if not self.host_allowed(host):
            return (f"this devserver does not answer to Host {host!r}; it answers to "
                    "localhost, IP addresses and --allow-host names (README: Safety)")
        if request.method in SAFE_METHODS:
            return None
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site")
        if not self.origin_allowed(origin, site, host):
            sender = origin if origin is not None else f"a {site} page"
            return (f"{request.method} {request.path} from {sender} refused: another web page "
                    "may not change this devserver's state (start it with --allow-origin "
                    "to allow a web app; README: Safety)")
        return None


GUARD = web.AppKey("guard", Guard)


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse requests the guard refuses (403, in the JSON error shape), before anything runs."""
    reason = request.app[GUARD].refusal(request)
    if reason is not None:
        log.info("refused: %s", reason)
        event_api = request.path.startswith("/e/") or request.path == "/e"
        return error_response(403, reason, event_api=event_api)
    return await handler(request)
