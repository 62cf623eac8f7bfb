"""Logging for the command line: the format, the levels, and a cap on how long one line gets.

A function that logs megabytes in one call (a whole response body, a huge object's repr) would
otherwise fill the terminal and hold the event loop while it is written. Every record that
reaches the CLI's handler is cut to `MAX_LOG_CHARS` characters, with a note saying how much was
left out; the rest of the record (level, logger, traceback) is kept. Many ordinary lines pass
untouched. `print()` in user code writes to the process's stdout directly and is not touched.
"""

from __future__ import annotations

import logging

MAX_LOG_CHARS = 16 * 1024
"""The longest log message written, in characters; longer ones are cut with a note."""
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


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


def setup(level: str) -> None:
    """Log to stderr at `level` (a name such as "info"), lines capped at MAX_LOG_CHARS."""
    logging.basicConfig(level=level.upper(), format=FORMAT, datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, CapLength) for f in handler.filters):
            handler.addFilter(CapLength())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
