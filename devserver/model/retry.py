"""Retry policy: how many attempts a function gets and how long to wait between them.

Pure logic, no I/O. The default is Inngest's backoff table with jitter; `FixedBackoff` is what
`--retry-interval SECONDS` selects (0 retries at once).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_RETRIES = 4
"""Inngest's default: 4 retries, so 5 attempts in all."""

INNGEST_BACKOFF_SECONDS = (15, 30, 60, 120, 300, 600, 1200, 2400, 3600, 7200)
MAX_JITTER_SECONDS = 30.0


class Backoff(Protocol):
    """Delay before the next attempt."""

    def delay_ms(self, attempt: int) -> int:
        """Milliseconds to wait after 0-based attempt `attempt` failed."""


@dataclass(frozen=True)
class InngestBackoff:
    """Inngest's table (15 s, 30 s, 1 m, ... 2 h, then 2 h) plus up to 30 s of random jitter."""

    jitter_seconds: float = MAX_JITTER_SECONDS
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay_ms(self, attempt: int) -> int:
        """Delay from the table for this attempt, with jitter."""
        base = INNGEST_BACKOFF_SECONDS[min(max(attempt, 0), len(INNGEST_BACKOFF_SECONDS) - 1)]
        return int((base + self.rng.uniform(0, self.jitter_seconds)) * 1000)


@dataclass(frozen=True)
class FixedBackoff:
    """The same delay after every failure (`--retry-interval`)."""

    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError("retry interval must be zero or more seconds")

    def delay_ms(self, attempt: int) -> int:
        """The fixed delay."""
        return int(self.seconds * 1000)


def max_attempts(retries: int) -> int:
    """Attempts in all for a function configured with `retries` retries."""
    return retries + 1
