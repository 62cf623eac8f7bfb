"""Runs of Inngest SDK functions: one invocation of a run, driven through the SDK call protocol.

The SDK app holds the code; this server holds the state. Each call sends the run's event and
the memo of finished steps (keyed by hashed step ids) to the function's URL; the app runs the
function from the top, replays the memo, and answers 200 with the function's output or 206
with what it wants next: a step's result to commit (`StepRun`), a step error (`StepError`,
`StepFailed`), steps to run (`StepPlanned`: a call each, all at once; which calls are made
when is `sdk.calls`'s), or something to wait for (`Sleep`, `WaitForEvent`, `InvokeFunction`).
Every step kind is committed through `Invocation`, the same durable logic local functions
use, so SDK runs are recorded, retried, woken and shown exactly like local ones. Errors
leave as the exceptions the runner already understands: `Reschedule` to wait, `SdkError`
(retried), `SdkNonRetriableError`, `SdkRetryAfterError`; the error body the app sent is kept
verbatim.

A durable endpoint's run (`FunctionDef.endpoint`) is continued the same way, except that
each call is the request that started the run, made again with the headers that tell the SDK
it comes from the server (`devserver.sdk.endpoint_calls`).

Each call carries Inngest's call headers (`x-request-id`, `x-inngest-job-id`, `x-run-id`). A
call that went out on a pooled connection the app had just closed while idle (uvicorn does
after its keep-alive timeout) is sent once more on a fresh one: nothing reached the app, so it
is not a failed attempt. Any other failure to get an answer is.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
from types import SimpleNamespace
from typing import Any

import aiohttp

from devserver import __version__
from devserver.app import NonRetriableError, StepError
from devserver.clock import Clock
from devserver.errors import Reschedule, UserError
from devserver.ids import new_ulid
from devserver.model.failures import stored_error
from devserver.model.lifecycle import DEFER_KIND
from devserver.model.metadata import op_metadata
from devserver.runtime.invocation import Invocation
from devserver.sdk.callbody import encode_call, function_uuid
from devserver.sdk.calls import CallPlan, earliest
from devserver.sdk.endpoint_calls import endpoint_request
from devserver.sdk.gateway import gateway_request, perform
from devserver.sdk.protocol import (
    OP_DEFER_ADD,
    OP_SLEEP,
    OP_STEP_ERROR,
    OP_STEP_FAILED,
    OP_STEP_RUN,
    OP_WAIT_FOR_EVENT,
    Op,
    ProtocolError,
    Reply,
    SdkError,
    SdkNonRetriableError,
    call_headers,
    call_url,
    error_doc,
    read_reply,
    sdk_error,
    sleep_until_ms,
    step_uid,
    timeout_seconds,
)

log = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT = 900.0
"""Seconds one call may take (the app runs a whole step within it)."""
CONNECT_TIMEOUT = 10.0
MAX_REPLY_BYTES = 64 * 1024 * 1024
"""The largest reply body read from an SDK app (64 MiB: more than any memo Inngest allows,
4 MiB per step output and 32 MiB per run); checked while reading, so a reply claiming or
streaming gigabytes fails its attempt instead of filling memory."""
READ_CHUNK = 256 * 1024
MAX_FORCED = 10_000
"""Paused runs whose ForceStepPlan flag is remembered (see `SdkExecutor._forced`)."""
USER_AGENT = f"devserver/{__version__}"


class SdkExecutor:
    """Executes invocations of SDK functions (`FunctionDef.remote`) for the runner."""

    def __init__(self, clock: Clock, *, call_timeout: float = DEFAULT_CALL_TIMEOUT,
                 max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.clock = clock
        self.call_timeout = call_timeout
        self.max_reply_bytes = max_reply_bytes
        self._session: aiohttp.ClientSession | None = None
        self._plans: dict[str, CallPlan] = {}  # the invocations being driven, by run id
        self._forced: dict[str, bool] = {}
        """Runs that paused (a sleep, a wait, a retry) with Inngest's ForceStepPlan on: their
        next invocation's calls carry `disable_immediate_execution` too. In memory only
        (after a restart the SDK may run a step at once, which changes no outcome) and
        bounded (MAX_FORCED runs, oldest forgotten first)."""

    async def open(self) -> None:
        """Open the HTTP client."""
        timeout = aiohttp.ClientTimeout(total=self.call_timeout, connect=CONNECT_TIMEOUT)
        self._session = aiohttp.ClientSession(timeout=timeout,
                                              trace_configs=[_trace_config()])

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, inv: Invocation) -> Any:
        """Drive one invocation: returns the function's output, or raises what the runner
        handles (`Reschedule`, an `SdkError`)."""
        url = inv.function.remote
        assert url is not None
        await self._settle(inv)
        plan = CallPlan(self, inv, url, force=self._forced.pop(inv.run_id, False))
        self._plans[inv.run_id] = plan
        try:
            return await plan.run()
        except Reschedule:
            if plan.force:
                self._forced[inv.run_id] = True
                if len(self._forced) > MAX_FORCED:
                    del self._forced[next(iter(self._forced))]
            raise
        finally:
            if self._plans.get(inv.run_id) is plan:
                del self._plans[inv.run_id]

    async def checkpoint(self, run_id: str, call_id: str, ops: list[Op]) -> bool:
        """Commit steps an SDK checkpointed during call `call_id` (`ctx.qi_id`) of a run
        (TypeScript's checkpointing: it runs steps one after another within one call and
        reports each as it is done). False when no such call is in flight: a stale
        dispatch, which the SDK stops at (`409`)."""
        plan = self._plans.get(run_id)
        return plan is not None and await plan.checkpoint(call_id, ops)

    @staticmethod
    def will_retry(inv: Invocation, op: Op, reply: Reply) -> bool:
        """Whether a step error leaves the step attempts (so the run is rescheduled)."""
        if op.op not in (OP_STEP_ERROR, OP_STEP_FAILED) or step_uid(op) in inv.memo:
            return False
        final = op.op == OP_STEP_FAILED or reply.no_retry
        return not final and inv.can_retry(sdk_error({}, no_retry=False,
                                                     retry_at_ms=reply.retry_at_ms))

    async def record_retries(self, inv: Invocation,
                              retries: list[tuple[Op, Reply, int, int]]) -> list[int | None]:
        """Record step errors that will be retried; returns when to retry them."""
        due: list[int | None] = []
        for op, reply, started, attempt in retries:
            inv.attempt = attempt
            try:
                await self.apply(inv, op, reply, started)
            except Reschedule as retry:
                due.append(retry.at_ms)
        retries.clear()
        return due

    async def _settle(self, inv: Invocation) -> None:
        """Check what the run waits for before calling the app: nothing to do while it waits."""
        waits: list[int | None] = []
        for uid in list(inv.pending):
            try:
                await inv.settle(uid)
            except Reschedule as wait:
                waits.append(wait.at_ms)
            except StepError:
                pass  # a failed invoke, now memoized: the app raises it in the function
        if waits and inv.attempt == 0:
            raise Reschedule(earliest(waits))
        # A step retry is pending beside the waits (parallel steps): call the app, which
        # runs the step again and reports the waits, still pending, once more.

    async def apply(self, inv: Invocation, op: Op, reply: Reply, started: int) -> None:
        """Commit what one opcode reports, through the durable logic of its step kind."""
        uid = step_uid(op)
        if op.op == OP_STEP_RUN:
            if uid not in inv.memo:
                await inv.step_succeeded(uid, op.data, started)
        elif op.op in (OP_STEP_ERROR, OP_STEP_FAILED):
            if uid in inv.memo:
                return
            final = op.op == OP_STEP_FAILED or reply.no_retry
            error = error_doc(op.error, f"step {uid!r} failed")
            try:
                await inv.step_failed(uid, sdk_error(error, no_retry=final,
                                                     retry_at_ms=reply.retry_at_ms), started)
            except StepError:
                pass  # spent: memoized as an error, which the app raises in the function
        else:
            raise SdkNonRetriableError(stored_error(
                "UnsupportedStepError", f"step {uid!r} uses {op.op}, which devserver does not "
                "support (supported: step.run, sleep, waitForEvent, invoke, sendEvent)"))

    async def record_metadata(self, inv: Invocation, ops: list[Op]) -> None:
        """Store the metadata the SDK wrote inside steps, which rides along their opcodes."""
        updates = [update for op in ops if op.metadata
                   for update in op_metadata(op.metadata, step_uid(op), inv.attempt)]
        if updates:
            await inv.store.add_metadata(inv.run_id, updates, self.clock.now_ms())

    async def defer(self, inv: Invocation, op: Op, started: int) -> None:
        """`defer()` (TypeScript): `DeferAdd` records a run to start when this one ends (an
        `inngest/deferred.schedule` event for the deferred function `opts.fn_slug`, its data
        `opts.input`); `DeferAbort` takes back the one `opts.target_hashed_id` names. Both
        ride along other opcodes and need no answer: the next call lists the run's defers."""
        if op.op == OP_DEFER_ADD:
            uid = step_uid(op)
            if uid in inv.memo:
                return  # already recorded (the SDK skips defers it was told about)
            fn_slug = op.opts.get("fn_slug")
            if not isinstance(fn_slug, str) or not fn_slug:
                log.warning("run %s: DeferAdd %s without opts.fn_slug: ignored", inv.run_id,
                            op.id)
                return
            meta = op.opts.get("meta")
            await inv.record_step(uid, DEFER_KIND, {
                "fn_slug": fn_slug, "input": op.opts.get("input"), "hashed_id": op.id,
                "meta": meta if isinstance(meta, dict) else None, "aborted": False}, started)
            return
        target = op.opts.get("target_hashed_id")
        for uid, record in list(inv.memo.items()):
            doc = record.output
            if (record.kind == DEFER_KIND and isinstance(doc, dict)
                    and doc.get("hashed_id") == target and not doc.get("aborted")):
                await inv.record_step(uid, DEFER_KIND, {**doc, "aborted": True}, started)

    async def ai_gateway(self, inv: Invocation, op: Op, started: int) -> None:
        """`step.ai.infer`: make the model request the opcode describes (`sdk.gateway`) and
        commit its answer as the step's result, or its failure as a step error."""
        uid = step_uid(op)
        if uid in inv.memo:
            return
        if self._session is None:
            raise RuntimeError("the SDK executor is not open")
        try:
            request = gateway_request(op.opts)
        except ProtocolError as exc:
            error: dict[str, Any] | None = stored_error("AIGatewayError", exc.message)
            answer = None
        else:
            answer = await perform(self._session, request, self.max_reply_bytes)
            error = answer.error
        try:
            if error is None:
                assert answer is not None
                await inv.step_succeeded(uid, answer.data, started)
            else:
                final = answer is None  # a malformed opcode can't get better
                await inv.step_failed(uid, sdk_error(error, no_retry=final, retry_at_ms=None),
                                      started)
        except StepError:
            pass  # spent: memoized as an error, which the app raises in the function

    async def wait(self, inv: Invocation, op: Op, uid: str, started: int) -> None:
        """Begin (or check) a step that waits: a sleep, an event, an invoked run."""
        now = self.clock.now_ms()
        kind = {OP_SLEEP: "sleep", OP_WAIT_FOR_EVENT: "wait_for_event"}.get(op.op, "invoke")
        try:
            if op.op == OP_SLEEP:
                until = None if uid in inv.pending else sleep_until_ms(op, now)
                await inv.sleep_until_step(uid, until)
            elif op.op == OP_WAIT_FOR_EVENT:
                event = op.opts.get("event") or op.name
                timeout = timeout_seconds(op.opts.get("timeout"), now, f"step {uid!r} timeout")
                if timeout is None and uid not in inv.pending:
                    raise ProtocolError(f"step {uid!r}: waitForEvent needs a timeout")
                condition = op.opts.get("if")
                await inv.wait_for_event_step(
                    uid, event, timeout or 0,
                    condition if isinstance(condition, str) and condition else None)
            else:
                payload = op.opts.get("payload")
                data = payload.get("data") if isinstance(payload, dict) else None
                timeout = timeout_seconds(op.opts.get("timeout"), now, f"step {uid!r} timeout")
                await inv.invoke_step(uid, op.opts.get("function_id"), data, timeout)
        except StepError:
            pass  # a failed invoke: memoized as an error, which the app raises
        except (ProtocolError, UserError, TypeError) as exc:
            # A step the app described in a way we can't use (a bad expression, say): fail
            # the step for good, so the app raises the reason in the function.
            message = exc.message if isinstance(exc, ProtocolError | UserError) else str(exc)
            try:
                await inv.step_failed(uid, NonRetriableError(message), started, kind=kind)
            except StepError:
                pass

    async def call(self, inv: Invocation, url: str, target: str, *, attempt: int,
                   force_plan: bool, call_id: str) -> Reply:
        """One call to the app (`target`: `step`, or a planned step's hash), with the memo
        as it stands now; its answer, or an `SdkError` when there is none to use."""
        if self._session is None:
            raise RuntimeError("the SDK executor is not open")
        extra: dict[str, str] = {}
        if inv.function.endpoint:  # the request that started the run, once more
            # The SDK fetches the memo itself (/v0/runs/{id}/actions); an endpoint's redirect
            # is its answer to read, not to follow.
            try:
                request = endpoint_request(event_data(inv), target, force_plan=force_plan)
            except ValueError as exc:
                raise SdkNonRetriableError(stored_error("SdkProtocolError", str(exc))) from None
            method, target_url, extra = request.method, request.url, request.headers
            body: bytes | io.BytesIO = request.body if request.body is not None else b""
            follow, use_api = False, True
        else:
            data, use_api = encode_call(
                events=inv.events, memo=inv.memo, run_id=inv.run_id, attempt=attempt,
                max_attempts=inv.function.max_attempts, disable_immediate_execution=force_plan,
                fn_id=function_uuid(inv.function.id), qi_id=call_id)
            method, target_url, body, follow = "POST", call_url(url, target), _body(data), True
        log.debug("run %s: calling %s (attempt %d%s)", inv.run_id, target_url, attempt,
                  ", state through the API" if use_api else "")
        try:
            for retry in (False, True):
                headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                           **call_headers(run_id=inv.run_id, step_id=target,
                                          request_id=new_ulid()), **extra}
                trace = _CallTrace(asyncio.get_running_loop().time())
                try:
                    async with self._session.request(
                            method, target_url, data=body, headers=headers,
                            allow_redirects=follow, trace_request_ctx=trace) as resp:
                        trace.answered = True
                        raw = await read_capped(resp, self.max_reply_bytes)
                        return read_reply(resp.status, resp.headers, raw, self.clock.now_ms())
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    if retry or not trace.closed_while_idle(exc):
                        raise
                    # The app closed the pooled connection while it sat idle (uvicorn does
                    # after 5 s) just as we reused it: nothing was answered, so nothing ran.
                    log.debug("run %s: %s closed an idle connection; calling again",
                              inv.run_id, target_url)
            raise AssertionError("unreachable: the second try returns or raises")
        except ReplyTooLarge as exc:
            raise SdkError(stored_error("SdkReplyTooLargeError",
                                        f"{target_url}: {exc}")) from None
        except ProtocolError as exc:
            error = stored_error("SdkProtocolError", f"{target_url}: {exc.message}")
            raise SdkError(error) if exc.retriable else SdkNonRetriableError(error) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise SdkError(stored_error("SdkUnreachableError",
                                        f"could not call {target_url}: {reason}")) from None


