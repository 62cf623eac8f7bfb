"""Trigger matching: which registered functions an event name starts.

Pure logic. A trigger is an exact event name or a wildcard whose last segment is `*` after a `/`
or a `.` (`app/*`, `app/user.*`), as in Inngest. Matching an event costs one dict lookup plus one
check per distinct wildcard prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EventTrigger:
    """Runs a function on events named `event` (possibly a wildcard)."""

    event: str

    @property
    def prefix(self) -> str | None:
        """For a wildcard, the prefix an event name must start with; None for an exact name."""
        return self.event[:-1] if self.event.endswith(("/*", ".*")) else None


def parse_event_trigger(event: str) -> EventTrigger:
    """Validate a trigger's event pattern; raise `UserError` saying what is wrong."""
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
    return EventTrigger(event)


class TriggerIndex(Generic[T]):
    """Maps event names to the items (functions) whose triggers match them."""

    def __init__(self, entries: Iterable[tuple[EventTrigger, T]] = ()) -> None:
        self._exact: dict[str, list[T]] = {}
        self._wildcards: dict[str, list[T]] = {}
        for trigger, item in entries:
            self.add(trigger, item)

    def add(self, trigger: EventTrigger, item: T) -> None:
        """Register `item` under `trigger`."""
        prefix = trigger.prefix
        table = self._exact if prefix is None else self._wildcards
        key = trigger.event if prefix is None else prefix
        bucket = table.setdefault(key, [])
        if item not in bucket:
            bucket.append(item)

    def match(self, name: str) -> list[T]:
        """The items triggered by an event called `name`, each once, in registration order."""
        found = list(self._exact.get(name, ()))
        for prefix, items in self._wildcards.items():
            if name.startswith(prefix):
                found.extend(item for item in items if item not in found)
        return found
