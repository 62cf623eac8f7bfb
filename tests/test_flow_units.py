"""Flow control's pure parts (`devserver.model.flow`) with plain values: both spellings of
the options, their validation errors, and the decisions (debounce, batch, rate limit, GCRA
throttle, concurrency keys, priority, a batch's sessions)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

import devserver
from devserver.errors import UserError
from devserver.model import flow
from devserver.model.flow import parse_local, parse_sdk
from devserver.sdk.registration import parse_registration

EVENT = {"name": "shop/order", "data": {"user": "u1", "n": 3, "vip": True}, "id": "", "ts": 1,
         "v": None, "user": {}}


def test_sdk_registration_shapes_become_one_config() -> None:
    cfg = parse_sdk({
        "concurrency": [{"limit": 2, "key": "event.data.user", "scope": "env"}, {"limit": 5}],
        "throttle": {"limit": 1, "period": "1m", "burst": 2, "key": "event.data.user"},
        "rateLimit": {"limit": 10, "period": "1h"},
        "debounce": {"period": "5s", "key": "event.data.user", "timeout": "1m"},
        "priority": {"run": "event.data.vip ? 120 : 0"},
        "singleton": {"key": "event.data.user", "mode": "cancel"},
        "idempotency": "event.data.user",
        "timeouts": {"start": "10s", "finish": "1h"},
    }, "functions[0]")
    assert cfg is not None
    assert [(c.limit, c.scope, c.key.source) for c in cfg.concurrency] == [
        (2, "env", "event.data.user"), (5, "fn", None)]
    assert cfg.throttle == flow.ThrottleRule(1, 60_000, 2, cfg.throttle.key)
    assert cfg.rate_limit is not None
    assert (cfg.rate_limit.limit, cfg.rate_limit.period_ms) == (10, 3_600_000)
    assert cfg.debounce is not None
    assert (cfg.debounce.period_ms, cfg.debounce.timeout_ms) == (5000, 60_000)
    assert cfg.singleton is not None
    assert cfg.singleton.mode == "cancel"
    assert (cfg.start_timeout_ms, cfg.finish_timeout_ms) == (10_000, 3_600_000)
    assert flow.priority_ms(cfg, EVENT) == 120_000
    assert parse_sdk({"concurrency": 3}, "f")  # TS accepts a bare number
    assert parse_sdk({"concurrency": None, "debounce": None}, "f") is None
    batch = parse_sdk({"batchEvents": {"maxSize": 8, "timeout": "10s", "key": "event.data.user",
                                       "if": "event.data.n > 1"}}, "f")
    assert batch is not None
    assert batch.batch is not None
    assert (batch.batch.max_size, batch.batch.timeout_ms) == (8, 10_000)


def test_local_options_take_inngest_pys_names_and_shapes() -> None:
    cfg = parse_local(
        concurrency=[devserver.Concurrency(limit=1, key="event.data.user")],
        throttle=devserver.Throttle(limit=2, period=dt.timedelta(seconds=6)),
        rate_limit=devserver.RateLimit(limit=1, period="1h", key="event.data.user"),
        batch_events=devserver.Batch(max_size=4, timeout=dt.timedelta(minutes=10),
                                     if_exp="event.data.n > 1"),
        priority=devserver.Priority(run="event.data.n * 100"),
        singleton=devserver.Singleton(mode="skip"), idempotency="event.data.user",
        timeouts=devserver.Timeouts(start="1m"))
    assert cfg is not None
    assert cfg.throttle is not None
    assert (cfg.throttle.limit, cfg.throttle.period_ms, cfg.throttle.burst) == (2, 6000, 1)
    assert cfg.batch is not None
    assert cfg.batch.condition is not None
    assert cfg.batch.condition.source == "event.data.n > 1"
    assert flow.priority_ms(cfg, EVENT) == 300_000
    assert flow.priority_ms(cfg, {**EVENT, "data": {"n": 100}}) == 600_000  # clamped
    assert parse_local() is None
    app = devserver.App("a")

    @app.function(trigger="x", debounce=devserver.Debounce(period="1s"))
    async def f(ctx: devserver.Context) -> None:
        return None

    assert app.functions[0].flow is not None


@pytest.mark.parametrize(("config", "message"), [
    ({"debounce": {"period": "soon"}}, "f.debounce.period: not a duration"),
    ({"debounce": {"period": "0s"}}, "f.debounce.period: must be more than zero"),
    ({"batchEvents": {"maxSize": 0, "timeout": "1s"}}, "f.batchEvents.maxSize: must be an"),
    ({"batchEvents": {"maxSize": 2}}, "f.batchEvents.timeout: not a duration"),
    ({"batchEvents": {"maxSize": 2, "timeout": "1s", "if": "event.data.("}},
     "f.batchEvents.if: invalid expression"),
    ({"singleton": {"mode": "queue"}}, "f.singleton.mode: must be 'skip' or 'cancel'"),
    ({"concurrency": [{"limit": 1}] * 3}, "f.concurrency: at most 2 limits"),
    ({"concurrency": [{"limit": 1, "scope": "world"}]}, "f.concurrency[0].scope: must be"),
    ({"throttle": {"limit": 1, "period": "1m", "key": 3}}, "f.throttle.key: must be a CEL"),
    ({"rateLimit": "fast"}, "f.rateLimit: must be an object"),
])
def test_bad_options_say_what_and_where(config: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_sdk(config, "f")
    assert message in caught.value.message


def test_a_bad_option_in_a_registration_names_the_function() -> None:
    body = {"appName": "app", "url": "http://h/api", "functions": [{
        "id": "app-fn", "triggers": [{"event": "e"}], "debounce": {"period": "never"},
        "steps": {"step": {"runtime": {"url": "http://h/api?fnId=app-fn&stepId=step"}}}}]}
    with pytest.raises(UserError, match=r"functions\[0\]\.debounce\.period"):
        parse_registration(body)


def test_local_errors() -> None:
    with pytest.raises(UserError, match=r"debounce must be a devserver\.Debounce"):
        parse_local(debounce="1s")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="can't be combined"):
        parse_local(debounce=devserver.Debounce(period="1s"),
                    batch_events=devserver.Batch(max_size=2, timeout="1s"))


def test_decisions() -> None:
    debounce = flow.DebounceRule(period_ms=1000, timeout_ms=2500, key=flow.Key(None))
    assert flow.debounce_due(debounce, now=100, first_at=None) == 1100
    assert flow.debounce_due(debounce, now=2000, first_at=100) == 2600  # capped by timeout
    batch = flow.BatchRule(max_size=3, timeout_ms=500, key=flow.Key(None), condition=None)
    assert (flow.batch_full(batch, 2), flow.batch_full(batch, 3)) == (False, True)
    assert flow.batch_due(batch, 10) == 510
    rate = flow.RateRule(limit=2, period_ms=1000, key=flow.Key(None))
    assert (flow.rate_allows(rate, 1), flow.rate_allows(rate, 2)) == (True, False)
    # GCRA: limit 2 per 6 s with burst 1 starts three at once, then one every 3 s.
    throttle = flow.ThrottleRule(limit=2, period_ms=6000, burst=1, key=flow.Key(None))
    tat, starts = None, []
    for now in (0, 500, 1000, 1500, 2000, 2500):
        start, tat = flow.throttle_start(throttle, now, tat)
        starts.append(start)
    assert starts == [0, 500, 1000, 3000, 6000, 9000]
    # After a quiet spell the burst is available again.
    assert flow.throttle_start(throttle, 60_000, tat)[0] == 60_000


def test_keys_and_sessions() -> None:
    key = flow.Key(flow.Expression("event.data.user"))
    assert key.of(EVENT) == "u1"
    assert flow.Key(flow.Expression("event.data.n")).of(EVENT) == "3"
    assert flow.Key(flow.Expression("event.data.missing")).of(EVENT) == "null"
    assert flow.Key(None).of(EVENT) == ""
    cfg = parse_sdk({"concurrency": [{"limit": 1, "key": "event.data.user"},
                                     {"limit": 9, "scope": "account"}]}, "f")
    assert cfg is not None
    keys = flow.concurrency_keys(cfg, "app-fn", "dev", EVENT)
    assert [limit for _, limit in keys] == [1, 9]
    assert keys[0][0].startswith("fn:app-fn:")
    assert keys[0][0].endswith(":u1")
    assert keys[1][0].startswith("account:")
    sessions = [{"c": "1", "u": "a"}, {"c": "1", "u": "b"}, {"c": "1"}]
    assert flow.shared_sessions(sessions) == {"c": "1"}
    assert flow.all_sessions(sessions) == [("c", "1"), ("u", "a"), ("u", "b")]
    assert flow.shared_sessions([]) == {}
    request = flow.request("f", "r", parse_sdk({"batchEvents": {
        "maxSize": 2, "timeout": "1s", "if": "event.data.n > 5"}}, "f") or flow.FlowConfig(),
        EVENT)
    assert request.batched is False  # `if` false: the event runs on its own


def test_env_and_account_limits_are_shared_across_functions() -> None:
    cfg = parse_sdk({"concurrency": [{"limit": 1, "key": '"openai"', "scope": "account"},
                                     {"limit": 2, "key": "event.data.user", "scope": "env"}]},
                    "f")
    other = parse_sdk({"concurrency": [{"limit": 1, "key": "'openai'", "scope": "account"}]},
                      "g")
    assert cfg is not None
    assert other is not None
    mine = flow.concurrency_keys(cfg, "app-f", "dev", EVENT)
    theirs = flow.concurrency_keys(other, "app-g", "dev", EVENT)
    assert mine[0][0] == theirs[0][0] == "account:openai"
    assert mine[1][0] == "env:dev:u1"
