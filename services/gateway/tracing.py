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

The stages are timed as the request goes (a clock reading each, `mark`); only the ids
exist before the request ends, the engine span's so that its context can be sent. Then the
trace's readings go to the telemetry helper (services/telemetry: a process of its own, off
the gateway's CPU), which makes the spans, with attributes after the GenAI conventions
(gen_ai.*), and exports them. A request the client's trace does not sample, or that
tracing.sample_ratio leaves out, has no trace.
"""

from __future__ import annotations

import random
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from appliance import __version__
from appliance.config import TracingConfig
from services.telemetry.frames import SpanRecord

EXPORT_TIMEOUT_S = 10.0
PROPAGATOR = TraceContextTextMapPropagator()


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
        self.trace_id, self.span_id, self.parent_id = trace_id, new_id(), parent_id
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
            self.engine_id, self.url = new_id(), str(url)
            self.marks["engine call"] = time.time_ns()
        return {"traceparent": f"00-{self.trace_id}-{self.engine_id}-01"}

    def end(self, call) -> None:
        """The request is answered (or failed): its trace's readings go to the telemetry helper,
        which makes the spans and exports them."""
        marks, usage = self.marks, call.usage
        self.tracing.telemetry.add_span(SpanRecord(
            self.trace_id, self.span_id, self.parent_id, self.endpoint, self.start, time.time_ns(),
            authenticate=marks.get("authenticate"), route=marks.get("route"), policy=marks.get("policy"),
            engine_call=marks.get("engine call"), engine=marks.get("engine"), engine_id=self.engine_id, url=self.url,
            status=call.status, request_id=call.request_id, model=call.model, route_name=call.route,
            input_tokens=usage.prompt_tokens if usage is not None else None,
            output_tokens=usage.completion_tokens if usage is not None else None, error_type=call.error_type))


def new_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


class Tracing:
    """The gateway's traces: `begin` one per sampled request; each ends in the telemetry
    helper (services/telemetry), which exports it to the collector as OTLP/HTTP JSON."""

    def __init__(self, config: TracingConfig, telemetry=None):
        self.config = config
        self.telemetry = telemetry

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
