"""Bounds that keep misbehaving user code from taking the server down with it (SPEC 8,
README "Safety"): how many restarts a run may survive without progress, and how many runs one
tree of runs may hold."""

from __future__ import annotations

MAX_RESTARTS = 3
"""Starts of the server a run may be executing at without showing progress (a step committed,
a wait begun, a retry recorded): a run whose attempt ends the process (`os._exit`, a crash, a
kill) is failed at the start after the third, instead of ending every restart."""

MAX_TREE_RUNS = 10_000
"""Runs one tree of runs may hold besides its first: the runs a run starts with `send_event`
or `invoke`, the runs those start, and so on. An app that fans out this far locally is a loop
that sends its own trigger; the step that would exceed it fails without retrying."""

SAFETY_DOCS = 'README "Safety"'


def restarts_message(restarts: int) -> str:
    """The error of a run failed because the process ended while it executed."""
    return (f"the server process ended {restarts} times while this run was executing "
            "(os._exit, a crash or a kill) without the run making progress; failed so that "
            f"it cannot stop every restart (see {SAFETY_DOCS})")


class RunTreeTooLarge(Exception):
    """Starting more runs would make a tree of runs larger than its bound."""

    def __init__(self, root: str, runs: int, bound: int) -> None:
        super().__init__(
            f"this step would start run number {runs:,} of the tree of runs begun by run "
            f"{root} (runs started by send_event or invoke, and the runs those start); at "
            f"most {bound:,} are allowed, so a function that sends its own trigger can't fan "
            f"out without end (see {SAFETY_DOCS})")
        self.root = root
        self.runs = runs
        self.bound = bound

    def lifecycle_message(self, run_id: str) -> str:
        """Why the lifecycle events of `run_id`'s end start no runs."""
        return (f"run {run_id} ended, but the runs its lifecycle events (inngest/function.*) "
                f"would start make {self.runs:,} runs in the tree begun by run {self.root}, "
                f"past the bound of {self.bound:,}: the events are stored and start nothing "
                f"(see {SAFETY_DOCS})")