IDLE_CLOSE_WINDOW = 1.0
"""Seconds after sending within which a reused connection's close counts as the peer
having closed it while idle (it arrives at once); a later one is the app failing."""


class _CallTrace:
    """What aiohttp's tracing tells about one request: whether it went out on a pooled
    connection (reused) and whether an answer began."""

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at
        self.reused = False
        self.answered = False

    def closed_while_idle(self, exc: aiohttp.ClientError) -> bool:
        """Whether `exc` is the peer closing the pooled connection while it sat idle, just
        as we reused it: a reused connection, closed or reset at once, before a single byte
        of an answer (a `ServerDisconnectedError` carries any part of one that came). Such a
        request never reached the app, so it is safe to send again; any other failure is
        the attempt's."""
        if not self.reused or self.answered:
            return False
        if asyncio.get_running_loop().time() - self.sent_at > IDLE_CLOSE_WINDOW:
            return False
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return isinstance(exc.message, str)  # no partial answer parsed
        # Reset or broken pipe; or no errno: aiohttp found the transport already closing and
        # could not write the request ("Can not write request body"), so nothing was sent.
        return isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.ECONNRESET,
                                                                         errno.EPIPE, None)


async def _on_reuse(session: aiohttp.ClientSession, context: SimpleNamespace,
                    params: aiohttp.TraceConnectionReuseconnParams) -> None:
    trace = context.trace_request_ctx
    if isinstance(trace, _CallTrace):
        trace.reused = True


