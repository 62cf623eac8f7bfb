"""The registered functions and the indexes that find them by event name.

A `Registry` answers which functions an event starts (name matched, filter expression passed),
which `cancel_on` triggers it fires and which function an `invoke` step means. It is rebuilt,
not edited, when functions are replaced (hot reload, an SDK app syncing again): a new set that
fails to register leaves the old one in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from devserver.app import CancelTrigger, FunctionDef
from devserver.errors import UserError
from devserver.model.events import IncomingEvent
from devserver.model.triggers import EventTrigger, TriggerIndex


def is_local(fn: FunctionDef) -> bool:
    """True for functions defined in Python with `@app.function` (not served by an SDK)."""
    return fn.remote is None


class Registry:
    """Functions by id, with their event triggers and `cancel_on` triggers indexed by name."""

    def __init__(self, functions: Iterable[FunctionDef] = ()) -> None:
        self._functions: dict[str, FunctionDef] = {}
        self._index: TriggerIndex[tuple[FunctionDef, EventTrigger]] = TriggerIndex()
        self._cancels: TriggerIndex[tuple[FunctionDef, CancelTrigger]] = TriggerIndex()
        self.add(functions)

    @property
    def functions(self) -> list[FunctionDef]:
        """Every registered function, in registration order."""
        return list(self._functions.values())

    def get(self, function_id: str) -> FunctionDef | None:
        """The function with this id, if registered."""
        return self._functions.get(function_id)

    def add(self, functions: Iterable[FunctionDef]) -> None:
        """Add functions; a function id registered twice is an error (and adds nothing)."""
        # Linear: one dict lookup per function (an SDK app may register thousands).
        fresh: dict[str, FunctionDef] = {}
        for fn in functions:
            known = self._functions.get(fn.id)
            if fn.id in fresh or (known is not None and known is not fn):
                raise UserError(f"two functions have the id {fn.id!r}")
            if known is fn:
                continue  # already registered: nothing to index again
            fresh[fn.id] = fn
        for fn in fresh.values():
            self._functions[fn.id] = fn
            triggers: list[EventTrigger] = []
            for trigger in fn.event_triggers:
                if trigger not in triggers:  # a function's own few triggers
                    triggers.append(trigger)
                    self._index.add(trigger, (fn, trigger), unique=True)
            cancels: list[CancelTrigger] = []
            for cancel in fn.cancel_on:
                if cancel not in cancels:
                    cancels.append(cancel)
                    self._cancels.add(cancel.event, (fn, cancel), unique=True)

    def replaced(self, functions: Iterable[FunctionDef],
                 scope: Callable[[FunctionDef], bool]) -> Registry:
        """A new registry: these functions instead of the ones `scope` selects; the others
        stay. Raises `UserError` (this registry unchanged) when the new set clashes."""
        return Registry([fn for fn in self._functions.values() if not scope(fn)]
                        + list(functions))

    def match(self, event: dict[str, Any]) -> list[FunctionDef]:
        """The functions an event starts (name matched, filter expression passed)."""
        found: list[FunctionDef] = []
        for fn, trigger in self._index.match(event["name"]):
            if fn not in found and trigger.accepts(event):
                found.append(fn)
        return found

    def match_incoming(self, ev: IncomingEvent, ts: int) -> list[FunctionDef]:
        """`match` for an event arriving at the event API, without building its document
        when no trigger for its name has an expression to evaluate."""
        candidates = self._index.match(ev.name)
        if not candidates:
            return []
        if all(trigger.expression is None for _, trigger in candidates):
            return list({fn.id: fn for fn, _ in candidates}.values())
        return self.match({"name": ev.name, "data": ev.data, "id": ev.id or "", "ts": ts,
                           "v": ev.v, "user": ev.user or {}})

    def triggered_by(self, name: str) -> bool:
        """True when some function's trigger matches events called `name`."""
        return bool(self._index.match(name))

    @property
    def cancels_anything(self) -> bool:
        """True when some function has a `cancel_on` trigger."""
        return bool(self._cancels)

    def cancels(self, name: str) -> list[tuple[FunctionDef, CancelTrigger]]:
        """The `cancel_on` triggers an event called `name` fires, with their functions."""
        return self._cancels.match(name)

    def resolve(self, ref: object) -> FunctionDef:
        """A registered function from its FunctionDef, its decorated handler or its id."""
        for fn in self._functions.values():
            if ref is fn or ref is fn.handler or ref == fn.id:
                return fn
        raise FunctionNotFound(ref)


class FunctionNotFound(UserError):
    """An invoke names no registered function. For an id, the message is the one Inngest
    resolves such an invoke with (the SDKs raise it into the function as it is)."""

    def __init__(self, ref: object) -> None:
        if isinstance(ref, str):
            message = f"could not find function with ID: {ref}"
        else:
            message = f"no registered function {getattr(ref, '__name__', ref)!r} to invoke"
        super().__init__(message)
