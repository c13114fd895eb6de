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
from collections.abc import AsyncIterator
from time import perf_counter

import aiohttp
import msgspec

from appliance.errors import ApplianceError, EngineError, EngineRejected, EngineTimeout, ServiceUnavailable
from appliance.governance import Principal
from appliance.limits import Ticket
from services.gateway.errors import error_event
from services.gateway.replicas import ModelPool
from services.gateway.schemas import HasUsage, StreamChunk, Usage

log = logging.getLogger(__name__)

EVENT_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def carries_usage(data: bytes) -> bool:
    """Whether SSE data holds a usage object (OpenAI sends "usage": null in other chunks)."""
    mentions = data.count(b'"usage"')
    return mentions > 0 and mentions != data.count(b'"usage":null') + data.count(b'"usage": null')


class Call:
    """What the gateway knows about one request while it is being answered."""

    __slots__ = (
        "request_id", "key_id", "model", "endpoint", "stream", "started", "ttft", "usage", "status", "error_type",
        "answer_started", "answered", "deadline", "timed_out", "finished", "principal", "ticket",
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


class Forwarder:
    def __init__(self, session: aiohttp.ClientSession):
        self.session = session

    async def _open(self, call: Call, pool: ModelPool, path: str, body: bytes, stream: bool) -> aiohttp.ClientResponse:
        """POST to a healthy replica by the call's deadline. One that cannot be connected to
        (refused, not connected within CONNECT_TIMEOUT_S: a dead or restarting engine) is
        marked down, as is a local engine answering 503 (restarted, still loading); a connection
        that breaks before the answer (a kept-alive one the engine had closed, or an engine
        dying) is not, by itself. Either way the request is sent once more, to the next
        healthy replica: generation has no side effects to repeat."""
        call.deadline = perf_counter() + pool.timeout_s
        for _ in range(2):
            replica = pool.pick()  # 503 when no replica is healthy
            headers = replica.stream_headers if stream else replica.headers
            try:
                response = await self.session.post(replica.url(path), data=body, headers=headers)
                if response.status != 503 or pool.served.engine == "remote":
                    return response
                # A local engine restarted between two health checks, still loading its model:
                # down until its next good health check; the request goes to another replica.
                response.release()
                replica.probe_ok = False
                log.warning("%s is not ready (503); marked unhealthy", replica)
            except asyncio.CancelledError:
                if _timed_out(call):
                    raise _timeout(pool) from None
                raise
            except aiohttp.ClientConnectorError as exc:
                replica.probe_ok = False  # down until its next good health check
                log.warning("%s could not be reached (%s); marked unhealthy", replica, exc)
            except aiohttp.ClientConnectionError as exc:
                log.warning("%s dropped the connection before answering (%s); sending again", replica, exc)
            except aiohttp.ClientError as exc:
                raise EngineError(f"The engine for '{pool.served.name}' failed: {exc}") from None
        raise ServiceUnavailable(f"The model '{pool.served.name}' has no reachable replica right now; retry shortly.", retry_after=2)

    async def complete(self, call: Call, pool: ModelPool, path: str, body: bytes) -> bytes:
        """Forward a non-streaming request; returns the engine's JSON answer."""
        response = await self._open(call, pool, path, body, stream=False)
        try:
            payload = await response.read()
        except asyncio.CancelledError:
            if _timed_out(call):
                raise _timeout(pool) from None
            raise
        except aiohttp.ClientError as exc:
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

    async def open_stream(self, call: Call, pool: ModelPool, path: str, body: bytes) -> aiohttp.ClientResponse:
        """Start a streaming request; engine errors before the first byte raise as usual."""
        response = await self._open(call, pool, path, body, stream=True)
        call.deadline = None
        if response.status >= 400:
            try:
                payload = await response.read()
            finally:
                response.release()
            raise engine_error(response.status, payload, pool.served.name)
        return response

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
