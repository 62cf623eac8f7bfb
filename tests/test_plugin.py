"""The pytest plugin as users get it: a separate project's test file, run by pytest in a
subprocess with only the installed package (sync and async tests, sleeps, failures, replay)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

APP = textwrap.dedent(
    """
    import devserver

    app = devserver.App("shop")


    @app.function(trigger="shop/order.created", retries=1)
    async def fulfil(ctx):
        await ctx.step.run("reserve", lambda: {"sku": ctx.event.data["sku"]})
        await ctx.step.sleep("ship-tomorrow", "1d")
        if ctx.event.data.get("sku") == "broken":
            raise RuntimeError("warehouse on fire")
        return {"shipped": ctx.event.data["sku"]}


    @app.function(trigger="shop/ping")
    def ping(ctx):
        return ctx.step.run("pong", lambda: "pong")
    """
)

TESTS = textwrap.dedent(
    """
    import os

    import pytest

    FIXTURE = os.path.join(os.path.dirname(__file__), "orders.jsonl")


    def test_sync_sleeping_function_finishes_at_once(devserver):
        devserver.send({"name": "shop/order.created", "data": {"sku": "A1"},
                        "sessions": {"customer_id": "c1"}})
        devserver.wait_idle()
        (run,) = devserver.runs(function="shop-fulfil")
        assert run.status == "Completed"
        assert run.output == {"shipped": "A1"}
        figures = devserver.session("customer_id", "c1")
        assert (figures.runs, figures.failed_runs, figures.failure_rate) == (1, 0, 0.0)
        assert figures.functions == ["shop-fulfil"]


    @pytest.mark.asyncio
    async def test_async_test_uses_the_async_twins(devserver):
        await devserver.send_async({"name": "shop/ping", "sessions": {"customer_id": 7}})
        await devserver.wait_idle_async()
        runs = await devserver.runs_async(session=("customer_id", "7"))
        assert [r.output for r in runs] == ["pong"]


    def test_unexpected_failure_raises_with_the_timeline(devserver):
        devserver.send({"name": "shop/order.created", "data": {"sku": "broken"},
                        "sessions": {"customer_id": "c2"}})
        with pytest.raises(AssertionError) as failure:
            devserver.wait_idle()
        message = str(failure.value)
        assert "session customer_id='c2'" in message
        assert "warehouse on fire" in message
        assert "Traceback" in message
        assert "attempt 1: Failed" in message  # attempts numbered from 1, as the dashboard does
        assert "attempt 0" not in message


    @pytest.mark.devserver(raise_on_failure=False)
    def test_expected_failures_and_replayed_fixtures(devserver):
        ids = devserver.replay(FIXTURE)
        assert len(ids) == 3
        devserver.wait_idle()
        assert devserver.session("customer_id", "c3").failed_runs == 1
        assert devserver.session("customer_id", "c4").runs == 2


    def test_advance_moves_virtual_time_by_hand(devserver):
        start = devserver.now
        devserver.send({"name": "shop/order.created", "data": {"sku": "B2"}})
        devserver.advance("2h")
        (run,) = devserver.runs()
        assert run.status == "Running"  # still asleep: only two hours passed
        devserver.advance("1d")
        assert devserver.runs()[0].status == "Completed"
        assert (devserver.now - start).total_seconds() >= 26 * 3600


    def test_each_test_has_its_own_server(devserver):
        assert devserver.runs() == []
        with devserver.inngest_env() as url:
            assert os.environ["INNGEST_DEV"] == url == devserver.url
        assert os.environ.get("INNGEST_DEV") != devserver.url


    def test_bad_events_are_refused_like_the_event_api(devserver):
        with pytest.raises(Exception, match="reserved"):
            devserver.send({"name": "inngest/x"})
    """
)

FIXTURE = "\n".join([
    '{"name": "shop/order.created", "data": {"sku": "broken"}, "sessions": {"customer_id": "c3"}}',
    '{"name": "shop/order.created", "data": {"sku": "C3"}, "sessions": {"customer_id": "c4"}}',
    '{"name": "shop/ping", "sessions": {"customer_id": "c4"}}',
]) + "\n"


@pytest.mark.slow
def test_a_user_project_gets_a_working_fixture(pytester: pytest.Pytester) -> None:
    pytester.makefile(".py", shop_app=APP)
    pytester.makefile(".py", test_shop=TESTS)
    pytester.makefile(".jsonl", orders=FIXTURE)
    pytester.makeini(textwrap.dedent(
        """
        [pytest]
        devserver_apps = shop_app:app
        asyncio_mode = strict
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        """
    ))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=7)


@pytest.mark.slow
def test_marker_options_are_checked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.devserver(colour="blue")
        def test_x(devserver):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*unknown option(s)*colour*"])


def test_a_fixture_with_a_bad_line_names_file_and_line(tmp_path: Path) -> None:
    from devserver.cli.replay import read_events
    from devserver.errors import UserError

    path = tmp_path / "bad.jsonl"
    path.write_text('{"name": "ok"}\n\n{"name": ""}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: name"):
        read_events(path)
