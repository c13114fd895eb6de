"""OpenTelemetry tracing end to end: a request's spans (authenticate, route, policy, engine,
stream) arrive at an OTLP receiver on loopback under the client's own trace, the engine's
span context reaches the upstream as a W3C traceparent, and a job run by the worker is a span."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, default_gguf

pytestmark = pytest.mark.stack

STAGES = {"authenticate", "route", "policy", "engine", "stream"}


def traced_chat(stack, model: str, stream: bool) -> tuple[str, str, str]:
    """A chat request sent inside a client's trace: (its trace id, the client's span id, its request id)."""
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    answer = httpx.post(f"{stack.base_url}/chat/completions", timeout=60,
                        headers={"Authorization": f"Bearer {stack.admin_key}", "traceparent": f"00-{trace_id}-{parent}-01"},
                        json={"model": model, "stream": stream, "max_tokens": 4,
                              "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    assert answer.status_code == 200, answer.text
    return trace_id, parent, answer.headers["x-request-id"]


def test_a_requests_stages_arrive_as_spans_of_the_clients_trace(observed, otlp):
    trace_id, parent, request_id = traced_chat(observed, DEFAULT_MODEL, stream=True)
    spans = otlp.trace(trace_id, {"POST /v1/chat/completions", *STAGES})
    root = spans["POST /v1/chat/completions"]
    assert root["parent_id"] == parent, "the client's span is the request's parent"
    assert root["service"]["service.name"] == "appliance-test"
    attributes = root["attributes"]
    assert attributes["gen_ai.request.model"] == DEFAULT_MODEL and attributes["gen_ai.operation.name"] == "chat"
    assert attributes["http.response.status_code"] == 200 and attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["appliance.request_id"] == request_id
    stages = sorted((spans[name] for name in STAGES), key=lambda s: s["start"])
    assert [s["name"] for s in stages] == ["authenticate", "route", "policy", "engine", "stream"]
    for stage in stages:
        assert stage["parent_id"] == root["span_id"]
        assert root["start"] <= stage["start"] <= stage["end"] <= root["end"]
    for before, after in zip(stages, stages[1:]):
        assert before["end"] <= after["start"], (before["name"], after["name"])
    assert spans["engine"]["kind"] == 3  # SPAN_KIND_CLIENT
    assert spans["engine"]["attributes"]["url.full"].endswith("/chat/completions")


def test_the_engine_span_context_reaches_the_upstream_as_traceparent(observed, otlp, upstream):
    trace_id, _, _ = traced_chat(observed, "remote-ok", stream=False)
    spans = otlp.trace(trace_id, {"engine"})
    assert f"00-{trace_id}-{spans['engine']['span_id']}-01" in upstream.stats()["traceparents"]


def test_a_job_is_a_span_of_the_worker(observed, otlp):
    admin = httpx.Client(base_url=observed.root, headers={"Authorization": f"Bearer {observed.admin_key}"}, timeout=30)
    job = admin.post("/admin/jobs", json={"kind": "model.import", "params": {
        "name": "traced-import", "path": str(default_gguf())}}).json()
    deadline = time.monotonic() + 60
    while admin.get(f"/admin/jobs/{job['id']}").json()["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.2)
    span = otlp.inbox.wait(lambda s: s["attributes"].get("appliance.job.id") == job["id"], what="the job's span")
    assert span["name"] == "job model.import" and span["attributes"]["appliance.job.state"] == "succeeded"
    assert span["service"]["appliance.component"] == "worker"


def test_sampling_follows_the_clients_flag_then_the_ratio():
    from appliance.config import TracingConfig
    from services.gateway.tracing import Tracing

    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    never = Tracing(TracingConfig(otlp_endpoint="http://127.0.0.1:9", sample_ratio=0))
    assert never.begin("chat/completions", None) is None
    continued = never.begin("chat/completions", f"00-{trace_id}-{parent}-01")  # the client sampled it
    assert (continued.trace_id, continued.parent_id) == (trace_id, parent)
    assert never.begin("chat/completions", f"00-{trace_id}-{parent}-00") is None  # the client did not
    always = Tracing(TracingConfig(otlp_endpoint="http://127.0.0.1:9"))
    fresh = always.begin("embeddings", "not a traceparent")
    assert fresh.parent_id == "" and len(fresh.trace_id) == 32 and fresh.trace_id != trace_id
