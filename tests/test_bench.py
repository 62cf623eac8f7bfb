"""The benchmark's before-and-after mode (`--against`): another build's server beside this one."""

from __future__ import annotations

from pathlib import Path

import pytest

import devserver
from devserver.bench.run import main

CHECKOUT = Path(devserver.__file__).resolve().parent.parent


def test_against_a_folder_that_is_no_checkout_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--against", str(tmp_path)])
    assert exited.value.code == 2
    assert f"{tmp_path} is not a devserver checkout" in capsys.readouterr().err


@pytest.mark.slow
def test_against_a_checkout_measures_both_builds_side_by_side(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--short", "--against", str(CHECKOUT)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "this build / the build at --against" in line]
    assert [row.split(":")[0].split()[-1] for row in rows] == ["ingest", "end"], out
    for row in rows:
        ratio = float(row.split("--against")[1].split()[0])
        assert ratio > 0, row
    assert "ingest: devserver, stored durably" not in out  # --against alone: only the pair
