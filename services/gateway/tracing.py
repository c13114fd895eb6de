"""OpenTelemetry traces of the gateway's requests (and the worker's jobs), exported over
OTLP/HTTP to the profile's tracing.otlp_endpoint; off, and free, without one.

A request's trace is a SERVER span, `POST /v1/chat/completions`, continuing the client's
trace when it sends a W3C traceparent, with a child span per stage:

  authenticate   the caller's key or token
  route          the request read, and the model (or a route's target) chosen
  policy         admission against limits and budgets, and the caller's policy applied
  engine         a CLIENT span from the first attempt on an engine (or a remote upstream)
                 until its answer starts; its context goes to the engine as traceparent
  stream         relaying the answer to the client, to its last byte

The stages are timed as the request goes (a clock reading each, `mark`), and every span is
made when it ends; only the ids exist before, the engine span's so that its context can be
sent. Attributes follow the GenAI conventions (gen_ai.*). A request the client's trace does
not sample, or that tracing.sample_ratio leaves out, has no trace.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp
import msgspec
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from appliance import __version__
from appliance.config import TracingConfig
from services.gateway.metrics import OPERATIONS

log = logging.getLogger("appliance.gateway")

EXPORT_TIMEOUT_S = 10.0
EXPORT_EVERY_S = 1.0
QUEUE_REQUESTS = 20_000  # requests whose spans wait for export; beyond, new ones are dropped (and said in the log)
BATCH_REQUESTS = 1000
TAIL = b"]}]}]}"  # after the spans of an export's JSON
PROPAGATOR = TraceContextTextMapPropagator()
JSON_HEADERS = {"Content-Type": "application/json"}
INTERNAL, SERVER, CLIENT = 1, 2, 3  # OTLP's SpanKind
STATUS_ERROR = 2
_encode = msgspec.json.Encoder().encode
STAGES = ("authenticate", "route", "policy")  # each ends at its mark; the next starts there


def resource_of(config: TracingConfig, component: str) -> Resource:
    return Resource.create({"service.name": config.service_name, "service.version": __version__,
                            "service.namespace": "appliance", "appliance.component": component})


def tracer_provider(config: TracingConfig, component: str) -> TracerProvider:
    """The SDK's provider, batching spans to the collector over OTLP/HTTP protobuf: the worker's, for its jobs."""
    provider = TracerProvider(resource=resource_of(config, component),
                              sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint.rstrip("/") + "/v1/traces", timeout=EXPORT_TIMEOUT_S)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class RequestTrace:
    """One sampled request's trace while it is answered: the ids of its spans, and when each stage ended."""

    __slots__ = ("tracing", "endpoint", "trace_id", "span_id", "parent_id", "start", "marks", "engine_id", "url")

    def __init__(self, tracing: Tracing, endpoint: str, trace_id: str, parent_id: str):
        self.tracing, self.endpoint = tracing, endpoint
        self.trace_id, self.span_id, self.parent_id = trace_id, _new_id(), parent_id
        self.start = time.time_ns()
        self.marks: dict[str, int] = {}
        self.engine_id: str | None = None
        self.url = ""

    def mark(self, stage: str) -> None:
        """`stage` (authenticate, route, policy, engine: the engine's answer started) ends now."""
        self.marks.setdefault(stage, time.time_ns())

    def engine_headers(self, url: str) -> dict[str, str]:
        """The engine call starts (or is tried again): the traceparent header that carries its span's context."""
        if self.engine_id is None:
            self.engine_id, self.url = _new_id(), str(url)
            self.marks["engine call"] = time.time_ns()
        return {"traceparent": f"00-{self.trace_id}-{self.engine_id}-01"}

    def end(self, call) -> None:
        """The request is answered (or failed): its spans, OTLP's JSON, wait for the next export
        (made as text from a template: a span's dict and its encoding cost twice as much)."""
        now, marks, root, trace_id = time.time_ns(), self.marks, self.span_id, self.trace_id
        spans, start = [], self.start
        for stage in STAGES:
            if stage in marks:
                spans.append(_SPAN(trace_id, _new_id(), root, _NAMES[stage], INTERNAL, start, marks[stage], "[]", "{}"))
                start = marks[stage]
        if self.engine_id is not None:
            answered = marks.get("engine", now)
            url = _text([_attribute("url.full", self.url)])
            spans.append(_SPAN(trace_id, self.engine_id, root, _NAMES["engine"], CLIENT, marks["engine call"], answered,
                               url, "{}"))
            if "engine" in marks:
                spans.append(_SPAN(trace_id, _new_id(), root, _NAMES["stream"], INTERNAL, answered, now, "[]", "{}"))
        attributes = [_attribute("http.request.method", "POST"), _attribute("url.path", f"/v1/{self.endpoint}"),
                      _attribute("gen_ai.operation.name", OPERATIONS.get(self.endpoint, self.endpoint)),
                      _attribute("http.response.status_code", call.status),
                      _attribute("appliance.request_id", call.request_id)]
        if call.model:
            attributes.append(_attribute("gen_ai.request.model", call.model))
        if call.route:
            attributes.append(_attribute("appliance.route", call.route))
        if call.usage is not None:
            attributes.append(_attribute("gen_ai.usage.input_tokens", call.usage.prompt_tokens))
            attributes.append(_attribute("gen_ai.usage.output_tokens", call.usage.completion_tokens))
        status = "{}"
        if call.error_type:
            attributes.append(_attribute("error.type", call.error_type))
            if call.status >= 500:
                status = _text({"code": STATUS_ERROR, "message": call.error_type})
        spans.append(_SPAN(trace_id, root, self.parent_id, _text(f"POST /v1/{self.endpoint}"), SERVER, self.start, now,
                           _text(attributes), status))
        self.tracing.add(",".join(spans).encode())  # bytes wait cheaper than objects (the GC skips them)


