"""Forwarding a validated request to an engine replica and relaying its answer.

The client's original bytes are forwarded (unknown fields reach the engine unchanged).
Streams are relayed event by event as they arrive; usage is read from the engine's own
usage chunks, which the gateway asks for and hides again when the client did not. An
engine answering `n` choices may send one usage chunk per choice: they are held back and
summed into one (the prompt counted once), sent just before [DONE]. A stream that ends
without its usage chunk (the client left, the engine failed) is metered from the last
events relayed, parsed once at the end (`_count_cut_stream`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from time import perf_counter

import aiohttp
import msgspec

from appliance.errors import (
    ApplianceError,
    EngineError,
    EngineRejected,
    EngineTimeout,
    InvalidRequest,
    ServiceUnavailable,
)
from appliance.governance import Principal
from appliance.limits import Ticket
from services.gateway.errors import error_event
from services.gateway.metrics import GatewayMetrics
from services.gateway.queueing import PRIORITIES, ModelQueue
from services.gateway.replicas import ModelPool, Replica
from services.gateway.routing import RetryBudget
from services.gateway.schemas import HasUsage, StreamChunk, Usage

log = logging.getLogger(__name__)

EVENT_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class Dropped(ServiceUnavailable):
    """The engine closed the connection before answering: a kept-alive one it had closed, or it died."""


def carries_usage(data: bytes) -> bool:
    """Whether SSE data holds a usage object (OpenAI sends "usage": null in other chunks)."""
    mentions = data.count(b'"usage"')
    return mentions > 0 and mentions != data.count(b'"usage":null') + data.count(b'"usage": null')


class Call:
    """What the gateway knows about one request while it is being answered."""

    __slots__ = (
        "request_id", "key_id", "model", "endpoint", "stream", "started", "ttft", "usage", "status", "error_type",
        "answer_started", "answered", "deadline", "timed_out", "finished", "principal", "ticket", "route", "replica",
        "affinity", "slot", "cache", "cache_key", "shadow", "template", "trace", "log",
    )

    def __init__(self, request_id: str, key_id: str | None, endpoint: str, started: float):
        self.request_id = request_id
        self.key_id = key_id
        self.endpoint = endpoint
        self.model: str | None = None
        self.stream = False
        self.started = started
        self.ttft: float | None = None
        self.usage: Usage | None = None
        self.status = 200
        self.error_type: str | None = None
        self.answer_started = False  # the response status has been sent
        self.answered = False  # the answer is complete: a disconnect now cancels nothing
        self.deadline: float | None = None  # perf_counter() by which the engine must have answered
        self.timed_out = False  # the ticker cancelled the request: the deadline passed
        self.finished = False  # metered (services/gateway/app.py Gateway.finish)
        self.principal: Principal | None = None  # who asks, once authenticated
        self.ticket: Ticket | None = None  # what the governor reserved for it (appliance/limits.py)
        self.route: str | None = None  # the route asked for, when the name is one (services/gateway/routing.py)
        self.replica: Replica | None = None  # the replica answering, once one does
        self.affinity: bytes | None = None  # its session or prompt prefix, for a prefix_affinity model
        self.slot: ModelQueue | None = None  # the model whose engine slot it holds (services/gateway/queueing.py)
        self.cache: str | None = None  # hit, miss or bypass, for a model with a response cache
        self.cache_key: bytes | None = None  # where its answer is kept (services/gateway/cache.py)
        self.shadow = None  # its route's shadow (config.ShadowSpec), as the route was when the request came
        self.template: str | None = None  # the prompt template version rendered into it ("name:version")
        self.trace = None  # its OpenTelemetry trace (services/gateway/tracing.py), when tracing is on
        self.log = None  # what it sent and got, when its policy logs requests (services/gateway/request_logs.py)


def engine_error(status: int, payload: bytes, model: str) -> ApplianceError:
    """Turn an engine's error answer into one of ours, keeping its message and 4xx status."""
    message = None
    try:
        decoded = msgspec.json.decode(payload)
        err = decoded.get("error") if isinstance(decoded, dict) else None
        if isinstance(err, dict):
            message = err.get("message")
        elif isinstance(err, str):
            message = err
        elif isinstance(decoded, dict) and isinstance(decoded.get("detail"), str):
            message = decoded["detail"]
    except msgspec.DecodeError:
        pass
    message = message or payload[:500].decode(errors="replace") or f"HTTP {status}"
    if status == 503:  # not ready (llama-server loading its model) or overloaded: the client may retry
        return ServiceUnavailable(f"The engine for '{model}' is not ready: {message}")
    if 400 <= status < 500 and status not in (401, 403, 404):
        return EngineRejected(f"The engine for '{model}' rejected the request: {message}", status=status)
    return EngineError(f"The engine for '{model}' failed (HTTP {status}): {message}")


