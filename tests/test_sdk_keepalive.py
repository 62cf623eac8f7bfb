"""A call on a pooled connection that the app closed while it sat idle (uvicorn closes idle
ones after its keep-alive timeout) is sent once more on a fresh connection; no other failure
is.

The app here is a raw TCP server on 127.0.0.1 (the OS boundary), so each test decides exactly
when a connection closes: after the request arrived on a reused connection and before a byte
of the answer, which is the race a real keep-alive timeout only sometimes loses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from devserver.clock import VirtualClock
from devserver.sdk.executor import SdkExecutor
from devserver.sdk.protocol import Reply, SdkError

pytestmark = pytest.mark.asyncio
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Inngest-SDK: py:v0.5.19\r\n"
          b"Content-Length: 2\r\n\r\n42")

PARTIAL = b"HTTP/1.1 200 OK\r\nX-Inngest-SDK: py:v0.5.19\r\n"
"""The start of an answer, after which the app closes the connection."""

Behaviour = Callable[[int, int], bytes | None]
"""What the app does with request n (0-based) on connection c (0-based): the bytes to answer
(closing the connection after them unless they are a whole `ANSWER`), or None to close it
without a byte."""


class RawApp:
    """An HTTP/1.1 app on a raw socket: reads each request, then answers or closes as told."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[tuple[int, int, dict[str, str]]] = []  # (connection, n, headers)
        self._connections = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/api/inngest?fnId=app-fn&stepId=step"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = self._connections
        self._connections += 1
        try:
            for n in range(100):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")[1:]
                headers = {k.lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines if line)}
                await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((connection, n, headers))
                answer = self.behaviour(connection, n)
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
                if answer != ANSWER:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_app(behaviour: Behaviour) -> AsyncIterator[RawApp]:
    app = RawApp(behaviour)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def executor() -> AsyncIterator[SdkExecutor]:
    sdk = SdkExecutor(VirtualClock())
    await sdk.open()
    try:
        yield sdk
    finally:
        await sdk.close()


def invocation() -> Any:
    """What a call reads of an invocation."""
    return SimpleNamespace(events=[], memo={}, run_id="01RUN", attempt=0,
                           function=SimpleNamespace(max_attempts=1, id="app-fn", endpoint=False))


async def call(sdk: SdkExecutor, url: str) -> Reply:
    """One discovery call of a fresh invocation."""
    return await sdk.call(invocation(), url, "step", attempt=0,
                          force_plan=False, call_id="C")


async def test_a_reused_connection_closed_before_any_answer_is_called_again() -> None:
    def behaviour(connection: int, n: int) -> bytes | None:
        return None if (connection, n) == (0, 1) else ANSWER  # the 2nd call on the 1st one

    async with raw_app(behaviour) as app, executor() as sdk:
        first = await call(sdk, app.url)
        again = await call(sdk, app.url)
        assert (first.output, again.output) == (42, 42)
        assert [(c, n) for c, n, _ in app.requests] == [(0, 0), (0, 1), (1, 0)]
        # The same call again, as a new request (its own request id, the same job id).
        sent, resent = app.requests[1][2], app.requests[2][2]
        assert sent["x-request-id"] != resent["x-request-id"]
        assert sent["x-inngest-job-id"] == resent["x-inngest-job-id"] == "01RUN:step"


async def test_a_fresh_connection_closed_before_an_answer_fails_the_attempt() -> None:
    async with raw_app(lambda connection, n: None) as app, executor() as sdk:
        with pytest.raises(SdkError) as failed:
            await call(sdk, app.url)
        assert failed.value.error["name"] == "SdkUnreachableError"
        assert len(app.requests) == 1  # not sent again


async def test_a_reused_connection_closed_mid_answer_is_not_called_again() -> None:
    def behaviour(connection: int, n: int) -> bytes | None:
        return ANSWER if n == 0 else PARTIAL  # the app began answering: it got the request

    async with raw_app(behaviour) as app, executor() as sdk:
        await call(sdk, app.url)
        with pytest.raises(SdkError) as failed:
            await call(sdk, app.url)
        assert failed.value.error["name"] == "SdkUnreachableError"
        assert [(c, n) for c, n, _ in app.requests] == [(0, 0), (0, 1)]  # not sent again