def _trace_config() -> aiohttp.TraceConfig:
    config = aiohttp.TraceConfig()
    config.on_connection_reuseconn.append(_on_reuse)
    return config


class ReplyTooLarge(Exception):
    """A reply body over the cap (its message names the cap)."""


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB" if n >= 1024 * 1024 else f"{n:,} bytes"


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The reply body, read in chunks; `ReplyTooLarge` as soon as it is known to pass `cap`
    bytes (from Content-Length before reading, else once that much has arrived)."""
    claimed = resp.content_length
    if claimed is not None and claimed > cap:
        resp.close()  # don't drain gigabytes to reuse the connection
        raise ReplyTooLarge(f"the reply is {_size(claimed)} (Content-Length), over the "
                            f"{_size(cap)} cap on SDK replies")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.read(READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            resp.close()
            raise ReplyTooLarge(f"the reply passed the {_size(cap)} cap on SDK replies "
                                f"({size:,} bytes had arrived)")
        chunks.append(chunk)


def event_data(inv: Invocation) -> dict[str, Any]:
    """The data of a run's trigger event (for an endpoint: the request that started it)."""
    data = inv.events[0].data if inv.events else None
    return data if isinstance(data, dict) else {}


def _body(raw: bytes) -> bytes | io.BytesIO:
    """A call's body for aiohttp: bytes above 1 MiB (a batch of large events, a big memo)
    go as a stream, which aiohttp sends without the ResourceWarning it gives for large
    bytes (an error where warnings are errors, as in pytest)."""
    return io.BytesIO(raw) if len(raw) > 1024 * 1024 else raw
