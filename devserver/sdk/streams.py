"""What durable endpoints stream while they run asynchronously, relayed to their callers.

A durable endpoint may stream (`stream.push`, `stream.pipe` in the TypeScript SDK) as SSE
events: `inngest.metadata`, `inngest.stream` (data), `inngest.commit` / `inngest.rollback`
(a step's data kept, or dropped because it will be retried), `inngest.response` (the
endpoint's result). In the synchronous request the SDK streams to its caller itself; once
the run is asynchronous, each call that continues it posts its stream to the server
(`/v1/realtime/publish/tee?channel=<run id>`), and the caller, redirected to
`/v1/realtime/sse?token=`, reads it there. A run's bytes are kept from its first post, so a
reader that connects late still gets all of it (the SDK's client follows rollbacks, so a
replay is safe), until the result event; then the reader's stream ends.

Bounded: at most `MAX_CHANNELS` runs' streams are kept (the oldest dropped first), each up
to `MAX_CHANNEL_BYTES` (more is dropped, with a warning).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from devserver.model.records import COMPLETED, RunRecord

log = logging.getLogger(__name__)

WAIT_S = 300.0
"""How long a reader (of a run's output or its stream) waits for the run to end: 5 minutes,
as Inngest's output endpoint does."""
MAX_CHANNELS = 256
MAX_CHANNEL_BYTES = 16 * 1024 * 1024
RESULT_EVENT = "inngest.response"


class _Channel:
    def __init__(self) -> None:
        self.data = bytearray()
        self.scanned = 0  # bytes already split into events
        self.answered_at: int | None = None  # end of the result event, once it came
        self.publishers = 0
        self.changed = asyncio.Event()
        self.truncated = False


class RunStreams:
    """The SSE bytes each asynchronous durable endpoint run has streamed, and their readers."""

    def __init__(self, *, wait_s: float = WAIT_S, max_channels: int = MAX_CHANNELS,
                 max_bytes: int = MAX_CHANNEL_BYTES) -> None:
        self.wait_s = wait_s
        self.max_channels = max_channels
        self.max_bytes = max_bytes
        self._channels: OrderedDict[str, _Channel] = OrderedDict()

    def _channel(self, run_id: str) -> _Channel:
        channel = self._channels.get(run_id)
        if channel is None:
            channel = self._channels[run_id] = _Channel()
            while len(self._channels) > self.max_channels:
                self._channels.popitem(last=False)
        return channel

    @contextlib.contextmanager
    def publishing(self, run_id: str) -> Iterator[None]:
        """While an SDK call posts its stream for the run."""
        channel = self._channel(run_id)
        channel.publishers += 1
        try:
            yield
        finally:
            channel.publishers -= 1
            _notify(channel)

    def publish(self, run_id: str, chunk: bytes) -> None:
        """Add bytes an SDK call streamed for the run."""
        channel = self._channel(run_id)
        if len(channel.data) + len(chunk) > self.max_bytes:
            if not channel.truncated:
                log.warning("run %s: its stream passed %d bytes; the rest is dropped",
                            run_id, self.max_bytes)
                channel.truncated = True
            return
        channel.data += chunk
        _scan(channel)
        _notify(channel)

    def open(self, run_id: str) -> bool:
        """Whether an SDK call is posting the run's stream now."""
        channel = self._channels.get(run_id)
        return channel is not None and channel.publishers > 0

    def read(self, run_id: str, offset: int) -> tuple[bytes, int, bool]:
        """The bytes after `offset` (up to the result event, if it came), the new offset,
        and whether the result event has been read."""
        channel = self._channels.get(run_id)
        if channel is None:
            return b"", offset, False
        end = channel.answered_at if channel.answered_at is not None else channel.scanned
        chunk = bytes(channel.data[offset:end]) if end > offset else b""
        new = max(offset, end)
        return chunk, new, channel.answered_at is not None and new >= channel.answered_at

    async def wait(self, run_id: str, timeout: float) -> None:
        """Until the run's stream changes, or `timeout` seconds."""
        channel = self._channel(run_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.changed.wait(), timeout)


def _notify(channel: _Channel) -> None:
    channel.changed.set()
    channel.changed = asyncio.Event()


def _scan(channel: _Channel) -> None:
    """Split new bytes into whole events (readers get whole events only); note the end of
    the result event."""
    while channel.answered_at is None:
        end = channel.data.find(b"\n\n", channel.scanned)
        if end < 0:
            return
        event = bytes(channel.data[channel.scanned:end])
        channel.scanned = end + 2
        if any(line.strip() == f"event: {RESULT_EVENT}".encode()
               for line in event.split(b"\n")):
            channel.answered_at = channel.scanned


def sse_event(name: str, data: Any) -> bytes:
    """One SSE event, its data as JSON."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def result_event(run: RunRecord) -> bytes:
    """The result event for a run that ended without the SDK streaming one (failed or
    cancelled by the server), or whose calls never streamed: from its stored outcome."""
    if run.status == COMPLETED:
        output = run.output if isinstance(run.output, dict) else {}
        body = output.get("body")
        headers = output.get("headers")
        status = output.get("status")
        return sse_event(RESULT_EVENT, {"status": "succeeded", "response": {
            "body": body if isinstance(body, str) else json.dumps(run.output),
            "headers": headers if isinstance(headers, dict) else {},
            "statusCode": status if type(status) is int else 200}})
    error = run.error or {"name": "Error", "message": f"run {run.run_id} {run.status.lower()}"}
    return sse_event(RESULT_EVENT, {"status": "failed", "response": {
        "body": json.dumps(error), "statusCode": 500,
        "headers": {"content-type": "application/json"}}})
