"""Flow control's options (SPEC 3.3), in both spellings, validated into one `FlowConfig`.

Pure logic. Local functions take the decorator classes here (`Concurrency`, `Throttle`,
`RateLimit`, `Debounce`, `Batch`, `Priority`, `Singleton`, `Timeouts`, with inngest-py's names
and shapes; `parse_local`); SDK apps send the JSON of their registration (`concurrency`,
`throttle`, `rateLimit`, `debounce`, `batchEvents`, `priority`, `singleton`, `idempotency`,
`timeouts`; `parse_sdk`). A bad option is a `UserError` naming it and where it is.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from devserver.clock import parse_duration
from devserver.errors import UserError
from devserver.model.expressions import Expression

Duration = str | int | float | dt.timedelta
"""A local option's duration: `"30s"`, `"1h30m"`, seconds, or a timedelta."""

MAX_CONCURRENCY_RULES = 2
"""A function may set at most two concurrency limits, as in Inngest."""


# ---------------------------------------------------------------------------------------------
# The options local functions take (inngest-py's names and shapes)


@dataclass(frozen=True)
class Concurrency:
    """At most `limit` runs executing at once (per `key`, within `scope`)."""

    limit: int
    key: str | None = None
    scope: Literal["fn", "env", "account"] | None = None


@dataclass(frozen=True)
class Throttle:
    """At most `limit` runs start per `period` (plus `burst`); later ones wait their turn."""

    limit: int
    period: Duration
    key: str | None = None
    burst: int | None = 1


@dataclass(frozen=True)
class RateLimit:
    """At most `limit` runs per `period` (per `key`); events over it start nothing."""

    limit: int
    period: Duration
    key: str | None = None


@dataclass(frozen=True)
class Debounce:
    """Run once, with the last event, after `period` without a new one (at most `timeout`
    after the first)."""

    period: Duration
    key: str | None = None
    timeout: Duration | None = None


@dataclass(frozen=True)
class Batch:
    """One run for up to `max_size` events, or for those `timeout` after the first; `if_`
    (or inngest-py's `if_exp`) picks the events batched, the others run alone."""

    max_size: int
    timeout: Duration
    key: str | None = None
    if_: str | None = None
    if_exp: str | None = None


@dataclass(frozen=True)
class Priority:
    """`run`: CEL giving seconds (-600..600) a queued run moves ahead of others."""

    run: str


@dataclass(frozen=True)
class Singleton:
    """One run at a time (per `key`): `skip` drops new events, `cancel` replaces the run."""

    key: str | None = None
    mode: Literal["skip", "cancel"] = "skip"


@dataclass(frozen=True)
class Timeouts:
    """Cancel a run not started within `start` of its event, or not finished within
    `finish` of its start."""

    start: Duration | None = None
    finish: Duration | None = None


# ---------------------------------------------------------------------------------------------
# The compiled configuration


@dataclass(frozen=True)
class Key:
    """A CEL key over `event` (None: one key for every event)."""

    expression: Expression | None

    def of(self, event: Mapping[str, Any]) -> str:
        """The key's value for an event, as text ("" without an expression; a key that can't
        be evaluated is null)."""
        if self.expression is None:
            return ""
        value = self.expression.value(event=event)
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)

    @property
    def source(self) -> str | None:
        return None if self.expression is None else self.expression.source


@dataclass(frozen=True)
class ConcurrencyRule:
    limit: int
    key: Key
    scope: str


@dataclass(frozen=True)
class ThrottleRule:
    limit: int
    period_ms: int
    burst: int
    key: Key


@dataclass(frozen=True)
class RateRule:
    limit: int
    period_ms: int
    key: Key


@dataclass(frozen=True)
class DebounceRule:
    period_ms: int
    timeout_ms: int | None
    key: Key


@dataclass(frozen=True)
class BatchRule:
    max_size: int
    timeout_ms: int
    key: Key
    condition: Expression | None


@dataclass(frozen=True)
class SingletonRule:
    mode: str
    key: Key


