"""Triggers: which registered functions an event starts, and when cron functions fire.

Pure logic. An event trigger is an exact event name or a wildcard whose last segment is `*` after
a `/` or a `.` (`app/*`, `app/user.*`), as in Inngest, optionally with a CEL filter expression.
Matching an event name costs one dict lookup plus one check per distinct wildcard prefix.
A cron trigger is a cron expression, optionally prefixed with `TZ=<zone> ` as Inngest allows.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cronsim import CronSim, CronSimError

from devserver.errors import UserError
from devserver.model.expressions import Expression

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EventTrigger:
    """Runs a function on events named `event` (possibly a wildcard) that pass `expression`."""

    event: str
    expression: Expression | None = None

    def describe(self) -> str:
        """For banners and pages: `app/*` or `app/* if event.data.x == 1`."""
        if self.expression is None:
            return self.event
        return f"{self.event} if {self.expression.source}"

    def doc(self) -> dict[str, str]:
        """Inngest's JSON shape of a trigger: `{"event", "expression"?}`."""
        if self.expression is None:
            return {"event": self.event}
        return {"event": self.event, "expression": self.expression.source}

    def accepts(self, event: dict[str, Any]) -> bool:
        """Whether an event whose name matched passes this trigger's filter."""
        return self.expression is None or self.expression.matches(event=event)

    @property
    def prefix(self) -> str | None:
        """For a wildcard, the prefix an event name must start with; None for an exact name."""
        return self.event[:-1] if self.event.endswith(("/*", ".*")) else None


def parse_event_trigger(event: str, expression: str | None = None) -> EventTrigger:
    """Validate a trigger's event pattern and filter; raise `UserError` saying what is wrong."""
    if not isinstance(event, str) or not event.strip():
        raise UserError(f"trigger event must be a non-empty string, got {event!r}")
    body = event[:-2] if event.endswith(("/*", ".*")) else event
    if "*" in body:
        raise UserError(
            f"trigger {event!r}: a wildcard is only allowed as the last segment "
            "after '/' or '.', as in 'app/*' or 'app/user.*'"
        )
    if not body:
        raise UserError(f"trigger {event!r} has nothing before its wildcard")
    return EventTrigger(event, None if expression is None else Expression(expression))


@dataclass(frozen=True, slots=True)
class CronTrigger:
    """Runs a function on a schedule."""

    cron: str

    def __post_init__(self) -> None:
        self.next_after(0)  # validates

    def describe(self) -> str:
        """For banners and pages: `cron 0 9 * * *`."""
        return f"cron {self.cron}"

    def doc(self) -> dict[str, str]:
        """Inngest's JSON shape of a trigger: `{"cron"}`."""
        return {"cron": self.cron}

    def _split(self) -> tuple[str, dt.tzinfo]:
        text = self.cron.strip()
        if text.startswith(("TZ=", "CRON_TZ=")):
            zone, _, text = text.partition("=")[2].partition(" ")
            try:
                return text.strip(), zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise UserError(f"cron {self.cron!r}: unknown time zone {zone!r}") from None
        return text, dt.UTC

    def next_after(self, ms: int) -> int:
        """The first firing time strictly after `ms` (ms since the epoch)."""
        expr, tz = self._split()
        start = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).astimezone(tz)
        try:
            fire = next(iter(CronSim(expr, start)))
        except (CronSimError, StopIteration) as exc:
            raise UserError(f"invalid cron expression {self.cron!r}: {exc}") from None
        return int(fire.timestamp() * 1000)


class TriggerIndex(Generic[T]):
    """Maps event names to the items (functions) whose triggers match them."""

    def __init__(self, entries: Iterable[tuple[EventTrigger, T]] = ()) -> None:
        self._exact: dict[str, list[T]] = {}
        self._wildcards: dict[str, list[T]] = {}
        for trigger, item in entries:
            self.add(trigger, item)

    def add(self, trigger: EventTrigger, item: T, *, unique: bool = False) -> None:
        """Register `item` under `trigger`; `unique=True` when the caller knows it is not there
        yet (skips a scan of the name's bucket: registering thousands stays linear)."""
        prefix = trigger.prefix
        table = self._exact if prefix is None else self._wildcards
        key = trigger.event if prefix is None else prefix
        bucket = table.setdefault(key, [])
        if unique or item not in bucket:
            bucket.append(item)

    def __bool__(self) -> bool:
        return bool(self._exact or self._wildcards)

    def match(self, name: str) -> list[T]:
        """The items triggered by an event called `name`, each once, in registration order."""
        found = list(self._exact.get(name, ()))
        for prefix, items in self._wildcards.items():
            if name.startswith(prefix):
                found.extend(item for item in items if item not in found)
        return found
