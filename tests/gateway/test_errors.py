"""Every error is an OpenAI error object with the right status, raised through the SDK."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL

pytestmark = pytest.mark.stack

CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def post(stack, path: str, *, key: str | None = "admin", **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {stack.admin_key if key == 'admin' else key}"
    return httpx.post(stack.base_url + path, headers=headers, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_missing_key_is_401(stack):
    error = assert_error(post(stack, "/chat/completions", key=None, json=CHAT), 401, code="missing_api_key")
    assert "Authorization" in error["message"]
    assert_error(httpx.get(stack.base_url + "/models"), 401)


def test_invalid_key_is_401_through_the_sdk(stack):
    with pytest.raises(openai.AuthenticationError) as caught:
        stack.client(key="sk-ap-not-a-real-key").chat.completions.create(**CHAT)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_unknown_model_is_404_with_param_model(stack):
    with pytest.raises(openai.NotFoundError) as caught:
        stack.client().chat.completions.create(**{**CHAT, "model": "no-such-model"})
    assert caught.value.param == "model"
    assert "no-such-model" in caught.value.message
    assert_error(httpx.get(stack.base_url + "/models/no-such-model", headers={"Authorization": f"Bearer {stack.admin_key}"}),
                 404, param="model")


def test_malformed_json_is_400(stack):
    error = assert_error(post(stack, "/chat/completions", content=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"}), 400, code="invalid_json")
    assert "JSON" in error["message"]
    assert_error(post(stack, "/chat/completions", content=b""), 400)
    assert_error(post(stack, "/chat/completions", content=b"[1, 2]"), 400)


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": None}, "model"),
        ({"stream": "yes"}, "stream"),
        ({"n": 9}, "n"),  # over gateway.max_n (8)
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"logit_bias": {"1": 101}}, "logit_bias[...]"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                    {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
         "messages[0].content[1].type"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_invalid_parameters_are_400_naming_the_param(stack, change, param):
    body = {**CHAT, **change}
    if change.get("model", "") is None:
        del body["model"]
    error = assert_error(post(stack, "/chat/completions", json=body), 400, param=param)
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_embeddings_need_input(stack):
    assert_error(post(stack, "/embeddings", json={"model": DEFAULT_MODEL}), 400, param="input")


def test_logprobs_come_back_from_llama_cpp(stack):
    """llama.cpp's server computes logprobs per request: no profile setting, no memory kept for them."""
    answer = post(stack, "/chat/completions", json={**CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 2})
    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(len(token["top_logprobs"]) == 2 and token["logprob"] <= 0 for token in content)
    completion = post(stack, "/completions", json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2, "logprobs": 2})
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["logprobs"] is not None


@pytest.mark.parametrize("mib", [9, 20])
def test_body_over_the_limit_is_413(stack, mib):
    """Refused on its Content-Length, then drained: the client hears the 413, not a reset."""
    huge = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (mib * 1024 * 1024) + b'"}]}'
    for _ in range(3):
        error = assert_error(post(stack, "/chat/completions", content=huge), 413, code="request_too_large")
        assert "8388608" in error["message"]


def test_a_chunked_body_is_read_and_limited_too(stack):
    """No Content-Length (Transfer-Encoding: chunked): read to its end, refused once past the limit."""
    def chunks(body: bytes, size: int = 64 * 1024):
        yield from (body[i:i + size] for i in range(0, len(body), size))

    small = json.dumps({**CHAT, "model": "remote-ok"}).encode()
    answer = post(stack, "/chat/completions", content=chunks(small))
    assert answer.status_code == 200 and answer.json()["echo"]["messages"] == CHAT["messages"]
    huge = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (9 * 1024 * 1024) + b'"}]}'
    assert_error(post(stack, "/chat/completions", content=chunks(huge)), 413, code="request_too_large")


def test_no_healthy_replica_is_503_with_retry_after(stack):
    response = post(stack, "/chat/completions", json={**CHAT, "model": "remote-down"})
    assert_error(response, 503, code="no_healthy_replica")
    assert int(response.headers["Retry-After"]) >= 1


def test_engine_timeout_is_504(stack):
    with pytest.raises(openai.APIStatusError) as caught:
        stack.client().chat.completions.create(**{**CHAT, "model": "remote-slow"})
    assert caught.value.status_code == 504
    assert caught.value.code == "engine_timeout"