@dataclass(frozen=True)
class FlowConfig:
    """A function's flow control, validated."""

    concurrency: tuple[ConcurrencyRule, ...] = ()
    throttle: ThrottleRule | None = None
    rate_limit: RateRule | None = None
    debounce: DebounceRule | None = None
    batch: BatchRule | None = None
    priority: Expression | None = None
    singleton: SingletonRule | None = None
    idempotency: Key | None = None
    start_timeout_ms: int | None = None
    finish_timeout_ms: int | None = None

    @property
    def at_intake(self) -> bool:
        """Whether events need a decision before a run is created."""
        return any(x is not None for x in (self.throttle, self.rate_limit, self.debounce,
                                           self.batch, self.singleton, self.idempotency))

    def doc(self) -> dict[str, Any]:
        """The options in the registration's JSON shape (for `/api/functions`)."""
        out: dict[str, Any] = {}
        if self.concurrency:
            out["concurrency"] = [{"limit": c.limit, "key": c.key.source, "scope": c.scope}
                                  for c in self.concurrency]
        if self.throttle:
            t = self.throttle
            out["throttle"] = {"limit": t.limit, "period_ms": t.period_ms, "burst": t.burst,
                               "key": t.key.source}
        if self.rate_limit:
            r = self.rate_limit
            out["rateLimit"] = {"limit": r.limit, "period_ms": r.period_ms, "key": r.key.source}
        if self.debounce:
            d = self.debounce
            out["debounce"] = {"period_ms": d.period_ms, "timeout_ms": d.timeout_ms,
                               "key": d.key.source}
        if self.batch:
            b = self.batch
            out["batchEvents"] = {"maxSize": b.max_size, "timeout_ms": b.timeout_ms,
                                  "key": b.key.source,
                                  "if": None if b.condition is None else b.condition.source}
        if self.priority is not None:
            out["priority"] = {"run": self.priority.source}
        if self.singleton:
            out["singleton"] = {"mode": self.singleton.mode, "key": self.singleton.key.source}
        if self.idempotency is not None:
            out["idempotency"] = self.idempotency.source
        if self.start_timeout_ms is not None or self.finish_timeout_ms is not None:
            out["timeouts"] = {"start_ms": self.start_timeout_ms,
                               "finish_ms": self.finish_timeout_ms}
        return out


def _fail(where: str, message: str) -> UserError:
    return UserError(f"{where}: {message}")


def _int(value: Any, where: str, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(where, f"must be an integer of at least {low}, got {value!r}")
    return value


def _duration(value: Any, where: str, *, sdk: bool) -> int:
    """A duration in ms: the SDKs send strings ("5s", "1h"); a number there is ms."""
    if sdk and isinstance(value, int | float) and not isinstance(value, bool):
        ms = int(value)
    else:
        try:
            ms = parse_duration(value)
        except ValueError as exc:
            raise _fail(where, str(exc)) from None
    if ms <= 0:
        raise _fail(where, f"must be more than zero, got {value!r}")
    return ms


def _key(value: Any, where: str) -> Key:
    if value is None or value == "":
        return Key(None)
    if not isinstance(value, str):
        raise _fail(where, f"must be a CEL expression (a string), got {value!r}")
    try:
        return Key(Expression(value))
    except UserError as exc:
        raise _fail(where, exc.message) from None


def _expression(value: Any, where: str) -> Expression:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"must be a CEL expression (a string), got {value!r}")
    try:
        return Expression(value)
    except UserError as exc:
        raise _fail(where, exc.message) from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object, got {type(value).__name__}")
    return value


def _concurrency(items: list[Any], where: str, *, sdk: bool) -> tuple[ConcurrencyRule, ...]:
    if len(items) > MAX_CONCURRENCY_RULES:
        raise _fail(where, f"at most {MAX_CONCURRENCY_RULES} limits, got {len(items)}")
    rules = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        if isinstance(item, int) and not isinstance(item, bool):
            item = {"limit": item}
        elif isinstance(item, Concurrency):
            item = {"limit": item.limit, "key": item.key, "scope": item.scope}
        body = _object(item, at)
        scope = body.get("scope") or "fn"
        if scope not in ("fn", "env", "account"):
            raise _fail(f"{at}.scope", f"must be 'fn', 'env' or 'account', got {scope!r}")
        limit = _int(body.get("limit"), f"{at}.limit", low=0)
        if limit == 0:  # Inngest: 0 means no limit of its own
            continue
        rules.append(ConcurrencyRule(limit, _key(body.get("key"), f"{at}.key"), scope))
    return tuple(rules)