def _timeout(pool: ModelPool) -> EngineTimeout:
    return EngineTimeout(f"The engine for '{pool.served.name}' did not answer within {pool.timeout_s:g} s.")


def _timed_out(call: Call) -> bool:
    """Whether a CancelledError is the engine deadline (then the cancellation is undone)."""
    if not call.timed_out:
        return False
    asyncio.current_task().uncancel()
    return True


class Timings(msgspec.Struct):
    cache_n: int = 0
    prompt_n: int = 0
    predicted_n: int = 0


class TimedChunk(msgspec.Struct):
    """llama.cpp's stream chunk with `timings_per_token` (services/gateway/adapters.py asks for it)."""

    timings: Timings | None = None


_decode_timed = msgspec.json.Decoder(TimedChunk).decode


def _count_cut_stream(call: Call, last: bytes, relayed: int) -> None:
    """The usage of a stream that ended before its usage chunk (the client left, the engine
    failed), read once from the last events relayed. llama.cpp's running counts are exact;
    another engine's (vLLM, remote upstreams) are estimated as one completion token per
    chunk relayed (vLLM sends one per decoding step, merging tokens only to complete a
    character or a stop string; an OpenAI-style first chunk holding only the role counts
    one too many) and no prompt tokens, which are unknown."""
    if call.usage is not None or not last:
        return
    event = last.rstrip()
    event = event[event.rfind(b"data:") + 5 :]
    try:
        timings = _decode_timed(event).timings
    except (msgspec.DecodeError, msgspec.ValidationError):
        timings = None
    if timings is not None:
        prompt, completion = timings.cache_n + timings.prompt_n, timings.predicted_n
    else:
        prompt, completion = 0, relayed
    call.usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# An engine answering one of these has failed or refused this request for its own reasons
# (overloaded, misconfigured, rate limited upstream): another attempt, elsewhere, may answer.
RETRY_STATUSES = frozenset({401, 403, 404, 408, 429})
ATTEMPTS_PER_MODEL = 2  # tries of one model's replicas before its route's next model


