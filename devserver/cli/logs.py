"""Logging for the command line: the format, the levels, and a cap on how long one line gets.

A function that logs megabytes in one call (a whole response body, a huge object's repr) would
otherwise fill the terminal and hold the event loop while it is written. Every record that
reaches the CLI's handler is cut to `MAX_LOG_CHARS` characters, with a note saying how much was
left out; the rest of the record (level, logger, traceback) is kept. Many ordinary lines pass
untouched. `print()` in user code writes to the process's stdout directly and is not touched.
A warning or error repeated in a burst (out of file descriptors, every `accept()` fails and
asyncio logs each one with a traceback) is written once per `RATE_LIMIT_SECONDS`, with a count of
the ones left out (`RateLimit`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

MAX_LOG_CHARS = 16 * 1024
"""The longest log message written, in characters; longer ones are cut with a note."""
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
RATE_LIMIT_SECONDS = 10.0
"""Seconds after a warning or error during which the same kind again is counted, not logged."""
MAX_KINDS = 1000
_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+(?:\.\d+)?")


class CapLength(logging.Filter):
    """Cuts a record's message to `limit` characters (a handler filter: sees every record)."""

    def __init__(self, limit: int = MAX_LOG_CHARS) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; shortens its message when needed."""
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: let the handler report it
            return True
        if len(message) > self.limit:
            record.msg = (f"{message[:self.limit]} … [log line cut: "
                          f"{len(message) - self.limit:,} more characters]")
            record.args = None
        return True


RUNS_LOGGER = "devserver.runs"
"""The line per failed run (devserver.runtime.runlog): each about a run of its own, never
rate-limited."""
USER_LOGGERS = "devserver.functions."
"""The loggers of `ctx.logger` (one a function): never rate-limited."""
OUR_LOGGERS = ("devserver", "asyncio", "aiohttp", "aiosqlite")
"""The loggers whose floods are ours to bound: devserver's own and the libraries it runs on.
What any other logger (the user's code and its libraries) writes passes untouched."""


class RateLimit(logging.Filter):
    """Lets through at most one warning or error of a kind per `interval` seconds (a handler
    filter). A kind is the logger, the level, the message's format string and the exception's
    type and errno: out of descriptors (EMFILE), asyncio reports every failed `accept()`, which
    would otherwise write megabytes a second. The first record of a kind after a quiet spell
    passes; the next one that passes says how many like it were left out. Info and debug lines
    always pass, and so does every line of user code (`ctx.logger`, and any logger not
    devserver's or its libraries')."""

    def __init__(self, interval: float = RATE_LIMIT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._kinds: dict[tuple[Any, ...], list[float]] = {}  # kind -> [last passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat within the interval; notes the count on the next one let out."""
        if (record.levelno < logging.WARNING or record.name.startswith(USER_LOGGERS)
                or record.name == RUNS_LOGGER or not record.name.startswith(OUR_LOGGERS)):
            return True  # what user code logs is theirs to read, every line
        exc = record.exc_info[1] if record.exc_info else None
        # The format string's first line without numbers: asyncio's reports of a failing
        # callback differ only in the handle's addresses and times.
        head = _NUMBERS.sub("#", str(record.msg).partition("\n")[0][:200])
        kind = (record.name, record.levelno, head, type(exc).__name__,
                getattr(exc, "errno", None))
        now = self.clock()
        seen = self._kinds.get(kind)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        if len(self._kinds) >= MAX_KINDS:
            self._kinds.clear()  # a bounded memory of kinds: forgetting one only lets it pass
        dropped = int(seen[1]) if seen is not None else 0
        self._kinds[kind] = [now, 0]
        if dropped:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string: let the handler report it
                return True
            record.msg = (f"{message} [{dropped:,} more like this in the last "
                          f"{now - seen[0]:.0f} s were not logged]") if seen else message
            record.args = None
        return True


def setup(level: str) -> None:
    """Log to stderr at `level` (a name such as "info"), lines capped at MAX_LOG_CHARS,
    repeated warnings and errors rate-limited."""
    logging.basicConfig(level=level.upper(), format=FORMAT, datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        if type(handler) is not logging.StreamHandler:
            continue  # not the terminal handler basicConfig made (e.g. a test runner's capture)
        if not any(isinstance(f, RateLimit) for f in handler.filters):
            handler.addFilter(RateLimit())
        if not any(isinstance(f, CapLength) for f in handler.filters):
            handler.addFilter(CapLength())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
