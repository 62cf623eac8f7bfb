"""Expressions over events, in CEL as Inngest writes them: trigger filters, `cancel_on` and
`wait_for_event` conditions (`event` is the run's trigger, `async` the incoming event).

Compiled once (syntax errors are user errors, raised at registration) and evaluated with plain
dicts. As in Inngest, an expression that fails to evaluate (a missing field, a type mismatch)
does not match; it never raises into the runtime.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from devserver.errors import UserError

log = logging.getLogger(__name__)


class Expression:
    """A compiled CEL expression whose result is taken as a yes/no answer."""

    __slots__ = ("_program", "source")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise UserError(f"expression must be a non-empty string, got {source!r}")
        # Imported on first use: the `cel` package loads its command line (rich,
        # prompt_toolkit) on import, a sixth of devserver's start-up, and most apps
        # have no expression at all.
        import cel

        try:
            self._program = cel.compile(source)
        except ValueError as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else "syntax error"
            raise UserError(f"invalid expression {source!r}: {first_line}") from None
        self.source = source

    def matches(self, **variables: Any) -> bool:
        """True only when the expression evaluates to `true` with these variables."""
        try:
            return self._program.execute(variables) is True
        except Exception as exc:  # noqa: BLE001 - the CEL runtime raises several types
            log.debug("expression %r did not evaluate: %s", self.source, exc)
            return False

    def value(self, **variables: Any) -> Any:
        """The expression's value with these variables (a key, a priority); None when it
        does not evaluate."""
        try:
            return self._program.execute(variables)
        except Exception as exc:  # noqa: BLE001 - the CEL runtime raises several types
            log.debug("expression %r did not evaluate: %s", self.source, exc)
            return None

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


@functools.lru_cache(maxsize=1024)
def compile_expression(source: str) -> Expression:
    """A cached compiled expression (wait conditions are compiled again on every resume)."""
    return Expression(source)
