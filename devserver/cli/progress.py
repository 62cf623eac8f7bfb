"""Progress lines on stderr for long replays and preloads: one line a tenth, with the rate."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PROGRESS_ABOVE = 1000
"""Replays of more events than this print progress on stderr."""


class Progress:
    """Progress lines on stderr, one per tenth, for replays of more than PROGRESS_ABOVE events."""

    def __init__(self, verb: str, total: int, stream: TextIO | None = None) -> None:
        self.verb = verb
        self.total = total
        self.stream = stream
        self.started = time.monotonic()
        self._shown = 0

    def __call__(self, done: int, total: int) -> None:
        if total <= PROGRESS_ABOVE:
            return
        tenth = done * 10 // total
        if tenth > self._shown:
            self._shown = tenth
            rate = done / max(time.monotonic() - self.started, 1e-6)
            print(f"devserver: {self.verb} {done}/{total} events ({done * 100 // total}%, "
                  f"{rate:,.0f}/s)", file=self.stream or sys.stderr, flush=True)


def cumulative(groups: list[list[dict[str, Any]]]) -> list[tuple[int, list[dict[str, Any]]]]:
    done, out = 0, []
    for group in groups:
        done += len(group)
        out.append((done, group))
    return out
