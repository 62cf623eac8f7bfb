"""Before and after: this build's ingest and end-to-end rates against another build's, side by
side in one run.

    python -m devserver.bench --against ../devserver-before      # a checkout of another build

The other build is a checkout (its root holds `devserver/`); its server runs from that folder,
with it first on the import path, against its own new database. The two servers are measured in
alternating rounds with the same workload and load generator as the other rows, and each row is
the median of the rounds' ratios, this build's over the other's (above 1: this build is faster).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from devserver.bench.workload import SINGLE, load


def checkout(path: str) -> Path:
    """The root of another build's checkout; `ValueError` if it holds no devserver package."""
    root = Path(path).resolve()
    if not (root / "devserver" / "__main__.py").is_file():
        raise ValueError(f"{root} is not a devserver checkout (no devserver/__main__.py)")
    return root


def build_env(root: Path) -> dict[str, str]:
    """The environment that makes `python -m devserver` import the build at `root`."""
    paths = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def ingest_rate(url: str, seconds: float) -> Callable[[], float]:
    """One round of the ingest row against the server at `url`: events acknowledged a second."""
    return lambda: load(url + "/e/key", SINGLE, seconds)


def e2e_rate(url: str, seconds: float, counts: Callable[[], tuple[int, int]],
             idle: Callable[[], None]) -> Callable[[], float]:
    """One round of the end-to-end row: runs finished a second, counting the drain after the
    load (`counts` reads the server's runs and failed runs, `idle` waits until it has none
    left to do)."""
    def round_() -> float:
        start, before = time.perf_counter(), counts()[0]
        load(url + "/e/key", SINGLE, seconds)
        idle()
        return (counts()[0] - before) / (time.perf_counter() - start)
    return round_