def parse_sdk(config: Mapping[str, Any], where: str) -> FlowConfig | None:
    """The flow control of an SDK function's registration config (None without any);
    `UserError` names the option that is wrong."""
    found: dict[str, Any] = {}
    concurrency = config.get("concurrency")
    if concurrency not in (None, [], {}):
        items = concurrency if isinstance(concurrency, list) else [concurrency]
        found["concurrency"] = _concurrency(items, f"{where}.concurrency", sdk=True)
    if config.get("throttle") is not None:
        t = _object(config["throttle"], f"{where}.throttle")
        burst = t.get("burst")
        found["throttle"] = ThrottleRule(
            _int(t.get("limit"), f"{where}.throttle.limit"),
            _duration(t.get("period"), f"{where}.throttle.period", sdk=True),
            1 if burst is None else _int(burst, f"{where}.throttle.burst"),
            _key(t.get("key"), f"{where}.throttle.key"))
    if config.get("rateLimit") is not None:
        r = _object(config["rateLimit"], f"{where}.rateLimit")
        found["rate_limit"] = RateRule(
            _int(r.get("limit"), f"{where}.rateLimit.limit"),
            _duration(r.get("period"), f"{where}.rateLimit.period", sdk=True),
            _key(r.get("key"), f"{where}.rateLimit.key"))
    if config.get("debounce") is not None:
        d = _object(config["debounce"], f"{where}.debounce")
        found["debounce"] = DebounceRule(
            _duration(d.get("period"), f"{where}.debounce.period", sdk=True),
            None if d.get("timeout") is None
            else _duration(d["timeout"], f"{where}.debounce.timeout", sdk=True),
            _key(d.get("key"), f"{where}.debounce.key"))
    if config.get("batchEvents") is not None:
        b = _object(config["batchEvents"], f"{where}.batchEvents")
        condition = b.get("if")
        found["batch"] = BatchRule(
            _int(b.get("maxSize"), f"{where}.batchEvents.maxSize"),
            _duration(b.get("timeout"), f"{where}.batchEvents.timeout", sdk=True),
            _key(b.get("key"), f"{where}.batchEvents.key"),
            None if not condition else _expression(condition, f"{where}.batchEvents.if"))
    if config.get("priority") is not None:
        p = _object(config["priority"], f"{where}.priority")
        if p.get("run"):
            found["priority"] = _expression(p["run"], f"{where}.priority.run")
    if config.get("singleton") is not None:
        s = _object(config["singleton"], f"{where}.singleton")
        mode = s.get("mode")
        if mode not in ("skip", "cancel"):
            raise _fail(f"{where}.singleton.mode", f"must be 'skip' or 'cancel', got {mode!r}")
        found["singleton"] = SingletonRule(mode, _key(s.get("key"), f"{where}.singleton.key"))
    if config.get("idempotency") not in (None, ""):
        found["idempotency"] = _key(config["idempotency"], f"{where}.idempotency")
    if config.get("timeouts") is not None:
        t = _object(config["timeouts"], f"{where}.timeouts")
        for name in ("start", "finish"):
            if t.get(name) is not None:
                found[f"{name}_timeout_ms"] = _duration(t[name], f"{where}.timeouts.{name}",
                                                        sdk=True)
    return FlowConfig(**found) if found else None


def parse_local(
    *, concurrency: Concurrency | Iterable[Concurrency] | int | None = None,
    throttle: Throttle | None = None, rate_limit: RateLimit | None = None,
    debounce: Debounce | None = None, batch_events: Batch | None = None,
    priority: Priority | None = None, singleton: Singleton | None = None,
    idempotency: str | None = None, timeouts: Timeouts | None = None,
) -> FlowConfig | None:
    """The flow control of `@app.function(...)`'s options (None without any)."""
    found: dict[str, Any] = {}

    def of(value: Any, kind: type, name: str) -> Any:
        if not isinstance(value, kind):
            raise UserError(f"{name} must be a devserver.{kind.__name__}, got {value!r}")
        return value

    if concurrency is not None:
        items: list[Any] = ([concurrency] if isinstance(concurrency, Concurrency | int)
                            else list(concurrency))
        found["concurrency"] = _concurrency(items, "concurrency", sdk=False)
    if throttle is not None:
        t = of(throttle, Throttle, "throttle")
        found["throttle"] = ThrottleRule(
            _int(t.limit, "throttle.limit"), _duration(t.period, "throttle.period", sdk=False),
            1 if t.burst is None else _int(t.burst, "throttle.burst"),
            _key(t.key, "throttle.key"))
    if rate_limit is not None:
        r = of(rate_limit, RateLimit, "rate_limit")
        found["rate_limit"] = RateRule(
            _int(r.limit, "rate_limit.limit"),
            _duration(r.period, "rate_limit.period", sdk=False), _key(r.key, "rate_limit.key"))
    if debounce is not None:
        d = of(debounce, Debounce, "debounce")
        found["debounce"] = DebounceRule(
            _duration(d.period, "debounce.period", sdk=False),
            None if d.timeout is None else _duration(d.timeout, "debounce.timeout", sdk=False),
            _key(d.key, "debounce.key"))
    if batch_events is not None:
        b = of(batch_events, Batch, "batch_events")
        condition = b.if_ if b.if_ is not None else b.if_exp
        found["batch"] = BatchRule(
            _int(b.max_size, "batch_events.max_size"),
            _duration(b.timeout, "batch_events.timeout", sdk=False),
            _key(b.key, "batch_events.key"),
            None if not condition else _expression(condition, "batch_events.if_"))
    if priority is not None:
        found["priority"] = _expression(of(priority, Priority, "priority").run, "priority.run")
    if singleton is not None:
        s = of(singleton, Singleton, "singleton")
        if s.mode not in ("skip", "cancel"):
            raise UserError(f"singleton.mode: must be 'skip' or 'cancel', got {s.mode!r}")
        found["singleton"] = SingletonRule(s.mode, _key(s.key, "singleton.key"))
    if idempotency is not None:
        found["idempotency"] = _key(idempotency, "idempotency")
    if timeouts is not None:
        t2 = of(timeouts, Timeouts, "timeouts")
        if t2.start is not None:
            found["start_timeout_ms"] = _duration(t2.start, "timeouts.start", sdk=False)
        if t2.finish is not None:
            found["finish_timeout_ms"] = _duration(t2.finish, "timeouts.finish", sdk=False)
    if found.get("debounce") and found.get("batch"):
        raise UserError("debounce and batch_events can't be combined on one function")
    return FlowConfig(**found) if found else None
