"""The README's examples work as written: its app and its example test file pass under pytest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs pytest in a subprocess

pytest_plugins = ["pytester"]
README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(starting_with: str) -> str:
    """The README's ```python block whose first line is `starting_with`."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(starting_with):
            return str(block)
    raise AssertionError(f"README has no python block starting with {starting_with!r}")


def test_the_readme_example_test_file_passes_as_written(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(support_bot=python_block("# support_bot.py"))
    pytester.makepyfile(test_support_bot=python_block("# test_support_bot.py"))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "error",
        "-o", "asyncio_default_fixture_loop_scope=function")
    result.assert_outcomes(passed=2)