_SPAN = ('{{"traceId":"{}","spanId":"{}","parentSpanId":"{}","name":{},"kind":{},"startTimeUnixNano":{},'
         '"endTimeUnixNano":{},"attributes":{},"status":{}}}').format
_NAMES = {name: f'"{name}"' for name in (*STAGES, "engine", "stream")}


def _text(value) -> str:
    return _encode(value).decode()


def _attribute(key: str, value) -> dict:
    if isinstance(value, str):
        return {"key": key, "value": {"stringValue": value}}
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": value}}
    return {"key": key, "value": {"doubleValue": value}}


def _new_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


class Tracing:
    """The gateway's traces: `begin` one per sampled request; `run` exports them, every
    EXPORT_EVERY_S, to the collector as OTLP/HTTP JSON.

    The gateway makes its spans itself, as OTLP's JSON, and posts them from its event loop:
    the SDK's tracer and protobuf exporter (bench/observability_overhead.py) cost a request
    several times what the gateway itself does. The worker's job spans use the SDK."""

    def __init__(self, config: TracingConfig):
        self.config = config
        self.url = config.otlp_endpoint.rstrip("/") + "/v1/traces"
        resource = [_attribute(k, v) for k, v in resource_of(config, "gateway").attributes.items()]
        head = _encode({"resourceSpans": [{"resource": {"attributes": resource}, "scopeSpans": [
            {"scope": {"name": "appliance.gateway", "version": __version__}, "spans": []}]}]})
        self.head = head[:-len(TAIL)]  # up to, and with, the spans' "["
        self.pending: list[bytes] = []
        self.dropped = 0

    def begin(self, endpoint: str, traceparent: str | None) -> RequestTrace | None:
        """The request's trace, continuing the client's `traceparent`; None when it is not sampled."""
        parent = trace.get_current_span(PROPAGATOR.extract({"traceparent": traceparent})).get_span_context() \
            if traceparent else None
        if parent is not None and parent.is_valid:
            if not parent.trace_flags.sampled:
                return None
            return RequestTrace(self, endpoint, f"{parent.trace_id:032x}", f"{parent.span_id:016x}")
        if random.random() >= self.config.sample_ratio:
            return None
        return RequestTrace(self, endpoint, f"{random.getrandbits(128) or 1:032x}", "")

    def add(self, spans: bytes) -> None:
        """A request's spans: OTLP JSON span objects, comma-separated."""
        if len(self.pending) >= QUEUE_REQUESTS:
            self.dropped += 1
            return
        self.pending.append(spans)

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(EXPORT_EVERY_S)
            await self.export(session)

    async def export(self, session: aiohttp.ClientSession) -> None:
        """Send what is pending, in batches; a collector that does not take them loses them (said in the log)."""
        while self.pending:
            batch, self.pending = self.pending[:BATCH_REQUESTS], self.pending[BATCH_REQUESTS:]
            body = b"".join((self.head, b",".join(batch), TAIL))
            try:
                async with session.post(self.url, data=body, headers=JSON_HEADERS,
                                        timeout=aiohttp.ClientTimeout(total=EXPORT_TIMEOUT_S)) as answer:
                    if answer.status >= 300:
                        log.warning("the trace collector %s answered %d: the spans of %d requests lost", self.url,
                                    answer.status, len(batch))
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("the trace collector %s cannot be reached (%s): the spans of %d requests lost", self.url,
                            exc or type(exc).__name__, len(batch))
        if self.dropped:
            log.warning("the spans of %d requests dropped: more than %d requests' waited for the trace collector",
                        self.dropped, QUEUE_REQUESTS)
            self.dropped = 0