def stream_events(stack, model: str) -> list[str]:
    """The data lines of a streamed chat completion, read to its end."""
    with httpx.stream("POST", stack.base_url + "/chat/completions",
                      headers={"Authorization": f"Bearer {stack.admin_key}"},
                      json={**CHAT, "model": model, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def test_engine_silent_mid_stream_ends_it_with_a_timeout_event(stack):
    events = stream_events(stack, "remote-stall")
    assert '"po"' in events[0]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_timeout" and "sent nothing for 1 s" in error["message"]


def test_a_stream_that_keeps_sending_outlives_the_timeout(stack):
    """request_timeout_s bounds a stream's silences, not its length (remote-endless: 1 s, a chunk every 50 ms)."""
    started = time.monotonic()
    with httpx.stream("POST", stack.base_url + "/chat/completions",
                      headers={"Authorization": f"Bearer {stack.admin_key}"},
                      json={**CHAT, "model": "remote-endless", "stream": True}, timeout=30) as response:
        for line in response.iter_lines():
            assert '"error"' not in line
            if time.monotonic() - started > 2.5:
                break
    assert time.monotonic() - started > 2.5


def test_engine_error_is_502(stack):
    error = assert_error(post(stack, "/chat/completions", json={**CHAT, "model": "remote-broken"}), 502)
    assert "upstream exploded" in error["message"]


def test_engine_rejection_keeps_its_status(stack):
    """A prompt longer than the engine's context is the client's fault: 400, not 500."""
    long_prompt = "word " * 5000
    error = assert_error(post(stack, "/completions", json={"model": DEFAULT_MODEL, "prompt": long_prompt, "max_tokens": 4}), 400)
    assert DEFAULT_MODEL in error["message"]


def test_failure_mid_stream_ends_with_error_event_and_done(stack):
    events = stream_events(stack, "remote-broken")
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "mid-stream" in events[-2]
    assert any('"po"' in e for e in events[:-2]), "chunks sent before the failure still reach the client"


def test_failure_mid_stream_raises_in_the_sdk(stack):
    stream = stack.client().chat.completions.create(**{**CHAT, "model": "remote-broken", "stream": True})
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_unknown_route_is_an_openai_404(stack):
    assert_error(httpx.get(stack.root + "/v1/nope"), 404)


def test_wrong_method_is_405(stack):
    response = httpx.get(stack.base_url + "/chat/completions", headers={"Authorization": f"Bearer {stack.admin_key}"})
    assert_error(response, 405, code="method_not_allowed")


def admin(stack, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, stack.root + path, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30,
                         **kwargs)


BEYOND_SQLITE = 2**63  # one more than SQLite's largest integer


@pytest.mark.parametrize("method, path, body, param", [
    ("GET", f"/admin/models/m/versions/{BEYOND_SQLITE}", None, "version"),
    ("DELETE", f"/admin/datasets/d/versions/{-BEYOND_SQLITE}", None, "version"),
    ("GET", f"/admin/models/m/compare?a=1&b={BEYOND_SQLITE * 10}", None, "b"),
    ("GET", f"/admin/datasets/d/diff?a={BEYOND_SQLITE}&b=1", None, "a"),
    ("POST", "/admin/deployments", {"model": "m", "version": BEYOND_SQLITE}, "version"),
    ("POST", "/admin/datasets/d/versions/1/split", {"seed": BEYOND_SQLITE}, "seed"),
])
def test_integers_beyond_sqlite_are_400_naming_the_parameter(stack, method, path, body, param):
    assert_error(admin(stack, method, path, json=body), 400, param=param, code="invalid_value")


def test_json_nested_too_deep_is_400(stack):
    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    assert_error(post(stack, "/chat/completions", content=deep), 400, code="invalid_json")
    assert_error(admin(stack, "PATCH", "/admin/models/m/versions/1/card", content=deep), 400, code="invalid_json")


def test_early_errors_leave_the_connection_usable(stack):
    """A 405 or 401 answered before the body is read: the gateway reads the body first, so
    the client's next request on the same connection is not reset."""
    body = json.dumps({**CHAT, "padding": "x" * 4000})
    with httpx.Client(base_url=stack.base_url, timeout=30) as client:
        for _ in range(40):
            assert client.request("DELETE", "/chat/completions", content=body).status_code == 405
            assert client.post("/chat/completions", content=body).status_code == 401


def test_a_file_name_with_a_nul_is_400_naming_it(stack):
    response = admin(stack, "POST", "/admin/models/m/upload?filename=a%00b.gguf", content=b"GGUF")
    assert_error(response, 400, param="filename")


@pytest.mark.parametrize("filename", [".", ".."])
def test_a_file_name_that_names_a_folder_is_never_used_as_one(stack, filename):
    """"." once staged the upload as the staging folder itself: a 500, and its clean-up removed
    every upload in progress. Now the file gets the default name (the key here names nothing)."""
    response = admin(stack, "POST", "/admin/models/m/versions", json={"upload_key": "uploads/" + "0" * 32,
                                                                      "filename": filename})
    assert 400 <= response.status_code < 500, response.text
