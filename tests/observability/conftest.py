"""The observability stack: the default model on llama.cpp and the remote upstreams, with
alerts going to a webhook receiver and a real SMTP server (aiosmtpd) on loopback, and traces
to an OTLP/HTTP receiver on loopback, all started before it."""

from __future__ import annotations

import base64
import json
import threading
import time
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import UPSTREAM_KEY_ENV, Stack, free_port, start_stack, write_profile


class Inbox:
    """What a receiver got, in order; `wait` for one that `match` accepts."""

    def __init__(self) -> None:
        self.items: list = []
        self.lock = threading.Lock()

    def add(self, item) -> None:
        with self.lock:
            self.items.append(item)

    def wait(self, match, timeout: float = 60.0, what: str = "a message"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = next((item for item in self.items if match(item)), None)
            if found is not None:
                return found
            time.sleep(0.2)
        raise AssertionError(f"{what} did not arrive within {timeout} s; got: {self.items}")


class WebhookReceiver:
    """An HTTP server on loopback that keeps every JSON body POSTed to it; POST /down answers 503."""

    def __init__(self) -> None:
        inbox = self.inbox = Inbox()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 503 if self.path == "/down" else 200
                if status == 200:
                    inbox.add({"path": self.path, "body": json.loads(body)})
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def from_otlp_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP/HTTP JSON read into the official protobuf message (so a field that is not OTLP's
    fails): ids are hex in OTLP's JSON, where protobuf's JSON mapping has base64."""
    data = json.loads(body)
    for resource in data["resourceSpans"]:
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for field in ("traceId", "spanId", "parentSpanId"):
                    span[field] = base64.b64encode(bytes.fromhex(span.get(field, ""))).decode()
    return json_format.Parse(json.dumps(data), ExportTraceServiceRequest())


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback, protobuf (the SDK's exporter: the worker's job
    spans) or JSON (the gateway's): every span, as {service, name, trace_id, span_id,
    parent_id, kind, attributes, start, end}."""

    def __init__(self) -> None:
        inbox = self.inbox = Inbox()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers["Content-Type"] == "application/json":
                    request = from_otlp_json(body)
                else:
                    request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            inbox.add({"service": service, "name": span.name, "trace_id": span.trace_id.hex(),
                                       "span_id": span.span_id.hex(), "parent_id": span.parent_span_id.hex(),
                                       "kind": span.kind, "start": span.start_time_unix_nano,
                                       "end": span.end_time_unix_nano,
                                       "attributes": {a.key: _value(a.value) for a in span.attributes}})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def trace(self, trace_id: str, names: set[str], timeout: float = 30.0) -> dict[str, dict]:
        """The spans of `trace_id` by name, once every one of `names` has arrived."""
        self.inbox.wait(lambda _: names <= {s["name"] for s in self.inbox.items if s["trace_id"] == trace_id},
                        timeout, f"the spans {sorted(names)} of trace {trace_id}")
        return {s["name"]: s for s in self.inbox.items if s["trace_id"] == trace_id}


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class MailHandler:
    def __init__(self, inbox: Inbox):
        self.inbox = inbox

    async def handle_DATA(self, server, session, envelope):
        self.inbox.add({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                        "message": message_from_bytes(envelope.content, policy=policy.default)})
        return "250 OK"


@pytest.fixture(scope="session")
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="session")
def otlp():
    receiver = OtlpReceiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="session")
def smtp():
    inbox = Inbox()
    controller = Controller(MailHandler(inbox), hostname="127.0.0.1", port=free_port())
    controller.start()
    controller.inbox = inbox
    yield controller
    controller.stop()


OBSERVED = """\
tracing:
  otlp_endpoint: {otlp}
  service_name: appliance-test
alerts:
  interval_s: 1
  default_rules: false
  channels:
    - name: hook
      webhook: {{url: "{hook}/hook"}}
    - name: mail
      email: {{host: 127.0.0.1, port: {smtp_port}, sender: appliance@example.com, to: [ops@example.com]}}
    - name: broken
      webhook: {{url: "{hook}/down", format: json}}
  rules:
    - name: crash-loop
      kind: engine_crash_loop
      threshold: 2
      window_s: 20
      severity: critical
"""


@pytest.fixture(scope="session")
def observed(tmp_path_factory, webhook, smtp, otlp, upstream) -> Stack:
    tmp = tmp_path_factory.mktemp("observed")
    profile = write_profile(tmp / "profile.yaml", upstream)
    profile.write_text(profile.read_text() + OBSERVED.format(hook=webhook.url, smtp_port=smtp.port, otlp=otlp.url))
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key})
    yield running
    if running.proc.poll() is None:
        running.stop()
