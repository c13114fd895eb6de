"""The OpenAPI document describes every route the gateway answers, with the real error
shape, and a bounded schemathesis run over all of them (admin, /v1 and the rest) gets no
5xx. The stack serves one remote model (tests/upstream_server.py), fast where llama.cpp
is slow on a small machine, so generated /v1 requests reach an engine and come back."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from litestar.routes import HTTPRoute
from schemathesis.checks import not_a_server_error

from appliance.config import GatewayConfig
from services.gateway.app import OPENAI_POSTS, litestar_app, openapi_document
from tests.conftest import UPSTREAM_KEY_ENV, Stack, start_stack
from tests.gateway.registry_stores import path_without_minio

pytestmark = pytest.mark.stack

REMOTE_MODEL = "remote-ok"
ENGINE_ROUTES = ("/v1/chat/completions", "/v1/responses")  # what the test upstream answers
EXAMPLES_PER_OPERATION = 20  # 41 operations: the module runs in about a minute on two cores


@pytest.fixture(scope="module")
def remote_stack(tmp_path_factory, upstream):
    """Only `REMOTE_MODEL`, so it starts in seconds (no llama.cpp), and the filesystem object
    store (no MinIO on PATH), so the registries answer too."""
    tmp = tmp_path_factory.mktemp("remote-stack")
    profile = tmp / "profile.yaml"
    profile.write_text(f"name: remote-only\nmodels:\n  - name: {REMOTE_MODEL}\n    engine: remote\n"
                       f"    base_url: {upstream.url('ok')}\n    api_key_env: {UPSTREAM_KEY_ENV}\n")
    running = start_stack(tmp, profile, env={UPSTREAM_KEY_ENV: upstream.key, "PATH": path_without_minio()})
    yield running
    if running.proc.poll() is None:
        running.stop()


def document(stack: Stack) -> dict:
    response = httpx.get(stack.root + "/schema/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def answered_routes() -> set[tuple[str, str]]:
    """(path, method) of every route the gateway answers: Litestar's (but the document's own)
    and the OpenAI POSTs of the hot path."""
    routes = {(route.path_format, method.lower()) for route in litestar_app(GatewayConfig()).routes
              if isinstance(route, HTTPRoute) and not route.path.startswith("/schema")
              for method in route.methods if method not in ("HEAD", "OPTIONS")}
    return routes | {(path, "post") for path in OPENAI_POSTS}


def test_the_document_describes_every_route_with_the_openai_error_shape(remote_stack):
    doc = document(remote_stack)
    described = {(path, method) for path, item in doc["paths"].items() for method in item}
    answered = answered_routes()
    assert ("/v1/chat/completions", "post") in answered and ("/admin/keys", "post") in answered
    assert answered - described == set()
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert set(error["properties"]["error"]["required"]) == {"message", "type", "param", "code"}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "default" in responses, (method, path)
            for status, response in responses.items():
                if (status[0] in "45" or status == "default") and (path, status) != ("/readyz", "503"):
                    schema = response["content"]["application/json"]["schema"]  # not ready: the readiness body
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
    for path, required in [("/v1/chat/completions", "messages"), ("/admin/keys", "name")]:
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert required in doc["components"]["schemas"][body.rsplit("/", 1)[1]]["required"]


# Generated from the gateway's own document (the one /schema serves, built here in-process):
# schemathesis's fixture-based loader does not run under pytest 9. Every operation is fuzzed;
# nothing is excluded.
fuzzed = schemathesis.openapi.from_dict(openapi_document(litestar_app(GatewayConfig())))
fuzzed.config.generation.update(max_examples=EXAMPLES_PER_OPERATION)


@fuzzed.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case, remote_stack):
    """Positive and negative inputs. Chat and Responses bodies name the served model, so they reach
    its engine; the test upstream serves only chat completions, so /v1/completions and
    /v1/embeddings keep their generated names (their checks are fuzzed, not an engine's answer)."""
    if case.path in ENGINE_ROUTES and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = REMOTE_MODEL
    case.call_and_validate(base_url=remote_stack.root, headers={"Authorization": f"Bearer {remote_stack.admin_key}"},
                           checks=[not_a_server_error], timeout=30)