class Forwarder:
    def __init__(self, session: aiohttp.ClientSession, budget: RetryBudget, metrics: GatewayMetrics):
        self.session, self.budget, self.metrics = session, budget, metrics

    async def open(self, call: Call, plan: Sequence[ModelPool], prepare,
                   spare: bool = False) -> tuple[ModelPool, aiohttp.ClientResponse]:
        """POST the request to the first model of `plan` that answers, by the call's deadline.

        `prepare(pool)` gives (path, body, stream) for a model: a model after the first that
        cannot serve the request (InvalidRequest) is skipped. A model is tried on up to
        ATTEMPTS_PER_MODEL replicas (services/gateway/replicas.py picks them; a replica that
        failed already is tried again only when no model follows); a failure before
        the answer starts moves on: a connection refused (the replica is marked down until its
        next good health check), a connection dropped before answering (a kept-alive one the
        engine had closed: sent again at once), an engine timeout (the next model), a 5xx or
        one of RETRY_STATUSES (a local engine's 503 marks it down: restarted, still loading).
        Failures count toward the replica's circuit breaker. Every attempt after the first is
        paid from the retry budget (services/gateway/routing.py), and one to a replica that
        already failed this request waits a backoff. Generation has no side effects to repeat.
        `spare` (a shadow copy): one attempt, only on a free engine slot, outside the retry budget.
        """
        if not spare:
            self.budget.deposit()
        first_error: ApplianceError | None = None
        attempts = 0
        failed_on: dict[Replica, int] = {}
        tried: set[Replica] = set()
        for index, pool in enumerate(plan):
            try:
                path, body, stream = prepare(pool)
            except InvalidRequest:
                if index == 0:
                    raise
                continue
            if pool.queue.capacity is not None:
                call.deadline = None  # a slot is waited for up to queue.max_wait_s, not the engine timeout
                try:
                    if spare:
                        call.slot = pool.queue.take_free()
                    else:
                        await self._take_slot(call, pool)
                except ServiceUnavailable as exc:  # overloaded: the route's next model may have room
                    first_error = first_error or exc
                    continue
            for _ in range(ATTEMPTS_PER_MODEL):
                try:
                    replica = pool.pick(call.affinity)
                except ServiceUnavailable as exc:
                    first_error = first_error or exc
                    break
                if replica in tried and index + 1 < len(plan):
                    break  # the same replica again: the route's next model is the better bet
                if attempts:
                    if spare:
                        raise first_error
                    if not self.budget.withdraw():
                        self.metrics.child(self.metrics.retries_refused, pool.served.name).inc()
                        log.warning("request %s: the retry budget is spent; not trying %s", call.request_id, replica)
                        raise first_error
                    self.metrics.child(self.metrics.retries, pool.served.name).inc()
                    if failed := failed_on.get(replica):
                        await self._wait(call, pool, self.budget.backoff(failed + 1))
                attempts += 1
                tried.add(replica)
                error, response = await self._attempt(call, pool, replica, path, body, stream)
                if error is None:
                    return pool, response
                first_error = first_error or error
                if isinstance(error, EngineTimeout):
                    break  # the model's whole timeout has passed: its next replica would wait as long
                if not isinstance(error, Dropped):
                    failed_on[replica] = failed_on.get(replica, 0) + 1
            if call.slot is not None:  # this model failed: its slot goes to the next request
                call.slot.release()
                call.slot = None
        raise first_error or ServiceUnavailable(
            f"No model of the route '{call.route}' can serve this request.", retry_after=2)

    async def _take_slot(self, call: Call, pool: ModelPool) -> None:
        name = pool.served.name
        try:
            waited = await pool.queue.acquire(PRIORITIES[call.principal.priority])
        except ServiceUnavailable as exc:
            self.metrics.child(self.metrics.shed, name, exc.code).inc()
            log.warning("request %s shed: %s", call.request_id, exc.message)
            raise
        call.slot = pool.queue
        self.metrics.child(self.metrics.queue_wait, name).observe(waited)

    async def _wait(self, call: Call, pool: ModelPool, delay: float) -> None:
        call.deadline = perf_counter() + pool.timeout_s
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            if _timed_out(call):
                raise _timeout(pool) from None
            raise

    async def _attempt(self, call: Call, pool: ModelPool, replica: Replica, path: str, body: bytes,
                       stream: bool) -> tuple[ApplianceError | None, aiohttp.ClientResponse | None]:
        """One try: (None, the response) when the replica answered, else (why not, None)."""
        call.deadline = perf_counter() + pool.timeout_s
        replica.in_flight += 1
        replica.breaker.sent()
        name = pool.served.name
        url, headers = replica.url(path), replica.stream_headers if stream else replica.headers
        if call.trace is not None:  # W3C trace context: the engine's spans join the request's trace
            headers = {**headers, **call.trace.engine_headers(url)}
        try:
            response = await self.session.post(url, data=body, headers=headers)
            status = response.status
            if status < 500 and status not in RETRY_STATUSES:
                replica.breaker.succeeded()  # a 4xx is the request's fault, not the engine's
                call.replica = replica
                return None, response
            try:
                payload = await response.read()
            finally:
                response.release()
            if status == 503 and pool.served.engine != "remote":
                # A local engine restarted between two health checks, still loading its model:
                # down until its next good health check.
                replica.probe_ok = False
            error, reason = engine_error(status, payload, name), f"HTTP {status}"
        except asyncio.CancelledError:
            replica.in_flight -= 1
            if not _timed_out(call):
                raise
            call.timed_out = False  # the next attempt has a deadline of its own
            replica.breaker.failed("timeout")
            self._failed(call, replica, "timeout")
            return _timeout(pool), None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            replica.probe_ok = False  # down until its next good health check
            error, reason = ServiceUnavailable(f"The model '{name}' has no reachable replica right now; retry shortly.",
                                               retry_after=2), f"unreachable ({exc})"
        except aiohttp.ClientConnectionError as exc:
            replica.in_flight -= 1
            # Once, a kept-alive connection the engine had closed; every time, an engine failing.
            replica.breaker.failed("dropped the connection")
            self._failed(call, replica, f"dropped the connection before answering ({exc})", "dropped")
            return Dropped(f"The engine for '{name}' dropped the connection before answering; retry shortly.",
                           retry_after=1), None
        except aiohttp.ClientError as exc:
            replica.in_flight -= 1
            raise EngineError(f"The engine for '{name}' failed: {exc}") from None
        replica.in_flight -= 1
        replica.breaker.failed(reason)
        self._failed(call, replica, reason)
        return error, None

    def _failed(self, call: Call, replica: Replica, reason: str, kind: str | None = None) -> None:
        log.warning("request %s: %s failed: %s", call.request_id, replica, reason)
        self.metrics.child(self.metrics.upstream_failures, replica.model, kind or reason.split(" ", 1)[0]).inc()

    async def complete(self, call: Call, pool: ModelPool, response: aiohttp.ClientResponse) -> bytes:
        """Read a non-streaming answer (opened by `open`); returns the engine's JSON answer."""
        try:
            payload = await response.read()
        except asyncio.CancelledError:
            if _timed_out(call):
                raise _timeout(pool) from None
            raise
        except aiohttp.ClientError as exc:
            call.replica.breaker.failed("cut mid-answer")
            raise EngineError(f"The engine for '{pool.served.name}' failed mid-answer: {exc}") from None
        finally:
            call.deadline = None
            response.release()
        if response.status >= 400:
            raise engine_error(response.status, payload, pool.served.name)
        try:
            call.usage = msgspec.json.decode(payload, type=HasUsage).usage
        except (msgspec.DecodeError, msgspec.ValidationError):
            call.usage = None
        return payload

    @staticmethod
    async def check_stream(call: Call, pool: ModelPool, response: aiohttp.ClientResponse) -> None:
        """A stream opened by `open`: an engine's refusal raises as usual."""
        call.deadline = None
        if response.status >= 400:
            try:
                payload = await response.read()
            finally:
                response.release()
            raise engine_error(response.status, payload, pool.served.name)

    async def relay(self, call: Call, pool: ModelPool, response: aiohttp.ClientResponse, hide_usage: bool) -> AsyncIterator[bytes]:
        """Yield the engine's SSE events as they arrive, reading usage on the way.

        A failure mid-stream ends the stream with an error event and [DONE]; a client
        that goes away closes this generator, which closes the engine connection so the
        engine stops generating.
        """
        buffer = b""
        done = False
        usage_events: list[bytes] = []
        last = b""  # the latest events relayed: what was generated so far, if the usage chunk never comes
        relayed = 0  # events relayed, for an engine that reports no counts mid-stream
        chunks = response.content.iter_any()
        try:
            try:
                while True:
                    # A stream may run long; what must not happen is a silence longer than the timeout.
                    call.deadline = perf_counter() + pool.timeout_s
                    try:
                        data = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        call.deadline = None
                    if call.ttft is None:
                        call.ttft = perf_counter() - call.started
                    if not buffer and data.endswith(b"\n\n") and b"data: [DONE]" not in data and not carries_usage(data):
                        last = data
                        relayed += data.count(b"\n\n")
                        yield data  # whole events with nothing to look at: pass them on as they are
                        continue
                    buffer += data
                    events = EVENT_BOUNDARY.split(buffer)
                    buffer = events.pop()
                    out = []
                    for event in events:
                        if not event:
                            continue
                        if event.startswith(b"data: [DONE]"):
                            done = call.answered = True
                            if usage_events and not hide_usage:
                                out.append(self._usage_event(call, usage_events))
                        elif carries_usage(event) and self._take_usage(call, event):
                            usage_events.append(event)
                            continue
                        else:
                            last = event
                            relayed += 1
                        out.append(event + b"\n\n")
                    if out:
                        yield b"".join(out)
                if not done:
                    raise EngineError(f"The engine for '{call.model}' closed the stream before it finished.")
            except asyncio.CancelledError:
                if _timed_out(call):
                    raise EngineTimeout(f"The engine for '{call.model}' sent nothing for {pool.timeout_s:g} s.") from None
                raise
            except aiohttp.ClientError as exc:
                raise EngineError(f"The engine for '{call.model}' failed mid-stream: {exc}") from None
        except ApplianceError as error:
            call.status, call.error_type = error.status, error.type
            log.warning("stream %s ended with an error: %s", call.request_id, error.message)
            call.replica.breaker.failed(error.message)
            _count_cut_stream(call, last, relayed)
            call.answered = True
            yield error_event(error)
        finally:
            response.close()
            _count_cut_stream(call, last, relayed)  # a client that left closes this generator

    @staticmethod
    def _take_usage(call: Call, event: bytes) -> bool:
        """Add a usage chunk's counts to the call's; True if the chunk carries nothing but usage."""
        payload = event[event.find(b"{") :]
        try:
            chunk = msgspec.json.decode(payload, type=StreamChunk)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        usage = chunk.usage
        if usage is None:
            return False
        if call.usage is not None and not chunk.choices:  # another choice's usage: the prompt is shared
            completion = call.usage.completion_tokens + usage.completion_tokens
            prompt = max(call.usage.prompt_tokens, usage.prompt_tokens)
            usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        call.usage = usage
        return not chunk.choices

    @staticmethod
    def _usage_event(call: Call, events: list[bytes]) -> bytes:
        """The one usage chunk the client sees: the engine's own, or the last with the summed counts."""
        if len(events) == 1:
            return events[0] + b"\n\n"
        last = msgspec.json.decode(events[-1][events[-1].find(b"{") :])
        last["usage"] = msgspec.structs.asdict(call.usage)
        return b"data: " + msgspec.json.encode(last) + b"\n\n"
