"""The OpenAPI document at /schema. Litestar describes the routes it serves; `complete` adds
what it cannot see, the OpenAI POST routes answered on the hot path (services/gateway/app.py),
and gives every error answer the shape the gateway really sends (services/gateway/errors.py)
instead of Litestar's default {"status_code", "detail"}."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from litestar.routes import BaseRoute, HTTPRoute

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR = {
    "title": "Error",
    "description": "An OpenAI error object; `param` names the request parameter at fault, where there is one.",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}
OPEN_ROUTES = ("/healthz", "/readyz")  # no key needed (readyz's details: see gateway.metrics_require_key)
MONITORING_ROUTES = ("/metrics", "/schema")  # a key of any role, where gateway.metrics_require_key says so
FILE = {"type": "string", "format": "binary"}  # an upload's raw bytes
READINESS = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string", "enum": ["ready", "not ready"]},
                   "models": {"type": "object"}, "waiting_for": {"type": "array", "items": {"type": "string"}}},
}


def error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def complete(document: dict, openai_posts: dict[str, type[msgspec.Struct]], routes: Iterable[BaseRoute]) -> None:
    """Add the OpenAI POST routes (`openai_posts`: path -> request Struct) to Litestar's
    `document`, the JSON bodies its `routes` read (services/gateway/admin.py `request_body`),
    and the real error shape to every route's error answers; in place."""
    bodies = {(route.path_format, method.lower()): handler.opt["body"]
              for route in routes if isinstance(route, HTTPRoute)
              for handler in route.route_handlers if "body" in handler.opt for method in handler.http_methods}
    json_bodies = {at: schema for at, schema in bodies.items() if schema is not bytes}
    types = [*openai_posts.values(), *json_bodies.values()]
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(components)
    schemas["Error"] = ERROR
    for (path, struct), ref in zip(openai_posts.items(), refs):
        document["paths"][path] = {"post": openai_post(struct.__name__, ref)}
    for (path, method), ref in zip(json_bodies, refs[len(openai_posts):]):
        document["paths"][path][method]["requestBody"] = request_body("application/json", ref)
    for path, method in bodies.keys() - json_bodies.keys():
        document["paths"][path][method]["requestBody"] = request_body("application/octet-stream", FILE)
    for path, item in document["paths"].items():
        for operation in item.values():
            describe_errors(path, operation)
    readyz = document["paths"].get("/readyz", {}).get("get")
    if readyz is not None:  # not ready is a 503 with the same body, not an error object
        for status in ("200", "503"):
            readyz["responses"][status] = {"description": "ready" if status == "200" else "not ready",
                                           "content": {"application/json": {"schema": READINESS}}}


def request_body(media_type: str, schema: dict) -> dict:
    return {"required": True, "content": {media_type: {"schema": schema}}}


def openai_post(name: str, request_ref: dict) -> dict:
    return {
        "tags": ["openai"],
        "operationId": name.removesuffix("Request"),
        "summary": f"OpenAI-compatible: the body is a {name}. Fields not listed reach remote upstreams unchanged; "
                   "local engines take only the bounded extensions docs/api.md lists, others are a 400.",
        "requestBody": request_body("application/json", request_ref),
        "responses": {
            "200": {"description": "The answer; with `stream: true`, server-sent events ending in `data: [DONE]`.",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            "404": error_response("No model of the name `model` is served here."),
            "413": error_response("The body is over gateway.max_body_bytes."),
            "502": error_response("The engine failed."),
            "503": error_response("No healthy replica of the model; Retry-After says when to try again."),
            "504": error_response("The engine was silent for longer than its request timeout."),
        },
    }


def describe_errors(path: str, operation: dict) -> None:
    """The error answers of one operation, every one an OpenAI error object."""
    responses = operation.setdefault("responses", {})
    for status, response in responses.items():
        if status[0] in "45":
            responses[status] = error_response(response.get("description", "error"))
    if operation.get("parameters") or "requestBody" in operation:
        responses.setdefault("400", error_response("A bad parameter or body, named in `param`."))
    if path.startswith(MONITORING_ROUTES):
        responses.setdefault("401", error_response("No valid API key, with gateway.metrics_require_key on."))
    elif not path.startswith(OPEN_ROUTES):
        responses.setdefault("401", error_response("No API key, or not a valid one."))
        responses.setdefault("403", error_response("The key's role may not call this route."))
    if "{" in path:
        responses.setdefault("404", error_response("What the path or `model` names does not exist."))
    responses.setdefault("default", error_response("Any other error (413, 429, 5xx): an OpenAI error object."))
