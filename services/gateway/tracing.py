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

The stages are timed as the request goes (a clock reading each, `mark`), and made spans
when it ends; only the request's and the engine's spans exist while it runs, the engine's
so that its context can be sent. Attributes follow the GenAI conventions (gen_ai.*).
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from appliance import __version__
from appliance.config import TracingConfig
from services.gateway.metrics import OPERATIONS

EXPORT_TIMEOUT_S = 10.0
PROPAGATOR = TraceContextTextMapPropagator()
STAGES = ("authenticate", "route", "policy")  # each ends at its mark; the next starts there


def tracer_provider(config: TracingConfig, component: str) -> TracerProvider:
    """A provider that batches spans to the collector, named `service_name` (component: gateway, worker)."""
    resource = Resource.create({"service.name": config.service_name, "service.version": __version__,
                                "service.namespace": "appliance", "appliance.component": component})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint.rstrip("/") + "/v1/traces", timeout=EXPORT_TIMEOUT_S)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class RequestTrace:
    """One request's trace while it is answered."""

    __slots__ = ("tracer", "root", "marks", "engine")

    def __init__(self, tracer: trace.Tracer, endpoint: str, traceparent: str | None):
        self.tracer = tracer
        parent = PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        self.root = tracer.start_span(f"POST /v1/{endpoint}", context=parent, kind=SpanKind.SERVER,
                                      attributes={"http.request.method": "POST", "url.path": f"/v1/{endpoint}",
                                                  "gen_ai.operation.name": OPERATIONS.get(endpoint, endpoint)})
        self.marks: dict[str, int] = {}
        self.engine: trace.Span | None = None

    def mark(self, stage: str) -> None:
        """`stage` (authenticate, route, policy) ends now."""
        self.marks[stage] = time.time_ns()

    def engine_headers(self, url: str) -> dict[str, str]:
        """The engine call starts: its span, and the traceparent header that carries its context."""
        if self.engine is None:
            context = trace.set_span_in_context(self.root)
            self.engine = self.tracer.start_span("engine", context=context, kind=SpanKind.CLIENT,
                                                 attributes={"url.full": url})
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self.engine))
        return carrier

    def answering(self) -> None:
        """The engine's answer has started: the engine span ends, the stream begins."""
        if self.engine is not None and self.engine.is_recording() and "engine" not in self.marks:
            self.marks["engine"] = time.time_ns()
            self.engine.end(self.marks["engine"])

    def end(self, call) -> None:
        """The request is answered (or failed): its stages become spans, and it ends."""
        now = time.time_ns()
        context = trace.set_span_in_context(self.root)
        start = self.root.start_time
        for stage in STAGES:
            if stage in self.marks:
                self.tracer.start_span(stage, context=context, start_time=start).end(self.marks[stage])
                start = self.marks[stage]
        if self.engine is not None and "engine" not in self.marks:
            self.engine.end(now)  # failed before an answer started
        if "engine" in self.marks:
            self.tracer.start_span("stream", context=context, start_time=self.marks["engine"]).end(now)
        root = self.root
        root.set_attribute("http.response.status_code", call.status)
        root.set_attribute("appliance.request_id", call.request_id)
        if call.model:
            root.set_attribute("gen_ai.request.model", call.model)
        if call.route:
            root.set_attribute("appliance.route", call.route)
        if call.usage is not None:
            root.set_attribute("gen_ai.usage.input_tokens", call.usage.prompt_tokens)
            root.set_attribute("gen_ai.usage.output_tokens", call.usage.completion_tokens)
        if call.error_type:
            root.set_attribute("error.type", call.error_type)
            if call.status >= 500:
                root.set_status(Status(StatusCode.ERROR, call.error_type))
        root.end(now)


class Tracing:
    """The gateway's tracer; `begin` a request's trace."""

    def __init__(self, config: TracingConfig):
        self.provider = tracer_provider(config, "gateway")
        self.tracer = self.provider.get_tracer("appliance.gateway", __version__)

    def begin(self, endpoint: str, traceparent: str | None) -> RequestTrace:
        return RequestTrace(self.tracer, endpoint, traceparent)

    def shutdown(self) -> None:
        self.provider.shutdown()
