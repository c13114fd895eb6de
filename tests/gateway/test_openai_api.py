"""The OpenAI-compatible API, driven with the official openai SDK against the real stack."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.home import gateway_runtime_path
from tests.conftest import DEFAULT_MODEL, readiness

pytestmark = pytest.mark.stack


# SmolLM2-135M at Q4_1 answers this sensibly with a plain system prompt; without one its
# chat template injects a persona prompt under which the tiny model rambles in French.
FRANCE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_chat_answers_the_capital_of_france(stack):
    answer = stack.client().chat.completions.create(
        model=DEFAULT_MODEL,
        messages=FRANCE,
        temperature=0,
        max_tokens=30,
    )
    assert "Paris" in answer.choices[0].message.content
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_stream_with_usage(stack):
    chunks = list(
        stack.client().chat.completions.create(
            model=DEFAULT_MODEL,
            messages=FRANCE,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1, "the answer should arrive in several chunks, not one"
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens > 0


def test_stream_without_include_usage_hides_the_usage_chunk(stack):
    chunks = list(
        stack.client().chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, stream=True
        )
    )
    assert chunks and all(c.choices for c in chunks), "a client that did not ask for usage gets no usage chunk"


def test_stream_arrives_chunk_by_chunk(stack):
    """Each SSE event reaches the client as the engine produces it, not all at the end."""
    arrivals = []
    started = time.monotonic()
    with httpx.stream(
        "POST", stack.base_url + "/completions",
        headers={"Authorization": f"Bearer {stack.admin_key}"},
        json={"model": DEFAULT_MODEL, "prompt": "Once upon a time, in a land far away,", "max_tokens": 60,
              "temperature": 0, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) > 10
    # Generating 60 tokens takes far longer than the first one: a relay that buffered the
    # answer would deliver the first event about when it delivers the last.
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals


def test_a_short_request_is_answered_while_a_long_one_streams(stack):
    """Parallel slots: a request does not wait in line behind a long generation (the engine
    behind one lock answered the short request only after the long one had finished), and
    the engine's health check answers meanwhile."""
    streaming, finished = threading.Event(), {}

    def long_stream() -> None:
        with httpx.stream("POST", stack.base_url + "/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {stack.admin_key}"},
                          # ignore_eos: llama.cpp's own field, passed through: exactly 300 tokens
                          json={"model": DEFAULT_MODEL, "messages": FRANCE, "max_tokens": 300, "ignore_eos": True,
                                "stream": True, "stream_options": {"include_usage": True}}) as response:
            for line in response.iter_lines():
                if '"content"' in line:
                    streaming.set()
                if '"usage"' in line and '"choices":[]' in line:
                    finished["tokens"] = json.loads(line[6:])["usage"]["completion_tokens"]
        finished["at"] = time.monotonic()

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        assert streaming.wait(60), "the long stream never started"
        runtime = json.loads(gateway_runtime_path(stack.home).read_text())
        engine = next(m for m in runtime["models"] if m["name"] == DEFAULT_MODEL)["replicas"][0]
        assert httpx.get(engine["health_url"], timeout=2).status_code == 200
        short = stack.client().chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0, max_tokens=5)
        answered = time.monotonic()
    finally:
        thread.join(120)
    assert short.choices[0].message.content
    assert finished["tokens"] == 300 and answered < finished["at"]


def test_a_connection_dropped_before_the_answer_is_sent_again_not_a_503(stack):
    """An engine may close a kept-alive connection just as the gateway reuses it (llama.cpp's
    server closes one after each stream, uvicorn after 5 idle seconds): the request goes out
    again on a new connection, and the replica is not taken for dead. The flaky upstream
    drops every other request unanswered."""
    client = stack.client()
    for _ in range(6):
        answer = client.chat.completions.create(model="remote-flaky", messages=FRANCE, max_tokens=2)
        assert answer.choices[0].message.content == "pong"
    assert readiness(stack.root)["models"]["remote-flaky"]["healthy"] == 1


def test_completions(stack):
    answer = stack.client().completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert answer.choices[0].text.strip()
    assert answer.usage.completion_tokens > 0


