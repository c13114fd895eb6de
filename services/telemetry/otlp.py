"""The gateway's request traces as OTLP/HTTP JSON, exported to the profile's
tracing.otlp_endpoint (services/gateway/tracing.py says which spans a request has).

Spans are made as text from a template: a span's dict and its encoding cost twice as much,
and the helper makes thousands a second under load."""

from __future__ import annotations

import logging

import httpx
import msgspec

from appliance import __version__
from appliance.config import TracingConfig
from services.gateway.metrics import OPERATIONS
from services.gateway.tracing import EXPORT_TIMEOUT_S, new_id, resource_of
from services.telemetry.frames import SpanRecord

log = logging.getLogger("appliance.telemetry")

BATCH_REQUESTS = 1000  # requests' spans per export
TAIL = b"]}]}]}"  # after the spans of an export's JSON
JSON_HEADERS = {"Content-Type": "application/json"}
INTERNAL, SERVER, CLIENT = 1, 2, 3  # OTLP's SpanKind
STATUS_ERROR = 2
STAGES = ("authenticate", "route", "policy")  # each ends at its reading; the next starts there
_encode = msgspec.json.Encoder().encode
_SPAN = ('{{"traceId":"{}","spanId":"{}","parentSpanId":"{}","name":{},"kind":{},"startTimeUnixNano":{},'
         '"endTimeUnixNano":{},"attributes":{},"status":{}}}').format
_NAMES = {name: f'"{name}"' for name in (*STAGES, "engine", "stream")}


def spans(record: SpanRecord) -> str:
    """A request's spans: OTLP JSON span objects, comma-separated."""
    made, start, root, trace_id = [], record.start, record.span_id, record.trace_id
    for stage in STAGES:
        if (ended := getattr(record, stage)) is not None:
            made.append(_SPAN(trace_id, new_id(), root, _NAMES[stage], INTERNAL, start, ended, "[]", "{}"))
            start = ended
    if record.engine_id is not None:
        answered = record.engine if record.engine is not None else record.end
        url = _text([_attribute("url.full", record.url)])
        made.append(_SPAN(trace_id, record.engine_id, root, _NAMES["engine"], CLIENT, record.engine_call, answered,
                          url, "{}"))
        if record.engine is not None:
            made.append(_SPAN(trace_id, new_id(), root, _NAMES["stream"], INTERNAL, answered, record.end, "[]", "{}"))
    attributes = [_attribute("http.request.method", "POST"), _attribute("url.path", f"/v1/{record.endpoint}"),
                  _attribute("gen_ai.operation.name", OPERATIONS.get(record.endpoint, record.endpoint)),
                  _attribute("http.response.status_code", record.status),
                  _attribute("appliance.request_id", record.request_id)]
    if record.model:
        attributes.append(_attribute("gen_ai.request.model", record.model))
    if record.route_name:
        attributes.append(_attribute("appliance.route", record.route_name))
    if record.input_tokens is not None:
        attributes.append(_attribute("gen_ai.usage.input_tokens", record.input_tokens))
        attributes.append(_attribute("gen_ai.usage.output_tokens", record.output_tokens))
    status = "{}"
    if record.error_type:
        attributes.append(_attribute("error.type", record.error_type))
        if record.status >= 500:
            status = _text({"code": STATUS_ERROR, "message": record.error_type})
    made.append(_SPAN(trace_id, root, record.parent_id, _text(f"POST /v1/{record.endpoint}"), SERVER, record.start,
                      record.end, _text(attributes), status))
    return ",".join(made)


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


class Exporter:
    """Posts spans to the collector, BATCH_REQUESTS requests' at a time; a collector that does
    not take them loses them (said in the log)."""

    def __init__(self, config: TracingConfig):
        self.url = config.otlp_endpoint.rstrip("/") + "/v1/traces"
        resource = [_attribute(k, v) for k, v in resource_of(config, "gateway").attributes.items()]
        head = _encode({"resourceSpans": [{"resource": {"attributes": resource}, "scopeSpans": [
            {"scope": {"name": "appliance.gateway", "version": __version__}, "spans": []}]}]})
        self.head = head[:-len(TAIL)]  # up to, and with, the spans' "["
        self.client = httpx.Client(timeout=EXPORT_TIMEOUT_S, headers=JSON_HEADERS)

    def export(self, records: list[SpanRecord]) -> None:
        for first in range(0, len(records), BATCH_REQUESTS):
            batch = records[first:first + BATCH_REQUESTS]
            body = b"".join((self.head, ",".join(spans(r) for r in batch).encode(), TAIL))
            try:
                answer = self.client.post(self.url, content=body)
                if answer.status_code >= 300:
                    log.warning("the trace collector %s answered %d: the spans of %d requests lost", self.url,
                                answer.status_code, len(batch))
            except httpx.HTTPError as exc:
                log.warning("the trace collector %s cannot be reached (%s): the spans of %d requests lost", self.url,
                            exc or type(exc).__name__, len(batch))

    def close(self) -> None:
        self.client.close()
