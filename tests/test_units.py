"""Unit tests of the pure modules, with plain values: triggers, retry policy, ids, the App API."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import subprocess
import sys
import threading

import pytest

import devserver
from devserver.app import FunctionDef, RetryAfterError, kebab_case
from devserver.clock import VirtualClock
from devserver.errors import UserError
from devserver.ids import UlidGenerator, is_ulid, new_ulid, ulid_time_ms
from devserver.model.retry import (
    INNGEST_BACKOFF_SECONDS,
    FixedBackoff,
    InngestBackoff,
    max_attempts,
)
from devserver.model.triggers import CronTrigger, TriggerIndex, parse_event_trigger
from devserver.runtime.crons import CronSchedule
from devserver.runtime.execution import Slots


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("app/user.created", "app/user.created", True),
        ("app/user.created", "app/user.created2", False),
        ("app/*", "app/user.created", True),
        ("app/*", "app/", True),
        ("app/*", "app", False),
        ("app/*", "apps/x", False),
        ("app/user.*", "app/user.created", True),
        ("app/user.*", "app/users.created", False),
        ("app/user.*", "app/user", False),
    ],
)
def test_trigger_matching(pattern: str, name: str, matches: bool) -> None:
    index: TriggerIndex[str] = TriggerIndex([(parse_event_trigger(pattern), "fn")])
    assert index.match(name) == (["fn"] if matches else [])


def test_trigger_index_returns_each_item_once_in_registration_order() -> None:
    index: TriggerIndex[str] = TriggerIndex()
    index.add(parse_event_trigger("app/*"), "a")
    index.add(parse_event_trigger("app/user.created"), "b")
    index.add(parse_event_trigger("app/user.*"), "a")
    index.add(parse_event_trigger("app/user.created"), "a")
    assert index.match("app/user.created") == ["b", "a"]


@pytest.mark.parametrize("bad", ["", "  ", "app/*/x", "*", "/*", "app*", "a/b*c"])
def test_bad_trigger_patterns_are_refused_with_a_reason(bad: str) -> None:
    with pytest.raises(UserError):
        parse_event_trigger(bad)


def test_inngest_backoff_follows_the_table_with_bounded_jitter() -> None:
    backoff = InngestBackoff(rng=random.Random(1))
    for attempt, base in enumerate(INNGEST_BACKOFF_SECONDS):
        delay = backoff.delay_ms(attempt)
        assert base * 1000 <= delay <= (base + 30) * 1000
    assert backoff.delay_ms(50) >= INNGEST_BACKOFF_SECONDS[-1] * 1000
    assert InngestBackoff(jitter_seconds=0).delay_ms(0) == 15_000


def test_fixed_backoff() -> None:
    assert FixedBackoff(0).delay_ms(3) == 0
    assert FixedBackoff(1.5).delay_ms(0) == 1500
    with pytest.raises(ValueError, match="zero or more"):
        FixedBackoff(-1)
    assert max_attempts(4) == 5


def test_retry_after_error_delay_forms() -> None:
    now = 1_700_000_000_000
    assert RetryAfterError("x", 2).retry_at_ms(now) == now + 2000
    assert RetryAfterError("x", dt.timedelta(minutes=1)).retry_at_ms(now) == now + 60_000
    at = dt.datetime.fromtimestamp((now + 5000) / 1000, tz=dt.UTC)
    assert RetryAfterError("x", at).retry_at_ms(now) == now + 5000
    past = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    assert RetryAfterError("x", past).retry_at_ms(now) == now


def test_ulids_are_well_formed_carry_their_time_and_increase() -> None:
    gen = UlidGenerator()
    ids = [gen.new(1_700_000_000_000) for _ in range(1000)]
    assert all(is_ulid(i) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert ulid_time_ms(ids[0]) == 1_700_000_000_000
    # The clock going backwards never produces a smaller id.
    later = gen.new(1_600_000_000_000)
    assert later > ids[-1]
    assert is_ulid(new_ulid())
    assert not is_ulid("not-a-ulid")


def test_ulids_are_unique_across_threads() -> None:
    gen = UlidGenerator()
    out: list[list[str]] = [[] for _ in range(4)]

    def make(bucket: list[str]) -> None:
        bucket.extend(gen.new() for _ in range(2000))

    threads = [threading.Thread(target=make, args=(b,)) for b in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for bucket in out for i in bucket]
    assert len(set(every)) == len(every)
    assert all(bucket == sorted(bucket) for bucket in out)


@pytest.mark.parametrize(
    ("name", "kebab"),
    [("summarize", "summarize"), ("summarize_thread", "summarize-thread"),
     ("SummarizeThread", "summarize-thread"), ("load2_items", "load2-items")],
)
def test_kebab_case(name: str, kebab: str) -> None:
    assert kebab_case(name) == kebab


def test_app_registers_functions_and_returns_them_unchanged() -> None:
    app = devserver.App("support-bot")

    async def summarize_thread(ctx: devserver.Context) -> None:
        return None

    decorated = app.function(trigger=["app/a", "app/b.*"], retries=2)(summarize_thread)
    assert decorated is summarize_thread
    (fn,) = app.functions
    assert fn.id == "support-bot-summarize-thread"
    assert fn.app_id == "support-bot"
    assert [t.event for t in fn.triggers] == ["app/a", "app/b.*"]
    assert (fn.retries, fn.max_attempts, fn.is_async) == (2, 3, True)

    @app.function(trigger="app/c", id="custom")
    def sync_fn(ctx: devserver.Context) -> None:
        return None

    assert app.functions[1].id == "support-bot-custom"
    assert app.functions[1].is_async is False
    assert app.functions[1].retries == 4


@pytest.mark.parametrize(
    "kwargs",
    [{"trigger": []}, {"trigger": "app/*x"}, {"trigger": "a", "retries": -1},
     {"trigger": "a", "retries": True}, {"trigger": "a", "retries": 21},
     {"trigger": "a", "id": "has space"}],
)
def test_bad_function_definitions_are_refused(kwargs: dict[str, object]) -> None:
    app = devserver.App("x")
    with pytest.raises(UserError):
        app.function(**kwargs)(lambda ctx: None)  # type: ignore[arg-type]


def test_duplicate_function_ids_and_bad_app_ids_are_refused() -> None:
    app = devserver.App("x")

    def f(ctx: devserver.Context) -> None:
        return None

    app.function(trigger="a")(f)
    with pytest.raises(UserError, match="already has a function"):
        app.function(trigger="b")(f)
    for bad in ["", "has space", "-leading"]:
        with pytest.raises(UserError):
            devserver.App(bad)


def test_starting_the_server_does_not_load_the_cel_library() -> None:
    """`cel` loads its own command line (rich, prompt_toolkit) on import, a sixth of the
    start-up; it is imported when the first expression is compiled, not before."""
    code = ("import sys, devserver.cli.main, devserver.web.server, devserver.testing\n"
            "assert 'cel' not in sys.modules, 'cel imported at start-up'\n"
            "from devserver.model.expressions import Expression\n"
            "assert Expression('event.data.n > 1').matches(event={'data': {'n': 2}})\n"
            "assert 'cel' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.asyncio
async def test_a_cron_schedule_keeps_one_timer_per_trigger_however_often_it_fires() -> None:
    app = devserver.App("crons")

    @app.function(trigger=[devserver.TriggerCron("* * * * *"),
                           devserver.TriggerCron("*/2 * * * *")])
    async def tick(ctx: devserver.Context) -> None:
        return None

    (fn,) = app.functions
    start = int(dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
    clock = VirtualClock(start)
    fired: list[tuple[str, int]] = []
    done = asyncio.Event()

    async def fire(fired_fn: FunctionDef, cron: CronTrigger, due: int) -> None:
        fired.append((cron.cron, (due - start) // 60_000))
        if len(fired) == 15:
            done.set()

    schedule = CronSchedule(clock, fire)
    schedule.arm([fn])
    assert schedule.armed == 2
    clock.advance(10 * 60_000)
    await asyncio.wait_for(done.wait(), 5)
    assert sorted(m for c, m in fired if c == "* * * * *") == list(range(1, 11))
    assert sorted(m for c, m in fired if c == "*/2 * * * *") == [2, 4, 6, 8, 10]
    assert schedule.armed == 2  # the next fire of each, not one per fire so far
    schedule.arm([])  # re-armed without the function: its schedules stop
    assert schedule.armed == 0
    clock.advance(10 * 60_000)
    await schedule.close()
    assert len(fired) == 15


@pytest.mark.asyncio
async def test_slots_hand_a_freed_slot_to_the_longest_waiting_and_skip_the_cancelled() -> None:
    slots = Slots(2)
    assert slots.take_now()
    assert slots.take_now()
    assert not slots.take_now()  # both taken
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.take()
        order.append(name)

    first, cancelled, last = (asyncio.create_task(wait(n)) for n in ("first", "gone", "last"))
    await asyncio.sleep(0)  # all three wait
    cancelled.cancel()
    slots.give()
    slots.give()
    await asyncio.gather(first, last)
    assert order == ["first", "last"]
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not slots.take_now()  # the two given back went to the two still waiting
    slots.give()
    assert slots.take_now()  # no one waits: a slot given back is free again
    assert not slots.take_now()

    # A slot handed to a waiter cancelled before it could run goes on, not lost.
    taker = asyncio.create_task(wait("late"))
    await asyncio.sleep(0)
    slots.give()  # handed to `taker`...
    taker.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await taker
    assert slots.take_now()