def test_completions_stream(stack):
    chunks = list(stack.client().completions.create(model=DEFAULT_MODEL, prompt="One, two,", max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()


def test_embeddings(stack):
    result = stack.client().embeddings.create(model=DEFAULT_MODEL, input=["hello world", "안녕하세요"])
    assert len(result.data) == 2
    first, second = result.data[0].embedding, result.data[1].embedding
    assert len(first) == len(second) > 100
    assert first != second


def test_models_list(stack):
    models = stack.client().models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == DEFAULT_MODEL and "remote-ok" in ids
    assert stack.client().models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL


def test_remote_engine_forwards_unknown_fields_unchanged(stack):
    answer = stack.client().chat.completions.create(
        model="remote-ok",
        messages=[{"role": "user", "content": "ping"}],
        extra_body={"custom_field": {"nested": [1, 2, 3]}, "top_k": 5},
    )
    echo = answer.model_extra["echo"]
    assert echo["custom_field"] == {"nested": [1, 2, 3]} and echo["top_k"] == 5
    assert echo["model"] == "upstream-model", "upstream_model renames the model for the upstream"
    assert answer.choices[0].message.content == "pong"


def test_remote_stream(stack):
    chunks = list(stack.client().chat.completions.create(
        model="remote-ok", messages=[{"role": "user", "content": "ping"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "pong"
    assert chunks[-1].usage.total_tokens == 9


def test_ragged_openai_style_stream_is_reassembled_and_metered(stack):
    """Events cut across reads, CRLF line ends, "usage": null in every chunk (as OpenAI sends)."""
    with_usage = list(stack.client().chat.completions.create(
        model="remote-ragged", messages=[{"role": "user", "content": "ping"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in with_usage if c.choices) == "pong"
    assert with_usage[-1].usage.total_tokens == 9 and all(c.usage is None for c in with_usage[:-1])
    without = list(stack.client().chat.completions.create(
        model="remote-ragged", messages=[{"role": "user", "content": "ping"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in without) == "pong"
    assert all(c.choices for c in without), "the usage chunk the gateway asked for is hidden"


def test_health_and_readiness(stack):
    assert httpx.get(stack.root + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(stack.root + "/readyz")
    # remote-down points at a closed port: the appliance is alive but not fully ready
    assert ready.status_code == 503
    body = ready.json()
    assert body["waiting_for"] == ["remote-down"]
    local = body["models"][DEFAULT_MODEL]
    assert (local["replicas"], local["healthy"], local["failed"]) == (1, 1, 0)
    assert [(e["replica"], e["state"], e["healthy"]) for e in local["engines"]] == [(0, "ready", True)]
    remote = readiness(stack.root)["models"]["remote-ok"]
    assert {k: remote[k] for k in ("replicas", "healthy", "failed")} == {"replicas": 1, "healthy": 1, "failed": 0}
    [upstream] = remote["engines"]
    assert "state" not in upstream and upstream["breaker"] == "closed"  # nothing supervises it here


def metric_value(text: str, name: str, **labels) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_metrics_exposes_per_model_series(stack):
    stack.client().chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    list(stack.client().chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, stream=True))
    text = httpx.get(stack.root + "/metrics").text
    chat = {"model": DEFAULT_MODEL, "endpoint": "chat/completions"}
    assert metric_value(text, "appliance_requests_total", status="200", **chat) >= 2
    gen_ai = {"gen_ai_request_model": DEFAULT_MODEL, "gen_ai_operation_name": "chat"}
    assert metric_value(text, "gen_ai_server_request_duration_seconds_count", **gen_ai) >= 2
    assert metric_value(text, "gen_ai_server_time_to_first_token_seconds_count", **gen_ai) >= 1
    assert metric_value(text, "gen_ai_server_time_per_output_token_seconds_count", **gen_ai) >= 1
    assert metric_value(text, "appliance_tokens_total", model=DEFAULT_MODEL, kind="completion") > 0
    assert metric_value(text, "appliance_tokens_total", model=DEFAULT_MODEL, kind="prompt") > 0
    assert metric_value(text, "appliance_requests_in_flight", model=DEFAULT_MODEL) == 0
    assert metric_value(text, "appliance_replicas_healthy", model=DEFAULT_MODEL) == 1
